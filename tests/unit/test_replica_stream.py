"""The replica's stream without Ray: the first token is sent at once, later ones are paced by interval or by
the replica group's message budget; one call streams all its choices from the real engine on a thread."""

from __future__ import annotations

import asyncio

import pytest
from transformers import PreTrainedTokenizerFast

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest, FinishReason, RequestOutput
from serve_app.replica.engine_client import EngineClient, StreamPacing
from serve_app.replica.engine_loop import StepReport
from serve_app.replica.thread_host import EngineThread
from serve_app.stage.detokenizer import IncrementalDetokenizer


def _thread_host(tiny_checkpoint) -> EngineThread:
    return EngineThread(
        ModelConfig(source=str(tiny_checkpoint), served_model_id="tiny", dtype="float32", max_model_len=512),
        EngineConfig(device="cpu", kv_cache_bytes=16 * 2**20, heartbeat_interval_s=1.0))


class ScriptedHost:
    """An engine host whose steps the test makes: `emit` hands the client one report, on its event loop."""

    def start(self, on_report, loop):
        self.on_report = on_report
        on_report(StepReport(None))

    def emit(self, outputs: list[RequestOutput]) -> None:
        self.on_report(StepReport(None, outputs))

    def send(self, command):
        pass

    def alive(self):
        return True

    def healthy(self):
        return True

    def stop(self):
        pass


def _token(choice: ChoiceId, last: bool = False) -> RequestOutput:
    return RequestOutput(choice, [100], FinishReason.LENGTH if last else None)


async def _let_the_streams_run() -> None:
    for _ in range(5):  # each stream's consumer takes what it was given and starts its hold
        await asyncio.sleep(0)


async def _paced_stream(pacing: StreamPacing, open_streams: int) -> tuple[list[list], list[float]]:
    """One stream's messages and the loop time of each, while `open_streams` streams are open: its first token
    alone, then a second token, and — once the stream holds that one — 18 more, the last one final."""
    host = ScriptedHost()
    client = EngineClient(host, pacing=pacing)
    loop = asyncio.get_running_loop()
    choices = [ChoiceId(f"s{i}", 0) for i in range(open_streams)]
    streams = [client.generate([EngineRequest(choice, [1, 2], SamplingParams(max_tokens=20))]) for choice in choices]
    nexts = [asyncio.ensure_future(stream.__anext__()) for stream in streams]
    await _let_the_streams_run()
    host.emit([_token(choices[0])])
    batches, times = [await nexts[0]], [loop.time()]

    async def rest() -> None:
        async for batch in streams[0]:
            batches.append(batch)
            times.append(loop.time())

    reader = asyncio.ensure_future(rest())
    host.emit([_token(choices[0])])
    await _let_the_streams_run()
    for i in range(18):
        host.emit([_token(choices[0], last=i == 17)])
    await reader
    for pending in nexts[1:]:
        pending.cancel()
    await asyncio.gather(*nexts[1:], return_exceptions=True)
    return batches, times


def test_first_token_alone_then_tokens_coalesced_per_interval():
    batches, times = asyncio.run(_paced_stream(StreamPacing(min_interval_s=0.2), open_streams=1))
    assert [len(batch) for batch in batches] == [1, 19]  # the first token pays no coalescing delay
    assert batches[-1][-1].finished
    assert times[1] - times[0] >= 0.2 - 1e-3  # the second token waited for its window, gathering the rest


def test_message_budget_spreads_over_open_streams():
    # 4 open streams sharing 8 messages/s: each may send every 0.5 s, capped at 0.3 s.
    batches, times = asyncio.run(_paced_stream(StreamPacing(messages_per_s=8, max_interval_s=0.3), open_streams=4))
    assert [len(batch) for batch in batches] == [1, 19]
    assert times[1] - times[0] >= 0.3 - 1e-3


@pytest.mark.parametrize(("pacing", "open_streams", "expected_s"), [
    (StreamPacing(), 32, 0.0),  # default: every engine step's tokens go as they come
    (StreamPacing(min_interval_s=0.02), 1, 0.02),
    (StreamPacing(messages_per_s=400), 1, 0.0025),  # a lone stream still gets (nearly) every step
    (StreamPacing(messages_per_s=400), 32, 0.08),
    (StreamPacing(messages_per_s=400, max_interval_s=0.05), 32, 0.05),
    (StreamPacing(min_interval_s=0.01, messages_per_s=400), 2, 0.01),
])
def test_pacing_interval(pacing, open_streams, expected_s):
    assert pacing.interval(open_streams) == pytest.approx(expected_s)


def test_pacing_from_config():
    engine = EngineConfig(device="cpu", kv_cache_bytes=2**20, stream_messages_per_s=500, stream_max_interval_s=0.1)
    assert StreamPacing.from_config(engine) == StreamPacing(0.0, 500, 0.1)


def test_one_call_streams_every_choice_and_ends_when_the_last_one_does(tiny_checkpoint):
    requests = [EngineRequest(ChoiceId("q", j), [1, 15043, 29991],
                              SamplingParams(max_tokens=5 * (j + 1), temperature=0, ignore_eos=True))
                for j in range(3)]

    async def consume() -> tuple[list[list], EngineThread]:
        host = _thread_host(tiny_checkpoint)
        client = EngineClient(host)
        try:
            return [batch async for batch in client.generate(requests)], host
        finally:
            client.stop()

    batches, host = asyncio.run(consume())
    tokens: dict[int, int] = {}
    for batch in batches:
        for output in batch:
            tokens[output.choice.index] = tokens.get(output.choice.index, 0) + len(output.new_token_ids)
    assert tokens == {0: 5, 1: 10, 2: 15}
    assert [o.choice.index for o in batches[-1] if o.finished] == [2]  # the call ends with its last choice
    assert host.engine.stats().num_free_blocks == host.engine.stats().num_blocks


def test_a_stop_string_ends_one_of_four_choices_in_the_engine_while_the_others_run_on(tiny_checkpoint):
    """n = 4 seeded choices in one call. A stop string that only choice 2's text contains ends choice 2 at the
    token that completes it — the engine drops it from its batch (and frees its blocks) a step or so later —
    while the other three run to their end."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)
    max_tokens = 48

    def requests(stop: tuple[str, ...]) -> list[EngineRequest]:
        return [EngineRequest(ChoiceId("n4", j), [1, 15043, 29991],
                              SamplingParams(max_tokens=max_tokens, seed=7 + j, ignore_eos=True, stop=stop))
                for j in range(4)]

    async def run(stop: tuple[str, ...]) -> tuple[dict[int, list[RequestOutput]], list[tuple[set[int], int]]]:
        client = EngineClient(_thread_host(tiny_checkpoint), tokenizer=tokenizer)
        outputs: dict[int, list[RequestOutput]] = {j: [] for j in range(4)}
        seen: list[tuple[set[int], int]] = []  # per message: which choices had output, sequences running
        try:
            async for batch in client.generate(requests(stop)):
                for output in batch:
                    outputs[output.choice.index].append(output)
                seen.append(({output.choice.index for output in batch}, client.stats.num_sequences_running))
        finally:
            client.stop()
        return outputs, seen

    def text_of(tokens: list[int]) -> str:
        detokenizer = IncrementalDetokenizer(tokenizer)
        return "".join(detokenizer.push([token]) for token in tokens) + detokenizer.flush()

    free_run, _ = asyncio.run(run(()))
    tokens = {j: [t for output in outs for t in output.new_token_ids] for j, outs in free_run.items()}
    assert all(len(ids) == max_tokens for ids in tokens.values())
    texts = {j: text_of(ids) for j, ids in tokens.items()}
    # A stop string from the middle of choice 2's first dozen tokens that no other choice ever writes.
    early = text_of(tokens[2][:12])
    stop = next(early[start:start + 5] for start in range(len(early) // 2, len(early) - 5)
                if all(early[start:start + 5] not in texts[j] for j in (0, 1, 3)))

    stopped_run, seen = asyncio.run(run((stop,)))
    got = {j: [t for output in outs for t in output.new_token_ids] for j, outs in stopped_run.items()}
    for j in (0, 1, 3):
        assert got[j] == tokens[j]  # seeded: the same tokens whatever else is in the batch
    assert stopped_run[2][-1].finish_reason is FinishReason.STOP
    assert stop in text_of(got[2]) and stop not in text_of(got[2][:-1])  # ended at the completing token
    assert got[2] == tokens[2][:len(got[2])]
    # Once choice 2 has stopped, the engine runs three sequences while the others go on.
    after_stop = seen[next(i for i, (choices, _) in enumerate(seen) if 2 in choices) + 1:]
    assert any(running == 3 for choices, running in after_stop if choices & {0, 1, 3})


def test_a_first_output_cut_at_a_stop_string_still_says_what_the_prompt_found_cached(tiny_checkpoint):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)
    ids = tokenizer.encode("Sure. The end. More text", add_special_tokens=False)
    choice = ChoiceId("cut", 0)

    async def run() -> list[RequestOutput]:
        host = ScriptedHost()
        client = EngineClient(host, tokenizer=tokenizer)
        stream = client.generate([EngineRequest(choice, [1, 2], SamplingParams(max_tokens=20, stop=("end",)))])
        first = asyncio.ensure_future(stream.__anext__())
        await _let_the_streams_run()
        host.emit([RequestOutput(choice, ids, num_cached_tokens=32)])  # the stop string is in its first output
        batch = await first
        await stream.aclose()
        return batch

    (output,) = asyncio.run(run())
    assert output.finish_reason is FinishReason.STOP and len(output.new_token_ids) < len(ids)
    assert output.num_cached_tokens == 32
