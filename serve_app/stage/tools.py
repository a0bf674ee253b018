"""Function calling for a model that knows no tools: the schemas go into the prompt, a call comes back as JSON.

In: the request's `tools`, `tool_choice` ("auto" or absent, "required", or a named function) and
`parallel_tool_calls`. Out, forward: the conversation with the function schemas and the calling convention
added to its system message. Out, back: the `ToolCall`s in the model's finished reply, or None when the
reply is ordinary text.

Llama 2 chat was not trained on a tool format, so the convention is the simplest one a chat model follows
reliably: reply with only a JSON object `{"name": ..., "arguments": {...}}` (or, when parallel calls are
allowed, a list of them). The reply is decoded under a grammar of exactly that convention and the offered
functions' argument schemas (`structured_output.py`), so a call the model starts always parses. A reply is
a call only if it parses as such and names an offered function; anything else is returned as text,
unchanged.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from serve_app.protocol import ChatMessage, FunctionCall, Tool, ToolCall

CALL_FORMAT = ('To call one, reply with only a JSON object of the form {"name": "<function name>", '
               '"arguments": {<arguments as described by its parameters>}} and nothing else')
# What a function without `parameters` takes, as OpenAI defines it: no arguments.
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def tools_instruction(forced: str | None = None, required: bool = False, parallel: bool = True) -> str:
    """The calling convention, as the system message states it: the model may answer in text unless a call is
    `required` or one function is `forced`."""
    several = "."
    if parallel and forced is None:
        several = "; to call several, reply with a JSON list of such objects."
    if forced is not None:
        must = f' You must call the function "{forced}".'
    elif required:
        must = " You must call at least one of them." if parallel else " You must call one of them."
    else:
        must = " If no function fits, answer normally."
    return f"You can call the following functions. {CALL_FORMAT}{several}{must}\nFunctions:\n"


def arguments_schema(tool: Tool) -> dict[str, Any]:
    """The JSON Schema of a call's `arguments`."""
    return tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS


def with_tools(messages: list[ChatMessage], tools: list[Tool], forced: str | None = None,
               required: bool = False, parallel: bool = True) -> list[ChatMessage]:
    """The conversation with the tools described in its system message (added first if there is none)."""
    schemas = "\n".join(
        json.dumps({"name": t.function.name, "description": t.function.description or "",
                    "parameters": t.function.parameters or {}}, ensure_ascii=False)
        for t in tools
    )
    instruction = tools_instruction(forced, required, parallel) + schemas
    for i, message in enumerate(messages):
        if message.role == "system":
            updated = message.model_copy(update={"content": f"{message.content}\n\n{instruction}"})
            return [*messages[:i], updated, *messages[i + 1:]]
    return [ChatMessage(role="system", content=instruction), *messages]


def may_become_tool_call(text_so_far: str) -> bool:
    """False once a reply's start rules out a call (its first visible character opens no JSON and no fence),
    so the stage can stream it as text instead of holding it to the end."""
    body = text_so_far.lstrip()
    return not body or body[0] in "{[`"


def parse_tool_calls(text: str, tools: list[Tool]) -> list[ToolCall] | None:
    """The calls in a finished reply, or None when it is not (only) a call of offered functions."""
    body = text.strip()
    if body.startswith("```"):  # a fenced block, ```json ... ```
        body = body.strip("`").removeprefix("json").strip()
    if not body.startswith(("{", "[")):
        return None
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    names = {t.function.name for t in tools}
    calls = []
    for item in items:
        call = _as_call(item, names)
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _as_call(item: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                    function=FunctionCall(name=item["name"], arguments=json.dumps(arguments, ensure_ascii=False)))
