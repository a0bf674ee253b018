"""Unit tests of the OpenAI wire format: request validation, defaults, and response shapes.

Responses are checked against the official `openai` client's own types, the strictest reader we have.
"""

import json
from typing import Any

import openai.types
import openai.types.chat
import pytest
from pydantic import ValidationError

from serve_app.engine.sampling_params import SamplingParams
from serve_app.errors import from_validation_error
from serve_app.protocol import (
    MAX_N,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionRequest,
    DeltaMessage,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
    completion_id,
)

MODEL = "meta-llama/Llama-2-7b-chat-hf"

# The three example requests of the hosted API's reference.
REFERENCE_HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}]}
REFERENCE_CHEF = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "Respond like a michelin starred chef."},
        {"role": "user", "content": "Can you name at least two different techniques to cook lamb?"},
        {
            "role": "assistant",
            "content": "Bonjour! Let me tell you, my friend, cooking lamb is an art form, and I'm more than "
            "happy to share with you not two, but three of my favorite techniques to coax out the rich, "
            "unctuous flavors and tender textures of this majestic protein. First, we have the classic "
            '"Sous Vide" method. Next, we have the ancient art of "Sous le Sable". And finally, we have '
            'the more modern technique of "Hot Smoking."',
        },
        {"role": "user", "content": "Tell me more about the second method."},
    ],
}
REFERENCE_STREAM = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Hello!"}]}

USER = [{"role": "user", "content": "Hi"}]


def parse(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": USER, **fields})


def rejected_param(body: dict[str, Any]) -> str | None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    return from_validation_error(info.value).param


# ---------------------------------------------------------------------------------------------- request


@pytest.mark.parametrize("body", [REFERENCE_HELLO, REFERENCE_CHEF, REFERENCE_STREAM])
def test_reference_examples_parse(body: dict[str, Any]) -> None:
    request = ChatCompletionRequest.model_validate_json(json.dumps(body))
    assert request.model == MODEL
    assert [m.role for m in request.messages] == [m["role"] for m in body["messages"]]
    assert [m.content for m in request.messages] == [m["content"] for m in body["messages"]]
    assert request.stream is body.get("stream", False)


def test_defaults_equal_the_reference() -> None:
    request = ChatCompletionRequest.model_validate(REFERENCE_HELLO)
    assert request.temperature == 1
    assert request.top_p == 1
    assert request.min_p == 0
    assert request.top_k == 0
    assert request.presence_penalty == 0
    assert request.frequency_penalty == 0
    assert request.repetition_penalty == 1
    assert request.max_tokens is None
    assert request.seed is None
    assert request.stop is None
    assert request.n == 1
    assert request.logprobs is False
    assert request.top_logprobs is None
    assert request.logit_bias is None
    assert request.stream is False
    assert request.stream_options is None
    assert request.tools is None
    assert request.tool_choice is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1000}, "top_k"),
        ({"top_k": 5.0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 10, "max_completion_tokens": 20}, "max_completion_tokens"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": 2.01}, "frequency_penalty"),
        ({"repetition_penalty": 0.009}, "repetition_penalty"),
        ({"repetition_penalty": 5.01}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", ""]}, "stop.1"),
        ({"stop": [1]}, "stop.0"),
        ({"stop": 5}, "stop"),
        ({"n": 0}, "n"),
        ({"n": MAX_N + 1}, "n"),
        ({"n": 1.5}, "n"),
        ({"n": True}, "n"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"abc": 1}}, "logit_bias.abc"),
        ({"logit_bias": {"-1": 1}}, "logit_bias.-1"),
        ({"logit_bias": {"²": 1}}, "logit_bias.²"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias.5"),
        ({"logit_bias": {"5": "1"}}, "logit_bias.5"),
        ({"logit_bias": [5]}, "logit_bias"),
        ({"user": 5}, "user"),
        ({"stream": "true"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
        ({"tool_choice": "auto"}, "tool_choice"),
        (
            {
                "tools": [{"function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"tools": [{"function": {"name": "f"}}], "tool_choice": {"type": "function"}}, "tool_choice.function"),
        ({"tools": [{"function": {"name": "f"}}], "tool_choice": {"function": {"name": "f"}}}, "tool_choice.type"),
        ({"tools": [{"function": {"name": "f"}}], "tool_choice": "any"}, "tool_choice"),
        ({"tools": [{"function": {"name": "f"}}], "tool_choice": ["auto"]}, "tool_choice"),
        ({"tools": [{"function": {"name": "f"}}], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_object", "json_schema": {"name": "a", "schema": {}}}},
         "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": True}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": 1}}},
         "response_format.json_schema.strict"),
        ({"model": None}, "model"),
        ({"model": 7}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "Hello"}, "messages"),
        ({"messages": [{"role": "developer", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content.0"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]},
            "messages.0.content.1.text",
        ),
        ({"messages": [*USER, {"role": "tool", "content": "42"}]}, "messages.1.tool_call_id"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            "messages.0.tool_calls",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
            "messages.0.tool_calls.0.function",
        ),
    ],
)
def test_invalid_field_is_named(fields: dict[str, Any], param: str) -> None:
    assert rejected_param({"model": MODEL, "messages": USER, **fields}) == param


def test_missing_required_fields_are_named() -> None:
    assert rejected_param({"messages": USER}) == "model"
    assert rejected_param({"model": MODEL}) == "messages"


def test_json_body_is_strict_too() -> None:
    body = json.dumps({"model": MODEL, "messages": USER, "n": 1.0})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate_json(body)
    assert ChatCompletionRequest.model_validate_json(body.replace("1.0", "2")).n == 2


def test_boundary_values_are_accepted() -> None:
    request = parse(
        temperature=0,
        top_p=1,
        min_p=1,
        top_k=999,
        presence_penalty=-2,
        frequency_penalty=2,
        repetition_penalty=0.01,
        seed=2**63 - 1,
        n=MAX_N,
        logprobs=True,
        top_logprobs=20,
        logit_bias={"0": -100, "31999": 100},
        max_tokens=1,
    )
    assert request.temperature == 0.0
    assert isinstance(request.temperature, float)
    assert request.logit_bias == {"0": -100.0, "31999": 100.0}


def test_null_means_the_default() -> None:
    request = parse(temperature=None, top_p=None, n=None, stream=None, logprobs=None, stop=None, seed=None)
    assert (request.temperature, request.top_p, request.n, request.stream, request.logprobs) == (
        1.0,
        1.0,
        1,
        False,
        False,
    )


def test_unknown_fields_are_ignored() -> None:
    request = parse(store=False, metadata={"a": "b"}, service_tier="auto")
    assert not hasattr(request, "store")


def test_single_stop_string_becomes_a_list() -> None:
    assert parse(stop="\n\n").stop == ["\n\n"]
    assert parse(stop=["a", "b"]).stop == ["a", "b"]


def test_max_completion_tokens_folds_into_max_tokens() -> None:
    assert parse(max_completion_tokens=50).max_tokens == 50
    assert parse(max_tokens=50, max_completion_tokens=50).max_tokens == 50
    assert parse(max_tokens=50).max_tokens == 50


def test_text_parts_are_joined() -> None:
    content = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    request = parse(messages=[{"role": "user", "content": content}])
    assert request.messages[0].content == "Hello\nthere"


def test_tool_conversation_parses() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    request = parse(messages=messages, tools=tools, tool_choice="auto")
    assert request.messages[1].content is None
    assert request.messages[1].tool_calls is not None
    assert request.messages[1].tool_calls[0].function.name == "weather"
    assert request.tool_choice == "auto"


def test_accepted_combinations() -> None:
    assert parse(stream=True, stream_options={"include_usage": True}).stream_options.include_usage
    assert parse(logprobs=True, top_logprobs=0).top_logprobs == 0
    assert parse(response_format={"type": "text"}).response_format is not None
    assert parse(tools=[{"function": {"name": "f"}}], tool_choice="none").tool_choice == "none"


def test_structured_output_fields() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = parse(response_format={"type": "json_schema",
                                     "json_schema": {"name": "thing-1", "schema": schema, "strict": True}})
    assert request.wants_json and request.response_format.json_schema.json_schema == schema
    assert parse(response_format={"type": "json_object"}).wants_json
    assert not parse(response_format={"type": "text"}).wants_json and not parse().wants_json
    tools = [{"function": {"name": "f"}}, {"function": {"name": "g"}}]
    named = parse(tools=tools, tool_choice={"type": "function", "function": {"name": "g"}})
    assert named.forced_tool == "g" and named.uses_tools and named.parallel_tool_calls
    required = parse(tools=tools, tool_choice="required", parallel_tool_calls=False)
    assert required.forced_tool is None and required.uses_tools and not required.parallel_tool_calls
    completion = CompletionRequest.model_validate({"model": MODEL, "prompt": "x",
                                                   "response_format": {"type": "json_object"}})
    assert completion.wants_json


def test_to_sampling_params() -> None:
    request = parse(
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        seed=7,
        logit_bias={"15043": 5, "2": -100},
        logprobs=True,
        top_logprobs=3,
        max_tokens=100,
        stop=["\n"],
    )
    assert request.to_sampling_params(max_tokens=64) == SamplingParams(
        max_tokens=64,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        seed=7,
        logit_bias={15043: 5.0, 2: -100.0},
        logprobs=True,
        top_logprobs=3,
        stop=("\n",),  # matched on text by the replica and the stage
    )
    assert parse().to_sampling_params(max_tokens=10) == SamplingParams(max_tokens=10)


# --------------------------------------------------------------------------------------------- response


def logprobs() -> ChoiceLogprobs:
    top = [
        TopLogprob(token=" Hi", logprob=-0.1, bytes=[32, 72, 105]),
        TopLogprob(token="!", logprob=-2.5, bytes=[33]),
    ]
    return ChoiceLogprobs(
        content=[TokenLogprob(token=" Hi", logprob=-0.1, bytes=[32, 72, 105], top_logprobs=top)]
    )


def test_response_validates_with_the_openai_client() -> None:
    response = ChatCompletionResponse(
        model=MODEL,
        choices=[
            ChatCompletionChoice(
                index=0, message=ChatCompletionMessage(content=" Hello!"), finish_reason="stop"
            ),
            ChatCompletionChoice(
                index=1,
                message=ChatCompletionMessage(content=" Hi"),
                logprobs=logprobs(),
                finish_reason="length",
            ),
        ],
        usage=Usage.from_counts(15, 16, 1e-7, 1.3e-6),
    )
    data = json.loads(response.model_dump_json())
    parsed = openai.types.chat.ChatCompletion.model_validate(data)
    assert parsed.id.startswith("chatcmpl-")
    assert parsed.object == "chat.completion"
    assert parsed.choices[0].message.content == " Hello!"
    assert parsed.choices[1].logprobs is not None
    assert parsed.choices[1].logprobs.content is not None
    assert parsed.choices[1].logprobs.content[0].top_logprobs[1].token == "!"
    assert parsed.usage is not None and parsed.usage.total_tokens == 31
    assert data["usage"]["estimated_cost"] == 2.23e-05
    # OpenAI leaves tool_calls out when there are none, but sends logprobs as null.
    assert data["choices"][0]["message"] == {"role": "assistant", "content": " Hello!"}
    assert data["choices"][0]["logprobs"] is None


def test_reference_response_parses() -> None:
    reference = {
        "id": "chatcmpl-guMTxWgpFf",
        "object": "chat.completion",
        "created": 1694623155,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " Hello! It's nice to meet you."},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 15,
            "completion_tokens": 16,
            "total_tokens": 31,
            "estimated_cost": 0.0000268,
        },
    }
    response = ChatCompletionResponse.model_validate(reference)
    assert response.model_dump(exclude={"choices": {0: {"logprobs"}}}) == reference


def test_chunks_validate_with_the_openai_client() -> None:
    cid, created = completion_id(), 1694623354
    chunks = [
        ChatCompletionChunk(
            id=cid,
            created=created,
            model=MODEL,
            choices=[ChatCompletionChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=" Hi"))],
        ),
        ChatCompletionChunk(
            id=cid,
            created=created,
            model=MODEL,
            choices=[
                ChatCompletionChunkChoice(index=0, delta=DeltaMessage(content="!"), logprobs=logprobs())
            ],
        ),
        ChatCompletionChunk(
            id=cid,
            created=created,
            model=MODEL,
            choices=[ChatCompletionChunkChoice(index=0, delta=DeltaMessage(), finish_reason="stop")],
        ),
        ChatCompletionChunk(
            id=cid, created=created, model=MODEL, choices=[],
            usage=Usage.from_counts(3, 2, 0, 0, cached_tokens=1),
        ),
    ]
    data = [json.loads(chunk.model_dump_json()) for chunk in chunks]
    for item in data:
        parsed = openai.types.chat.ChatCompletionChunk.model_validate(item)
        assert parsed.id == cid
        assert parsed.object == "chat.completion.chunk"
    assert data[0]["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": " Hi"},
        "logprobs": None,
        "finish_reason": None,
    }
    assert "usage" not in data[0]
    assert data[2]["choices"][0]["delta"] == {}
    assert data[2]["choices"][0]["finish_reason"] == "stop"
    assert data[3]["choices"] == []
    assert data[3]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1},
        "estimated_cost": 0.0,
    }
    usage = openai.types.chat.ChatCompletionChunk.model_validate(data[3]).usage
    assert usage is not None and usage.prompt_tokens_details.cached_tokens == 1


def test_completion_ids_are_unique() -> None:
    assert completion_id() != completion_id()
    assert ChatCompletionResponse(model=MODEL, choices=[], usage=Usage.from_counts(0, 0, 0, 0)).id.startswith(
        "chatcmpl-"
    )


def test_usage_from_counts() -> None:
    usage = Usage.from_counts(149, 338, 7e-8, 9e-7)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (149, 338, 487)
    assert usage.estimated_cost == pytest.approx(149 * 7e-8 + 338 * 9e-7, abs=1e-10)
    assert isinstance(usage.estimated_cost, float)
    assert usage.prompt_tokens_details.cached_tokens == 0


def test_cached_prompt_tokens_are_priced_apart_and_default_to_the_input_price() -> None:
    usage = Usage.from_counts(149, 338, 7e-8, 9e-7, cached_tokens=128, cached_input_price_per_token=1e-8)
    assert usage.prompt_tokens == 149 and usage.prompt_tokens_details.cached_tokens == 128
    assert usage.estimated_cost == pytest.approx(21 * 7e-8 + 128 * 1e-8 + 338 * 9e-7, abs=1e-10)
    unpriced = Usage.from_counts(149, 338, 7e-8, 9e-7, cached_tokens=128)
    assert unpriced.estimated_cost == Usage.from_counts(149, 338, 7e-8, 9e-7).estimated_cost


def test_model_list_validates_with_the_openai_client() -> None:
    card = ModelCard(id=MODEL, owned_by="llama-serve", root=MODEL, max_model_len=4096)
    data = json.loads(ModelList(data=[card]).model_dump_json())
    assert data["object"] == "list"
    parsed = openai.types.Model.model_validate(data["data"][0])
    assert (parsed.id, parsed.object, parsed.owned_by) == (MODEL, "model", "llama-serve")
    assert data["data"][0]["max_model_len"] == 4096
