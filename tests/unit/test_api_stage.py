"""The stage's ChatProcessor without Ray: /v1/completions and chat share one loop; tools in and tool calls out; limits."""

from __future__ import annotations

import asyncio
import json

import pytest
from transformers import PreTrainedTokenizerFast

from serve_app.affinity import AffinityKey
from serve_app.config import ApiConfig, ModelConfig, PricingConfig
from serve_app.engine.sequence import EngineRequest, FinishReason, RequestOutput
from serve_app.errors import ContextLengthExceededError, InvalidRequestError
from serve_app.protocol import ChatCompletionRequest, CompletionRequest
from serve_app.stage.processor import ChatProcessor, ChoiceDelta, UsageReport
from serve_app.stage.tools import may_become_tool_call, parse_tool_calls, with_tools

MODEL = "tiny"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)


def scripted_engine(tokenizer, reply: str, seen: list[EngineRequest], cached: dict[int, int] | None = None,
                    keys: list[AffinityKey] | None = None):
    """A fake engine that answers every request of a call with `reply`'s tokens, one per step (each step's
    outputs for all requests in one message), then EOS. Choice `i`'s first output says that `cached[i]` of
    its prompt tokens were cached (0 when not given). Each call's affinity key goes to `keys`."""
    ids = tokenizer.encode(reply, add_special_tokens=False)
    cached = cached or {}

    async def generate(requests: list[EngineRequest], affinity: AffinityKey):
        seen.extend(requests)
        if keys is not None:
            keys.append(affinity)
        for i in range(len(ids)):
            batch = []
            for request in requests:
                tokens = ids[: request.params.max_tokens]
                if i < len(tokens):
                    last = i == len(tokens) - 1
                    reason = (FinishReason.LENGTH if len(tokens) < len(ids) else FinishReason.STOP) if last else None
                    batch.append(RequestOutput(request.choice, [tokens[i]], finish_reason=reason,
                                               num_cached_tokens=cached.get(request.choice.index, 0)
                                               if i == 0 else None))
            if batch:
                yield batch

    return generate


def make_stage(tokenizer, reply: str, seen: list, cached: dict[int, int] | None = None,
               pricing: PricingConfig | None = None, keys: list[AffinityKey] | None = None, **api) -> ChatProcessor:
    model = ModelConfig(source="x", served_model_id=MODEL, max_model_len=512)
    generate = scripted_engine(tokenizer, reply, seen, cached, keys)
    return ChatProcessor(tokenizer, model, pricing or PricingConfig(), generate, ApiConfig(**api))


def collect(stream) -> list:
    async def run():
        return [event async for batch in stream for event in batch]

    return asyncio.run(run())


def texts(events) -> dict[int, str]:
    out: dict[int, str] = {}
    for event in events:
        if isinstance(event, ChoiceDelta):
            out[event.index] = out.get(event.index, "") + event.text
    return out


def test_completions_index_choices_by_prompt_then_n_and_echo(tokenizer):
    seen: list[EngineRequest] = []
    stage = make_stage(tokenizer, "and so on", seen)  # SentencePiece adds the space
    request = CompletionRequest.model_validate({"model": MODEL, "prompt": ["Hello", "Bye"], "n": 2, "echo": True})
    events = collect(stage.complete(request))
    assert texts(events) == {0: "Hello and so on", 1: "Hello and so on", 2: "Bye and so on", 3: "Bye and so on"}
    assert [r.prompt_token_ids[0] for r in seen] == [tokenizer.bos_token_id] * 4
    usage = events[-1].usage
    assert isinstance(events[-1], UsageReport)
    assert usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in seen[::2])
    assert usage.completion_tokens == 4 * len(tokenizer.encode("and so on", add_special_tokens=False))
    assert all(r.params.max_tokens == 16 for r in seen)  # OpenAI's default for completions


def test_completion_limits(tokenizer):
    stage = make_stage(tokenizer, "x", [], max_prompts=2)
    with pytest.raises(InvalidRequestError) as error:
        stage.prepare_completion(CompletionRequest.model_validate({"model": MODEL, "prompt": ["a", "b", "c"]}))
    assert error.value.param == "prompt"
    with pytest.raises(ContextLengthExceededError) as error:
        stage.prepare_completion(CompletionRequest.model_validate({"model": MODEL, "prompt": "word " * 600}))
    assert error.value.param == "prompt" and "in the prompt" in error.value.message


def test_message_limit(tokenizer):
    stage = make_stage(tokenizer, "x", [], max_messages=2)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    with pytest.raises(InvalidRequestError) as error:
        stage.prepare(ChatCompletionRequest.model_validate({"model": MODEL, "messages": messages}))
    assert error.value.param == "messages"


def deltas_with_tools_offered(tokenizer, reply: str) -> list[ChoiceDelta]:
    """The deltas of a streamed chat that offers WEATHER, when the model replies `reply`."""
    stage = make_stage(tokenizer, reply, [])
    request = ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "stream": True})
    return [e for e in collect(stage.chat(request)) if isinstance(e, ChoiceDelta)]


def test_a_json_reply_naming_a_tool_is_a_tool_call(tokenizer):
    deltas = deltas_with_tools_offered(tokenizer, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    (last,) = deltas  # held until the reply is whole
    assert last.finish_reason == "tool_calls" and last.text == ""
    (call,) = last.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_choice_none_ignores_the_tools(tokenizer):
    reply = '{"name": "get_weather", "arguments": {}}'
    seen: list[EngineRequest] = []
    stage = make_stage(tokenizer, reply, seen)
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Weather?"}]}
    none = ChatCompletionRequest.model_validate({**base, "tools": [WEATHER], "tool_choice": "none"})
    events = collect(stage.chat(none))
    assert texts(events) == {0: f" {reply}"} and all(not getattr(e, "tool_calls", None) for e in events)
    collect(stage.chat(ChatCompletionRequest.model_validate(base)))
    collect(stage.chat(ChatCompletionRequest.model_validate({**base, "tools": [WEATHER]})))
    assert seen[0].prompt_token_ids == seen[1].prompt_token_ids
    assert len(seen[2].prompt_token_ids) > len(seen[1].prompt_token_ids)  # "auto" adds the schemas


def test_with_tools_extends_the_system_message_or_adds_one():
    from serve_app.protocol import ChatMessage, Tool

    tools = [Tool.model_validate(WEATHER)]
    user = ChatMessage(role="user", content="hi")
    (system, _) = with_tools([user], tools)
    assert system.role == "system" and "get_weather" in system.content
    (_, merged) = with_tools([user, ChatMessage(role="system", content="Be brief.")], tools)
    assert merged.content.startswith("Be brief.\n\n") and "get_weather" in merged.content


@pytest.mark.parametrize("text, names", [
    ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', ["get_weather"]),
    ('```json\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n```', ["get_weather"]),
    ('[{"name": "get_weather", "arguments": {}}, {"name": "get_weather", "arguments": {}}]',
     ["get_weather", "get_weather"]),
    ('{"name": "launch_rockets", "arguments": {}}', None),
    ('The weather is {"name": "get_weather"}', None),
    ('{"name": "get_weather", "arguments": [1]}', None),
    ("{not json", None),
])
def test_parse_tool_calls(text, names):
    from serve_app.protocol import Tool

    calls = parse_tool_calls(text, [Tool.model_validate(WEATHER)])
    assert (None if calls is None else [c.function.name for c in calls]) == names


def test_n_beyond_the_configured_maximum_is_a_400_naming_n(tokenizer):
    request = ChatCompletionRequest.model_validate(
        {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "n": 3})
    with pytest.raises(InvalidRequestError) as error:
        make_stage(tokenizer, "", [], max_n=2).prepare(request)
    assert error.value.param == "n"
    assert make_stage(tokenizer, "", [], max_n=3).prepare(request)[0][0] == tokenizer.bos_token_id


def test_a_stop_string_inside_a_coalesced_batch_ends_usage_at_its_token(tokenizer):
    """The replica may deliver several tokens in one batch; usage must not depend on that batching."""
    reply = "Hello there, my friend. How are you today?"
    ids = tokenizer.encode(reply, add_special_tokens=False)

    async def one_batch(requests: list[EngineRequest], affinity: AffinityKey):
        (request,) = requests
        yield [RequestOutput(request.choice, [token], finish_reason=FinishReason.STOP if i == len(ids) - 1 else None)
               for i, token in enumerate(ids)]

    model = ModelConfig(source="x", served_model_id=MODEL, max_model_len=512)
    stage = ChatProcessor(tokenizer, model, PricingConfig(), one_batch, ApiConfig())
    request = ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stop": ["friend"]})
    events = collect(stage.chat(request))
    assert texts(events)[0] == " Hello there, my "
    usage = next(e.usage for e in events if isinstance(e, UsageReport))
    tokens_through_stop = len(tokenizer.encode("Hello there, my friend", add_special_tokens=False))
    assert usage.completion_tokens == tokens_through_stop < len(ids)


def test_every_generated_token_is_counted_once_in_the_latency_metrics(tokenizer):
    """Tokens whose text is held back (the byte tokens of an unfinished emoji) still reach the metrics."""
    stage = make_stage(tokenizer, "Hi 😀 there", [])
    request = ChatCompletionRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    events = collect(stage.chat(request))
    usage = next(e.usage for e in events if isinstance(e, UsageReport))
    assert sum(e.num_tokens for e in events if isinstance(e, ChoiceDelta)) == usage.completion_tokens


def test_choices_share_one_engine_call_and_a_stopped_choice_does_not_hold_the_reply(tokenizer):
    """n = 2 in one replica call: choice 0 hits a stop string early, choice 1 runs to its end; the reply (and
    the call, which aborts choice 0's engine request) ends with choice 1, not when choice 0's would."""
    stopping = tokenizer.encode("Sure, here it is. END and then a great deal more text that nobody reads at all",
                                add_special_tokens=False)
    plain = tokenizer.encode("A short answer.", add_special_tokens=False)
    calls, steps_sent, closed = [], [], []

    async def generate(requests: list[EngineRequest], affinity: AffinityKey):
        calls.append([request.choice for request in requests])
        first, second = requests
        try:
            for i in range(len(stopping)):
                batch = [RequestOutput(first.choice, [stopping[i]], finish_reason=FinishReason.LENGTH if i == len(stopping) - 1 else None)]
                if i < len(plain):
                    batch.append(RequestOutput(second.choice, [plain[i]], finish_reason=FinishReason.STOP if i == len(plain) - 1 else None))
                steps_sent.append(i)
                yield batch
        finally:
            closed.append(True)

    model = ModelConfig(source="x", served_model_id=MODEL, max_model_len=512)
    stage = ChatProcessor(tokenizer, model, PricingConfig(), generate, ApiConfig())
    request = ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "n": 2, "stop": ["END"]})
    events = collect(stage.chat(request))
    assert len(calls) == 1 and len(calls[0]) == 2  # one call for both choices
    assert texts(events) == {0: " Sure, here it is. ", 1: " A short answer."}
    reasons = {e.index: e.finish_reason for e in events if isinstance(e, ChoiceDelta) and e.finish_reason}
    assert reasons == {0: "stop", 1: "stop"}
    usage = next(e.usage for e in events if isinstance(e, UsageReport))
    through_stop = len(tokenizer.encode("Sure, here it is. END", add_special_tokens=False))
    assert usage.completion_tokens == through_stop + len(plain)
    assert closed and len(steps_sent) == max(through_stop, len(plain)) < len(stopping)


def test_an_engine_stream_that_ends_early_is_an_error_not_a_silent_reply(tokenizer):
    async def cut_short(requests: list[EngineRequest], affinity: AffinityKey):
        yield [RequestOutput(requests[0].choice, [tokenizer.encode("Hi", add_special_tokens=False)[0]])]

    stage = ChatProcessor(tokenizer, ModelConfig(source="x", served_model_id=MODEL, max_model_len=512), PricingConfig(),
                      cut_short, ApiConfig())
    request = ChatCompletionRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    with pytest.raises(RuntimeError, match="ended before every choice finished"):
        collect(stage.chat(request))


def test_with_tools_offered_a_plain_text_reply_still_streams(tokenizer):
    reply = "It is sunny in Paris today, with a light breeze."
    deltas = deltas_with_tools_offered(tokenizer, reply)
    assert len(deltas) > 3  # token by token once the reply's first word rules out a call, not one final delta
    assert "".join(d.text for d in deltas) == f" {reply}" and deltas[-1].finish_reason == "stop"
    assert not any(d.tool_calls for d in deltas)


@pytest.mark.parametrize(("start", "may"), [("", True), ("  ", True), (" {", True), ("[", True), ("```json", True),
                                            (" It", False), ("Sure {", False)])
def test_may_become_tool_call(start, may):
    assert may_become_tool_call(start) is may


def test_text_that_cannot_fit_is_refused_without_being_tokenized(tokenizer, monkeypatch):
    """No Llama 2 token's text is longer than 16 characters, so 512 x 16 characters cannot fit a 512-token
    context whatever they say: refused at once, the tokenizer never called (1 MB of text takes it seconds)."""
    stage = make_stage(tokenizer, "x", [])
    calls = []
    monkeypatch.setattr(stage, "_encode", lambda text: calls.append(len(text)) or tokenizer.encode(text))
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "a" * (512 * 16)}]}
    with pytest.raises(ContextLengthExceededError, match="at least 512 tokens") as refused:
        stage.prepare(ChatCompletionRequest.model_validate(huge))
    assert refused.value.param == "messages" and calls == []
    with pytest.raises(ContextLengthExceededError):
        stage.prepare_completion(CompletionRequest.model_validate({"model": MODEL, "prompt": "a" * (512 * 16)}))
    assert calls == []
    stage.prepare(ChatCompletionRequest.model_validate({**huge, "messages": [{"role": "user", "content": "hi"}]}))
    assert calls  # a prompt that may fit is tokenized as ever


def test_a_long_prompt_is_tokenized_off_the_event_loop(tokenizer, monkeypatch):
    import threading

    model = ModelConfig(source="x", served_model_id=MODEL, max_model_len=4096)
    stage = ChatProcessor(tokenizer, model, PricingConfig(), scripted_engine(tokenizer, "ok", []), ApiConfig())
    threads = []
    prepare = stage.prepare
    monkeypatch.setattr(stage, "prepare", lambda request: threads.append(threading.get_ident()) or prepare(request))
    for words in (10, 2000):  # about 50 and 10,000 characters
        content = " ".join(["word"] * words)
        collect(stage.chat(ChatCompletionRequest.model_validate(
            {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2})))
    short, long = threads
    assert short == threading.get_ident() and long != threading.get_ident()  # asyncio.run runs on this thread


def test_cached_prompt_tokens_count_once_per_prompt_and_are_priced_as_cached_input(tokenizer):
    """Two prompts, two choices each: a prompt's cached tokens are what all of its choices found, counted
    once like its tokens; the cost prices them at the cached-input price."""
    pricing = PricingConfig(input_per_million_tokens=1.0, cached_input_per_million_tokens=0.1,
                            output_per_million_tokens=2.0)
    stage = make_stage(tokenizer, "and so on", [], cached={0: 32, 1: 16, 2: 48, 3: 32}, pricing=pricing)
    prompts = ["Tell me about the sea. " * 12, "Tell me about the hills. " * 12]
    request = CompletionRequest.model_validate({"model": MODEL, "prompt": prompts, "n": 2})
    usage = collect(stage.complete(request))[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == 16 + 32
    expected = ((usage.prompt_tokens - 48) * 1.0 + 48 * 0.1 + usage.completion_tokens * 2.0) / 1e6
    assert usage.estimated_cost == pytest.approx(expected, abs=1e-10)
    # Unpriced, a cached token costs what any input token does.
    plain = make_stage(tokenizer, "and so on", [], cached={0: 32, 1: 16, 2: 48, 3: 32},
                       pricing=PricingConfig(input_per_million_tokens=1.0, output_per_million_tokens=2.0))
    plain_usage = collect(plain.complete(request))[-1].usage
    assert plain_usage.estimated_cost == pytest.approx(
        (plain_usage.prompt_tokens * 1.0 + plain_usage.completion_tokens * 2.0) / 1e6, abs=1e-10)


def test_chat_usage_reports_the_cached_prompt_tokens(tokenizer):
    messages = [{"role": "system", "content": "Be brief. " * 20}, {"role": "user", "content": "Hi"}]
    request = ChatCompletionRequest.model_validate({"model": MODEL, "messages": messages})
    usage = collect(make_stage(tokenizer, "Hello there", [], cached={0: 48}).chat(request))[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == 48 < usage.prompt_tokens
    assert collect(make_stage(tokenizer, "Hello there", []).chat(request))[-1].usage.prompt_tokens_details \
        .cached_tokens == 0


def test_each_engine_call_carries_its_requests_affinity_key(tokenizer):
    """The key the replica group is chosen by reaches the engine call, from chat and from completions."""
    keys: list[AffinityKey] = []
    stage = make_stage(tokenizer, "Fine.", [], keys=keys)
    opening = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    collect(stage.chat(ChatCompletionRequest.model_validate({"model": MODEL, "messages": opening})))
    later = opening + [{"role": "assistant", "content": "Fine."}, {"role": "user", "content": "More?"}]
    collect(stage.chat(ChatCompletionRequest.model_validate({"model": MODEL, "messages": later})))
    collect(stage.complete(CompletionRequest.model_validate({"model": MODEL, "prompt": ["a", "b"],
                                                             "prompt_cache_key": "k"})))
    assert keys[0] == keys[1] and keys[0].source == "conversation"  # one conversation, one key
    assert keys[2] == AffinityKey.of("prompt_cache_key", "k") and len(keys) == 3  # both prompts, one call
