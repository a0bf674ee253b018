"""Structured outputs and tool calls through the real app (see conftest.py), as a user of the `openai` client
sees them: JSON that parses and validates, streamed and not, n = 4; `chat.completions.parse` with pydantic
models; forced tool calls; completions with a response format; and the 400s for what cannot be enforced.

The tiny model's weights are random, so every schema here bounds its strings and numbers: a free string
would run on until max_tokens."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import EDGE_KEY, EDGE_PREFIX

pytestmark = pytest.mark.integration

MODEL = "tiny-llama-2-chat"
HELLO = [{"role": "user", "content": "Describe an item as JSON."}]
ITEM = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "maxLength": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["tool", "toy", "food"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "size": {"type": "object", "properties": {"w": {"type": "integer", "minimum": 1, "maximum": 9}},
                 "required": ["w"], "additionalProperties": False},
    },
    "required": ["label", "count", "kind", "size"],
    "additionalProperties": False,
}
ITEM_FORMAT = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM, "strict": True}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a"], "additionalProperties": False}}}


class Item(BaseModel):
    label: str = Field(max_length=8)
    count: int = Field(ge=0, le=99)
    kind: Literal["tool", "toy", "food"]
    tags: list[Annotated[str, Field(max_length=4)]] = Field(max_length=2)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tp1(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/tp1/v1", api_key="unused", max_retries=0)


def streamed_choices(stream) -> tuple[dict[int, str], dict[int, str], dict[int, list]]:
    """Each choice's content, finish reason and tool-call deltas, from a chat stream."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    calls: dict[int, list] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            calls.setdefault(choice.index, []).extend(choice.delta.tool_calls or [])
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, calls


def text_choices(client: openai.OpenAI, stream: bool, request: dict) -> tuple[dict[int, str], dict[int, str]]:
    """Each choice's content and finish reason, streamed or from one body."""
    if stream:
        texts, reasons, _ = streamed_choices(client.chat.completions.create(**request, stream=True))
        return texts, reasons
    completion = client.chat.completions.create(**request)
    return ({c.index: c.message.content for c in completion.choices},
            {c.index: c.finish_reason for c in completion.choices})


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_parses_and_validates(client, stream):
    request = {"model": MODEL, "messages": HELLO, "response_format": ITEM_FORMAT, "n": 4, "seed": 7,
               "max_tokens": 300}
    texts, reasons = text_choices(client, stream, request)
    assert sorted(texts) == [0, 1, 2, 3] and set(reasons.values()) == {"stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), ITEM)
    assert len(set(texts.values())) == 4, "test design: the four choices sample differently"


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_output_is_an_object_whenever_it_completes(tp1, stream):
    request = {"model": MODEL, "messages": HELLO, "response_format": {"type": "json_object"}, "n": 4, "seed": 3,
               "max_tokens": 40}
    texts, reasons = text_choices(tp1, stream, request)
    assert sorted(texts) == [0, 1, 2, 3]
    for index, text in texts.items():
        assert text.lstrip().startswith("{")
        if reasons[index] == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert reasons[index] == "length"  # a long string cut by max_tokens, as OpenAI reports it


def test_parse_with_a_pydantic_model_returns_the_object(client):
    completion = client.chat.completions.parse(model=MODEL, messages=HELLO, response_format=Item, seed=11,
                                               max_tokens=300, n=2)
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Item)
        assert Item.model_validate_json(choice.message.content) == choice.message.parsed


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_parses_and_names_the_function(tp1, stream):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}],
               "tools": [WEATHER, ADD], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
               "n": 2, "seed": 5, "max_tokens": 200}
    if stream:
        texts, reasons, deltas = streamed_choices(tp1.chat.completions.create(**request, stream=True))
        calls = {index: [(d.function.name, d.function.arguments) for d in found]
                 for index, found in deltas.items()}
        assert all(not text for text in texts.values())
    else:
        completion = tp1.chat.completions.create(**request)
        reasons = {c.index: c.finish_reason for c in completion.choices}
        calls = {c.index: [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
                 for c in completion.choices}
        assert all(c.message.content is None for c in completion.choices)
    assert set(reasons.values()) == {"tool_calls"}
    for found in calls.values():
        ((name, arguments),) = found
        assert name == "get_weather"
        jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_tool_choice_required_and_parse_with_a_pydantic_tool(tp1):
    class Add(BaseModel):
        a: int = Field(ge=0, le=9)

    completion = tp1.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Add."}],
        tools=[openai.pydantic_function_tool(Add)], tool_choice="required", parallel_tool_calls=False, seed=2, max_tokens=100)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "Add" and isinstance(call.function.parsed_arguments, Add)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_take_a_response_format(client, stream):
    request = {"model": MODEL, "prompt": ["An item:", "Another item:"], "n": 2, "seed": 9, "max_tokens": 300,
               "extra_body": {"response_format": ITEM_FORMAT}}
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for response in (client.completions.create(**request, stream=True) if stream
                     else [client.completions.create(**request)]):
        for choice in response.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert sorted(texts) == [0, 1, 2, 3] and set(reasons.values()) == {"stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), ITEM)


@pytest.mark.parametrize("body, param, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}},
     "response_format.json_schema.schema", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", "objekt"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": "not a schema"}}},
     "response_format.json_schema.schema", "dictionary"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice", "get_time"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
     "tools.0.function.parameters", "not"),
])
def test_what_cannot_be_enforced_is_a_400_with_param(server, body, param, says):
    for route, payload in (("chat/completions", {"messages": HELLO}), ("completions", {"prompt": "x"})):
        if "tools" in body and route == "completions":
            continue
        response = httpx.post(f"{server}{EDGE_PREFIX}/v1/{route}", json={"model": MODEL, **payload, **body},
                              headers={"Authorization": f"Bearer {EDGE_KEY}"}, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and says in error["message"]
        assert error["type"] == "invalid_request_error"
