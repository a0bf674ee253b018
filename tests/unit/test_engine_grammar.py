"""The engine with grammars, without Ray, on the tiny random model: outputs that always parse and validate,
grammar state through preemption, prefix-cache hits and aborts, seeded draws that do not depend on the batch,
grammars prepared once, and no grammar work for a batch that has none."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
from transformers import PreTrainedTokenizerFast

from serve_app.engine.engine import Engine
from serve_app.engine.grammar import GrammarCompiler, GrammarTable
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest, FinishReason
from serve_app.errors import InvalidRequestError, ServiceError
from serve_app.protocol import ChatCompletionRequest, Tool
from serve_app.stage.structured_output import request_grammar
from serve_app.stage.tools import parse_tool_calls
from tests.unit.test_engine import _engine, _random_prompts, _small_cache_engine

EOS = 2
# Objects, arrays, enums, required fields, numbers, and strings whose JSON needs escapes (the const and an
# enum value hold a quote, a backslash, a newline and a tab). Strings and numbers are bounded: the random
# model's free strings would otherwise run on for thousands of tokens.
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "motto": {"const": 'say "hi"\\\n'},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -10, "maximum": 10},
        "role": {"enum": ["admin", "user", "tab\tuser"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "motto", "age", "role", "address"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a"], "additionalProperties": False}}},
]
PROMPT = [1, 15043, 29991]


def grammar_for(**fields) -> str:
    """The grammar the stage sends for a chat request with these fields."""
    return request_grammar(ChatCompletionRequest.model_validate(
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **fields}))


NESTED_GRAMMAR = grammar_for(response_format={"type": "json_schema",
                                              "json_schema": {"name": "n", "schema": NESTED}})
OBJECT_GRAMMAR = grammar_for(response_format={"type": "json_object"})


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)


def run(engine: Engine, requests: list[EngineRequest], *, abort_after: int | None = None
        ) -> dict[ChoiceId, tuple[list[int], FinishReason | ServiceError | None]]:
    """Each request's tokens and how it ended (its finish reason, or the error the engine refused it with)."""
    results: dict[ChoiceId, tuple[list[int], FinishReason | ServiceError | None]] = {}
    for request in requests:
        try:
            engine.add_request(request)
            results[request.choice] = ([], None)
        except ServiceError as error:  # refused at once (a grammar known to fail), or after a step
            results[request.choice] = ([], error)
    steps = 0
    while engine.has_unfinished() and (abort_after is None or steps < abort_after):
        for output in engine.step():
            tokens, _ = results[output.choice]
            results[output.choice] = (tokens + output.new_token_ids, output.finish_reason)
        for choice, error in engine.pop_refused().items():
            results[choice] = (results[choice][0], error)
        steps += 1
    return results


def choices(name: str, grammar: str, seeds: list[int], n: int = 4, prompt: list[int] = PROMPT,
            **params) -> list[EngineRequest]:
    """`n` choices per seed, seeded seed + j as the stage seeds a request's choices."""
    return [EngineRequest(ChoiceId(f"{name}-{seed}", j), prompt,
                          SamplingParams(seed=seed + j, grammar=grammar, **{"max_tokens": 400, **params}))
            for seed in seeds for j in range(n)]


def test_a_nested_schema_always_parses_and_validates(engine, tokenizer):
    results = run(engine, choices("nested", NESTED_GRAMMAR, seeds=list(range(0, 80, 10))))
    for choice, (tokens, reason) in results.items():
        assert reason is FinishReason.STOP, (choice, reason)
        assert EOS not in tokens  # the sequence ends where the grammar completes, not with a sampled EOS
        # The const decodes to its quote, backslash and newline whichever escapes the model chose for them
        # (\n or \u000a, both seen).
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), NESTED)
    distinct = {tuple(tokens) for tokens, _ in results.values()}
    assert len(distinct) == len(results), "test design: the outputs should differ"
    assert engine.sampler.grammars.num_held == 0


def test_json_object_parses_whenever_it_completes(engine, tokenizer):
    results = run(engine, choices("object", OBJECT_GRAMMAR, seeds=list(range(12)), max_tokens=48))
    completed = 0
    for tokens, reason in results.values():
        text = tokenizer.decode(tokens)
        assert text.lstrip().startswith("{")
        if reason is FinishReason.STOP:
            assert isinstance(json.loads(text), dict)
            completed += 1
        else:
            assert reason is FinishReason.LENGTH and len(tokens) == 48  # cut by max_tokens, as OpenAI says
    assert completed >= 5, "test design: some objects should complete (the random model writes long strings)"


def test_forced_tool_calls_parse_and_name_offered_functions(engine, tokenizer):
    tools = [Tool.model_validate(tool) for tool in TOOLS]
    for fields, names in [({"tool_choice": {"type": "function", "function": {"name": "add"}}}, {"add"}),
                          ({"tool_choice": "required", "parallel_tool_calls": False}, {"get_weather", "add"}),
                          ({"tool_choice": "required"}, {"get_weather", "add"})]:
        results = run(engine, choices("tools", grammar_for(tools=TOOLS, **fields), seeds=[1, 2]))
        for tokens, reason in results.values():
            text = tokenizer.decode(tokens)
            if reason is FinishReason.LENGTH:
                # One or more calls: the random model may go on adding calls to its list.
                assert fields.get("parallel_tool_calls", True) and text.startswith("[{"), (fields, text)
                continue
            assert reason is FinishReason.STOP, (fields, text)
            calls = parse_tool_calls(text, tools)
            assert calls and {call.function.name for call in calls} <= names, text
            several_allowed = fields.get("parallel_tool_calls", True) and fields["tool_choice"] == "required"
            assert len(calls) == 1 or several_allowed


def test_max_tokens_cuts_a_grammar_with_length(engine, tokenizer):
    ((tokens, reason),) = run(engine, choices("cut", NESTED_GRAMMAR, seeds=[3], n=1, max_tokens=6)).values()
    assert reason is FinishReason.LENGTH and len(tokens) == 6
    assert tokenizer.decode(tokens).startswith('{"name": "')


def test_grammar_state_survives_preemption_and_prefix_cache_hits(tiny_checkpoint, engine):
    prompts = _random_prompts(8, seed=5, low=40, high=90)
    requests = [EngineRequest(ChoiceId(f"p{i}", 0), prompt, SamplingParams(max_tokens=300, temperature=0.0,
                                                                             grammar=NESTED_GRAMMAR))
                for i, prompt in enumerate(prompts)]
    expected = run(engine, requests)
    small = _small_cache_engine(tiny_checkpoint)
    try:
        preempted = run(small, requests)
        assert small.num_preemptions > 0
        assert preempted == expected  # a resumed sequence's matcher had consumed exactly its output tokens
        assert small.sampler.grammars.num_held == 0
    finally:
        small.shutdown()
    hits = engine.scheduler.prefix_hit_tokens
    again = run(engine, requests)  # the same prompts: their blocks come from the prefix cache
    assert engine.scheduler.prefix_hit_tokens > hits and again == expected
    assert all(reason is FinishReason.STOP for _, reason in expected.values())


def test_abort_frees_the_matcher_whether_running_or_waiting_for_its_grammar(engine):
    run(engine, choices("abort", NESTED_GRAMMAR, seeds=[0]), abort_after=3)
    assert engine.sampler.grammars.num_held == 4
    for j in range(4):
        assert engine.abort_request(ChoiceId("abort-0", j))
    fresh = grammar_for(response_format={"type": "json_schema", "json_schema": {
        "name": "fresh", "schema": {"type": "object", "properties": {"never_seen": {"type": "boolean"}}}}})
    engine.add_request(EngineRequest(ChoiceId("preparing", 0), PROMPT,
                                     SamplingParams(max_tokens=5, grammar=fresh)))
    assert engine.stats().num_sequences_waiting == 1
    assert engine.abort_request(ChoiceId("preparing", 0))
    assert not engine.has_unfinished() and engine.stats().num_sequences_waiting == 0
    assert engine.sampler.grammars.num_held == 0
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_a_seeded_grammar_request_draws_the_same_tokens_in_any_batch(engine):
    target = EngineRequest(ChoiceId("target", 0), PROMPT, SamplingParams(
        max_tokens=300, temperature=0.9, top_p=0.95, seed=1234, grammar=NESTED_GRAMMAR))
    alone = run(engine, [target])[target.choice]
    others = [
        *choices("g", NESTED_GRAMMAR, seeds=[7], n=2),
        *choices("o", OBJECT_GRAMMAR, seeds=[8], n=1, max_tokens=30),
        EngineRequest(ChoiceId("free", 0), _random_prompts(1, seed=3)[0], SamplingParams(max_tokens=40)),
        EngineRequest(ChoiceId("greedy", 0), PROMPT, SamplingParams(max_tokens=40, temperature=0.0)),
        EngineRequest(ChoiceId("unseeded", 0), PROMPT, SamplingParams(max_tokens=60, grammar=NESTED_GRAMMAR)),
    ]
    batched = run(engine, [*others[:3], target, *others[3:]])
    assert batched[target.choice] == alone
    assert alone[1] is FinishReason.STOP


def test_the_same_grammar_is_prepared_once_and_the_cache_is_bounded(engine, monkeypatch):
    built: list[str] = []
    build = GrammarCompiler._build

    def counting_build(self, grammar):
        built.append(grammar)
        return build(self, grammar)

    monkeypatch.setattr(GrammarCompiler, "_build", counting_build)
    distinct = [grammar_for(response_format={"type": "json_schema", "json_schema": {
        "name": "g", "schema": {"type": "object", "properties": {f"k{i}": {"type": "boolean"}},
                                "required": [f"k{i}"], "additionalProperties": False}}}) for i in range(3)]
    run(engine, choices("once", distinct[0], seeds=[0, 1]))  # 8 sequences, one grammar
    assert built == [distinct[0]]
    compiler = GrammarCompiler(engine.grammars.tokenizer_path, engine.grammars.vocab_size,
                               engine.grammars.eos_token_ids, cache_size=2)
    try:
        for grammar in [*distinct, distinct[2], distinct[0]]:
            compiler.prepare(grammar).result()
        assert compiler.num_cached == 2
        assert built[1:] == [*distinct, distinct[0]]  # the least recently used one was evicted, then rebuilt
    finally:
        compiler.shutdown()


def test_a_grammar_the_engine_cannot_prepare_refuses_that_request_alone(engine):
    bad = EngineRequest(ChoiceId("bad", 0), PROMPT,
                        SamplingParams(max_tokens=5, grammar='start: %json {"type": 7}'))
    plain = EngineRequest(ChoiceId("plain", 0), PROMPT, SamplingParams(max_tokens=5))
    results = run(engine, [bad, plain])
    assert isinstance(results[bad.choice][1], InvalidRequestError)
    assert results[plain.choice] == (results[plain.choice][0], FinishReason.LENGTH)
    assert not engine.has_unfinished()


def test_a_batch_without_grammar_rows_does_no_grammar_work(engine, monkeypatch):
    run(engine, choices("before", NESTED_GRAMMAR, seeds=[0], n=1))  # the engine has served a grammar before

    def no_grammar_work(*args, **kwargs):
        raise AssertionError("grammar work in a batch without a grammar")

    for name in ("fill", "accept", "add"):
        monkeypatch.setattr(GrammarTable, name, no_grammar_work)
    monkeypatch.setattr(GrammarCompiler, "prepare", no_grammar_work)
    results = run(engine, [EngineRequest(ChoiceId(f"free{i}", 0), prompt, SamplingParams(max_tokens=8, seed=i))
                           for i, prompt in enumerate(_random_prompts(4, seed=9))])
    assert all(reason is FinishReason.LENGTH for _, reason in results.values())


def test_without_the_library_the_engine_serves_free_text_and_refuses_grammars(tiny_checkpoint):
    """In a fresh interpreter: free text never imports llguidance; where it cannot be imported, a grammar
    request is refused with the 503 that says so."""
    script = textwrap.dedent(f"""
        import sys
        from serve_app.engine.sampling_params import SamplingParams
        from serve_app.engine.sequence import ChoiceId, EngineRequest
        from serve_app.errors import GrammarUnavailableError
        from tests.unit.test_engine import _engine
        engine = _engine({str(tiny_checkpoint)!r})
        try:
            engine.add_request(EngineRequest(ChoiceId("free", 0), [1, 15043], SamplingParams(max_tokens=4)))
            while engine.has_unfinished():
                engine.step()
            assert "llguidance" not in sys.modules, "free text imported the grammar library"
            sys.modules["llguidance"] = None  # as if it were not installed
            refused = {{}}
            try:  # refused at once, or after a step, depending on how soon the grammar's thread gets to it
                engine.add_request(EngineRequest(ChoiceId("json", 0), [1, 15043],
                                                 SamplingParams(max_tokens=4, grammar={OBJECT_GRAMMAR!r})))
            except GrammarUnavailableError as error:
                refused[ChoiceId("json", 0)] = error
            while engine.has_unfinished():
                engine.step()
                refused.update(engine.pop_refused())
            assert isinstance(refused[ChoiceId("json", 0)], GrammarUnavailableError), refused
        finally:
            engine.shutdown()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
