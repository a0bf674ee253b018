"""The replica's stream without Ray: the first token is sent at once, later ones are paced by interval or by
the replica group's message budget."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.engine import build_engine
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import EngineRequest
from serve_app.replica.engine_host import EngineThread
from serve_app.replica.engine_loop import EngineLoop, StreamPacing


def _streams(tiny_checkpoint, pacing: StreamPacing, count: int = 1, max_tokens: int = 20) -> list[list[list]]:
    """The batches each of `count` concurrent greedy streams received."""
    engine = build_engine(
        ModelConfig(source=str(tiny_checkpoint), served_model_id="tiny", dtype="float32", max_model_len=512),
        EngineConfig(device="cpu", kv_cache_bytes=16 * 2**20))
    loop = EngineLoop(EngineThread(engine, heartbeat_interval_s=1.0), pacing=pacing)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def consume(index: int) -> list[list]:
        return [batch async for batch in loop.generate([EngineRequest(f"r{index}-0", [1, 15043, 29991], params)])]

    async def run_all() -> list[list[list]]:
        return list(await asyncio.gather(*(consume(i) for i in range(count))))

    try:
        return asyncio.run(run_all())
    finally:
        loop.stop()


def test_first_token_alone_then_tokens_coalesced_per_interval(tiny_checkpoint):
    (batches,) = _streams(tiny_checkpoint, StreamPacing(min_interval_s=0.2))
    assert len(batches[0]) == 1  # time to first token pays no coalescing delay
    assert sum(len(batch) for batch in batches) == 20 and batches[-1][-1].finished
    assert len(batches) <= 11  # 19 later tokens in 0.2 s windows: at least two tokens a message


def test_message_budget_spreads_over_open_streams(tiny_checkpoint):
    # 4 streams sharing 8 messages/s: each may send every 0.5 s, capped at 0.3 s; 40 steps of 4 sequences
    # take well under a second on the tiny model, so each stream's 39 later tokens fit in a few messages.
    streams = _streams(tiny_checkpoint, StreamPacing(messages_per_s=8, max_interval_s=0.3), count=4, max_tokens=40)
    for batches in streams:
        assert len(batches[0]) == 1
        assert sum(len(batch) for batch in batches) == 40 and batches[-1][-1].finished
        assert len(batches) <= 6


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
    engine = build_engine(
        ModelConfig(source=str(tiny_checkpoint), served_model_id="tiny", dtype="float32", max_model_len=512),
        EngineConfig(device="cpu", kv_cache_bytes=16 * 2**20))
    loop = EngineLoop(EngineThread(engine, heartbeat_interval_s=1.0))
    requests = [EngineRequest(f"q-{j}", [1, 15043, 29991], SamplingParams(max_tokens=5 * (j + 1), temperature=0,
                                                                          ignore_eos=True)) for j in range(3)]

    async def consume() -> list[list]:
        return [batch async for batch in loop.generate(requests)]

    try:
        batches = asyncio.run(consume())
    finally:
        loop.stop()
    tokens: dict[str, int] = {}
    for batch in batches:
        for output in batch:
            tokens[output.request_id] = tokens.get(output.request_id, 0) + len(output.new_token_ids)
    assert tokens == {"q-0": 5, "q-1": 10, "q-2": 15}
    assert [o.request_id for o in batches[-1] if o.finished] == ["q-2"]  # the call ends with its last choice
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
