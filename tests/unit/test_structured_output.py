"""The stage's structured outputs (`serve_app/stage/structured_output.py`), without an engine: the grammar a
request gets, what that grammar accepts (checked with llguidance's own matcher on the Llama 2 tokenizer), and
the 400s for schemas that cannot be enforced, before any engine work."""

from __future__ import annotations

import asyncio
import json
import sys
import threading

import llguidance
import llguidance.hf
import pytest
from transformers import PreTrainedTokenizerFast

from serve_app.config import ModelConfig, PricingConfig
from serve_app.errors import GrammarUnavailableError, InvalidSchemaError, http_error
from serve_app.protocol import ChatCompletionRequest, CompletionRequest
from serve_app.stage import structured_output
from serve_app.stage.processor import ChatProcessor
from serve_app.stage.structured_output import request_grammar

MODEL = "tiny"
USER = [{"role": "user", "content": "Hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: no arguments
# A tool whose arguments refer to their own $defs, as pydantic writes them.
REFS = {"type": "function", "function": {"name": "ship", "parameters": {
    "$defs": {"Size": {"enum": ["s", "m"]}}, "type": "object", "properties": {"size": {"$ref": "#/$defs/Size"}},
    "required": ["size"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def accepts(tokenizer):
    """`accepts(grammar, text)`: whether `text`, tokenized as the model would write it, is a whole output of
    `grammar` (every token consumed and the grammar complete or able to end there)."""
    lexicon = llguidance.hf.from_tokenizer(tokenizer)

    def check(grammar: str, text: str) -> bool:
        assert llguidance.LLMatcher.validate_grammar(grammar, lexicon) == ""
        matcher = llguidance.LLMatcher(lexicon, grammar, log_level=0)
        tokens = tokenizer.encode(text, add_special_tokens=False) if text else []
        return matcher.consume_tokens(tokens) and matcher.is_accepting()

    return check


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": USER, **fields})


def schema_format(schema: dict, name: str = "thing") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def call(name: str, arguments: dict) -> dict:
    return {"name": name, "arguments": arguments}


def test_free_text_has_no_grammar():
    assert request_grammar(chat()) is None
    assert request_grammar(chat(response_format={"type": "text"})) is None
    assert request_grammar(chat(tools=[WEATHER], tool_choice="none")) is None


def test_json_object_accepts_objects_only_with_fixed_separators(accepts):
    grammar = request_grammar(chat(response_format={"type": "json_object"}))
    assert accepts(grammar, '{"a": [1, 2.5, "x\\"y"], "b": {"c": null}}')
    assert accepts(grammar, "{}")
    for wrong in ("[1]", '"text"', '{"a":1}', '{"a": 1,  "b": 2}', "{\n}", "hello"):
        assert not accepts(grammar, wrong), wrong


def test_json_schema_is_enforced(accepts):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "tag": {"enum": ["a", "b"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    grammar = request_grammar(chat(response_format=schema_format(schema)))
    assert accepts(grammar, '{"n": 3, "tag": "b"}')
    for wrong in ('{"n": 10, "tag": "b"}', '{"n": 3}', '{"tag": "b", "n": 3}', '{"n": 3, "tag": "c"}',
                  '{"n": 3, "tag": "a", "x": 1}'):
        assert not accepts(grammar, wrong), wrong
    completion = CompletionRequest.model_validate({"model": MODEL, "prompt": "x",
                                                   "response_format": schema_format(schema)})
    assert request_grammar(completion) == grammar


def test_tool_choice_auto_allows_text_or_calls_of_offered_functions(accepts):
    grammar = request_grammar(chat(tools=[WEATHER, NOW, REFS]))
    for reply in (call("get_weather", {"city": "Paris"}), call("now", {}), call("ship", {"size": "m"}),
                  [call("now", {}), call("get_weather", {"city": "Rome", "unit": "c"})]):
        assert accepts(grammar, json.dumps(reply)), reply
    assert accepts(grammar, "Sure, it is sunny {really}.")
    assert accepts(grammar, "  \n  Two spaces first, as Llama 2 chat often writes.")
    for wrong in (call("nope", {}), call("now", {"x": 1}), call("ship", {"size": "xl"}),
                  call("get_weather", {"unit": "c"}), "```json", "  [1, 2]"):
        text = wrong if isinstance(wrong, str) else json.dumps(wrong)
        assert not accepts(grammar, text), text


def test_tool_choice_required_and_named_allow_only_calls(accepts):
    required = request_grammar(chat(tools=[WEATHER, NOW], tool_choice="required"))
    assert accepts(required, json.dumps(call("now", {})))
    assert accepts(required, json.dumps([call("now", {}), call("now", {})]))
    assert not accepts(required, "No call.")
    single = request_grammar(chat(tools=[WEATHER, NOW], tool_choice="required", parallel_tool_calls=False))
    assert accepts(single, json.dumps(call("get_weather", {"city": "Oslo"})))
    assert not accepts(single, json.dumps([call("now", {})]))
    named = request_grammar(chat(tools=[WEATHER, NOW],
                                 tool_choice={"type": "function", "function": {"name": "now"}}))
    assert accepts(named, json.dumps(call("now", {})))
    assert not accepts(named, json.dumps(call("get_weather", {"city": "Oslo"})))
    assert not accepts(named, json.dumps([call("now", {})]))


def test_tools_beside_a_response_format_answer_with_either(accepts):
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
              "additionalProperties": False}
    grammar = request_grammar(chat(tools=[NOW], response_format=schema_format(schema)))
    assert accepts(grammar, '{"answer": true}')
    assert accepts(grammar, json.dumps(call("now", {})))
    assert not accepts(grammar, "Plain text.")


@pytest.mark.parametrize("schema, named", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": "objekt"}, "objekt"),
    ({"type": "string", "format": "postcode"}, "postcode"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_the_feature(schema, named):
    with pytest.raises(InvalidSchemaError) as error:
        request_grammar(chat(response_format=schema_format(schema, name="my_format")))
    assert error.value.param == "response_format.json_schema.schema"
    assert named in error.value.message and "'my_format'" in error.value.message
    assert http_error(error.value).status_code == 400


def test_a_tool_schema_that_cannot_be_enforced_names_its_tool():
    bad = {"type": "function", "function": {"name": "bad", "parameters": {"type": "objekt"}}}
    with pytest.raises(InvalidSchemaError) as error:
        request_grammar(chat(tools=[WEATHER, bad]))
    assert error.value.param == "tools.1.function.parameters" and "'bad'" in error.value.message


def test_without_the_library_a_constrained_request_is_a_503(monkeypatch):
    structured_output._schema_problem.cache_clear()
    monkeypatch.setitem(sys.modules, "llguidance", None)  # what `import llguidance` meets where it is missing
    try:
        with pytest.raises(GrammarUnavailableError) as error:
            request_grammar(chat(response_format=schema_format({"type": "object"})))
        assert "llguidance" in error.value.message and http_error(error.value).status_code == 503
        assert request_grammar(chat()) is None  # free text needs no library
    finally:
        structured_output._schema_problem.cache_clear()


def test_the_stage_checks_schemas_off_its_event_loop(tokenizer, monkeypatch):
    threads, seen = [], []
    check = structured_output.check_schema

    def recording_check(*args):
        threads.append(threading.current_thread())
        check(*args)

    monkeypatch.setattr(structured_output, "check_schema", recording_check)

    async def generate(requests, affinity):
        seen.extend(requests)
        for request in requests:
            yield [_output(request)]

    stage = ChatProcessor(tokenizer, ModelConfig(source="x", served_model_id=MODEL, max_model_len=512),
                          PricingConfig(), generate)
    request = chat(response_format=schema_format({"type": "object"}), n=2)

    async def run():
        return [event async for batch in stage.chat(request) for event in batch]

    asyncio.run(run())
    assert threads and all(thread is not threading.main_thread() for thread in threads)
    assert len(seen) == 2 and all(r.params.grammar == request_grammar(request) for r in seen)


def _output(request):
    from serve_app.engine.sequence import FinishReason, RequestOutput

    return RequestOutput(request.choice, [29912], FinishReason.STOP)
