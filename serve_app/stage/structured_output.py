"""Structured outputs in the stage: the grammar a request's output must follow, checked before the engine.

In: a validated request: its `response_format` (chat and text completions) and, for chat, its `tools`,
`tool_choice` and `parallel_tool_calls`. Out: the grammar the engine decodes under
(`SamplingParams.grammar`), as text in llguidance's Lark dialect with each JSON Schema embedded as
`%json {...}`, or None when the output is free. Every schema is checked here with the library the engine
decodes with: one it cannot enforce (not a schema, or a feature it does not implement, which the message
names) is a 400 naming the field, before the request reaches the engine.

JSON is written with the separators `json.dumps` writes (", " and ": ") and no other whitespace: a model
cannot pad its output with whitespace without end, and these separators are the ones a model has seen most
(and that the tool instruction shows). The output may open with one space, because a Llama reply's first
token usually carries the space SentencePiece puts before a word (`▁{`).

Checking a large schema takes milliseconds, so `request_grammar` is called off the event loop; each schema's
verdict is cached, so a schema sent again costs a dictionary lookup.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from serve_app.engine.grammar import import_llguidance
from serve_app.errors import InvalidSchemaError
from serve_app.protocol import ChatCompletionRequest, SamplingRequest, Tool
from serve_app.stage.tools import arguments_schema

# llguidance's JSON options: fixed separators, no free whitespace (see the module docstring).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A reply that is text, when tools are offered with tool_choice "auto": anything whose first visible
# character does not open a call (JSON, or a fenced block), so that every call the model starts, after any
# whitespace (Llama 2 chat often opens with two spaces), is decoded under the tools' schemas.
TEXT_OR_CALLS = r"""start: /\s*/ answer
answer: calls | text
text: /[^\s{\[`](?s:.)*/ | ""
"""
SCHEMA_CACHE_SIZE = 256


def json_rule(schema: dict[str, Any]) -> str:
    """A Lark element matching the JSON documents that `schema` accepts, written as `JSON_OPTIONS` say."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def needs_grammar(request: SamplingRequest) -> bool:
    """Whether `request`'s output is constrained: JSON asked for, or tools offered for calling."""
    return request.wants_json or (isinstance(request, ChatCompletionRequest) and request.uses_tools)


def request_grammar(request: SamplingRequest) -> str | None:
    """The grammar `request`'s output must follow, or None for free text; raises `InvalidSchemaError` (400)
    for a schema that cannot be enforced and `GrammarUnavailableError` (503) without the library."""
    response = _response_rule(request)
    if not (isinstance(request, ChatCompletionRequest) and request.uses_tools):
        return None if response is None else f"start: / ?/ {response}\n"
    for i, tool in enumerate(request.tools):
        owner = f"function '{tool.function.name}'"
        check_schema(arguments_schema(tool), owner, f"tools.{i}.function.parameters")
    calls = tool_calls_rules(request.tools, request.forced_tool, request.parallel_tool_calls)
    if request.tool_choice == "required" or request.forced_tool is not None:
        return f"start: / ?/ calls\n{calls}"
    if response is None:
        return TEXT_OR_CALLS + calls
    return f"start: / ?/ answer\nanswer: calls | {response}\n{calls}"


def tool_calls_rules(tools: list[Tool], forced: str | None, parallel: bool) -> str:
    """Lark rules whose `calls` matches the calls `stage/tools.py` parses: one `{"name": ..., "arguments":
    {...}}` object, or (when `parallel`) also a JSON list of one or more of them; `forced` allows exactly one
    call, of that function. Each function's arguments are a `%json` of their own, so that a schema's internal
    references (`#/$defs/...`) still resolve against its own root."""
    offered = [tool for tool in tools if forced is None or tool.function.name == forced]
    calls = 'calls: call | "[" call (", " call)* "]"' if parallel and forced is None else "calls: call"
    rules = [calls, "call: " + " | ".join(f"call_{i}" for i in range(len(offered)))]
    for i, tool in enumerate(offered):
        # Piece by piece as JSON's own tokens, not one literal: beside a JSON response format that also opens
        # with '{', the lexer must be able to end a token where that format's grammar does.
        name = json.dumps(tool.function.name, ensure_ascii=False)
        pieces = ["{", '"name"', ": ", name, ", ", '"arguments"', ": "]
        head = " ".join(json.dumps(piece, ensure_ascii=False) for piece in pieces)
        rules.append(f'call_{i}: {head} arguments_{i} "}}"')
        rules.append(f"arguments_{i}: {json_rule(arguments_schema(tool))}")
    return "\n".join(rules) + "\n"


def _response_rule(request: SamplingRequest) -> str | None:
    """The Lark element of `response_format`'s JSON, or None for text."""
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_rule({"type": "object"})
    spec = response_format.json_schema
    check_schema(spec.json_schema, f"response_format '{spec.name}'", "response_format.json_schema.schema")
    return json_rule(spec.json_schema)


def check_schema(schema: dict[str, Any], owner: str, param: str) -> None:
    """Raise `InvalidSchemaError` naming `param` when output cannot be constrained to `schema`."""
    problem = _schema_problem(json.dumps(schema, sort_keys=True))
    if problem is not None:
        raise InvalidSchemaError(owner, problem, param=param)


@lru_cache(maxsize=SCHEMA_CACHE_SIZE)
def _schema_problem(schema_text: str) -> str | None:
    """What keeps llguidance from enforcing this schema (its own message), or None."""
    matcher = import_llguidance().LLMatcher
    try:
        grammar = matcher.grammar_from_json_schema(schema_text, overrides=JSON_OPTIONS)
    except ValueError as exc:
        return str(exc)
    is_error, messages = matcher.validate_grammar_with_warnings(grammar)
    return messages[0].strip() if is_error else None
