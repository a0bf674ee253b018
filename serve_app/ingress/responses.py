"""The stage's events as OpenAI responses: one JSON body, or server-sent events.

In: the stage's batches of `StageEvent`s (`ChoiceDelta`s and one `UsageReport`). Out: a
`chat.completion` / `text_completion` body, or the SSE lines of its chunks. Chat streams start with a
`delta.role = "assistant"` chunk per choice; each choice's last delta carries its `finish_reason`; usage goes
in a chunk of its own only when the request asked for it (`stream_options.include_usage`).
"""

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from serve_app.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DeltaToolCall,
    SamplingRequest,
    TokenLogprob,
    completion_id,
)
from serve_app.stage.processor import ChoiceDelta, UsageReport

# Characters JSON leaves raw that `str.splitlines` (httpx's `aiter_lines`, many SSE readers) takes for line
# ends: a model that writes one would cut its event in two. Only strings can hold them, where an escape is the
# same character to every JSON reader.
_SPLITLINES_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_data(body: BaseModel) -> str:
    """One server-sent event carrying `body` as JSON, on one line for every line splitter."""
    return f"data: {json.dumps(body.model_dump(), ensure_ascii=False).translate(_SPLITLINES_BREAKS)}\n\n"


@dataclass
class CollectedChoices:
    """A whole non-streamed response's choices, gathered from the stage's events."""

    texts: list[str]
    reasons: list[str | None]
    logprobs: list[list[TokenLogprob]]
    calls: list[list | None]
    usage: Any = None


async def collect_choices(batches, count: int) -> CollectedChoices:
    got = CollectedChoices([""] * count, [None] * count, [[] for _ in range(count)], [None] * count)
    async for batch in batches:
        for event in batch:
            if isinstance(event, UsageReport):
                got.usage = event.usage
                continue
            got.texts[event.index] += event.text
            got.reasons[event.index] = event.finish_reason or got.reasons[event.index]
            got.logprobs[event.index].extend(event.logprobs or [])
            got.calls[event.index] = event.tool_calls or got.calls[event.index]
    return got


async def deltas_and_usage(batches, request: SamplingRequest, usage_chunk) -> AsyncIterator[ChoiceDelta | str]:
    """The stage's deltas one at a time; its usage report becomes the SSE text `usage_chunk(usage)` when the
    request asked for usage in the stream (`stream_options.include_usage`), and nothing otherwise."""
    async for batch in batches:
        for event in batch:
            if not isinstance(event, UsageReport):
                yield event
            elif request.stream_options is not None and request.stream_options.include_usage:
                yield usage_chunk(event.usage)


def chat_chunk_lines(event: ChoiceDelta, chunk, with_logprobs: bool) -> str:
    """SSE lines for a stage delta: its text (or tool calls), then, on its last delta, its finish reason."""
    logprobs = ChoiceLogprobs(content=event.logprobs or []) if with_logprobs else None
    choices = []
    if event.tool_calls:
        calls = [DeltaToolCall(index=i, **call.model_dump()) for i, call in enumerate(event.tool_calls)]
        choices.append(ChatCompletionChunkChoice(index=event.index, delta=DeltaMessage(tool_calls=calls),
                                                 logprobs=logprobs))
    elif event.text or (with_logprobs and event.logprobs):
        choices.append(ChatCompletionChunkChoice(index=event.index, delta=DeltaMessage(content=event.text),
                                                 logprobs=logprobs))
    if event.finish_reason is not None:
        choices.append(ChatCompletionChunkChoice(index=event.index, delta=DeltaMessage(),
                                                 finish_reason=event.finish_reason))
    return "".join(chunk([choice]) for choice in choices)


def legacy_logprobs(entries: list[TokenLogprob], top: int, offset: int) -> CompletionLogprobs:
    """Completions' parallel-list logprobs; `offset` is where the first token's text starts in the choice."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[entry.token for entry in entries],
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[{alt.token: alt.logprob for alt in entry.top_logprobs} for entry in entries] if top else None,
        text_offset=offsets,
    )


async def chat_body(request: ChatCompletionRequest, batches) -> dict:
    got = await collect_choices(batches, request.n)
    choices = []
    for i in range(request.n):
        # A reply that is a tool call has no content, as in OpenAI's responses.
        message = ChatCompletionMessage(content=None if got.calls[i] else got.texts[i], tool_calls=got.calls[i])
        choices.append(ChatCompletionChoice(
            index=i, message=message, finish_reason=got.reasons[i],
            logprobs=ChoiceLogprobs(content=got.logprobs[i]) if request.logprobs else None))
    return ChatCompletionResponse(model=request.model, choices=choices, usage=got.usage).model_dump()


async def chat_sse(request: ChatCompletionRequest, batches) -> AsyncIterator[str]:
    chunk_id, created = completion_id(), int(time.time())

    def chunk(choices: list[ChatCompletionChunkChoice], usage=None) -> str:
        return sse_data(ChatCompletionChunk(id=chunk_id, created=created, model=request.model,
                                            choices=choices, usage=usage))

    yield chunk([ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                 for i in range(request.n)])
    async for item in deltas_and_usage(batches, request, lambda usage: chunk([], usage=usage)):
        if isinstance(item, str):
            yield item
        elif lines := chat_chunk_lines(item, chunk, request.logprobs):
            yield lines



def num_choices(request: CompletionRequest) -> int:
    return len(request.prompts) * request.n


async def completion_body(request: CompletionRequest, batches) -> dict:
    count = num_choices(request)
    got = await collect_choices(batches, count)
    echo = [request.prompts[i // request.n] if request.echo else "" for i in range(count)]
    choices = [
        CompletionChoice(index=i, text=got.texts[i], finish_reason=got.reasons[i],
                         logprobs=legacy_logprobs(got.logprobs[i], request.logprobs, len(echo[i]))
                         if request.logprobs is not None else None)
        for i in range(count)
    ]
    return CompletionResponse(model=request.model, choices=choices, usage=got.usage).model_dump()


async def completion_sse(request: CompletionRequest, batches) -> AsyncIterator[str]:
    chunk_id, created = completion_id("cmpl"), int(time.time())
    offsets = [0] * num_choices(request)

    def chunk(choices: list[CompletionChoice], usage=None) -> str:
        return sse_data(CompletionResponse(id=chunk_id, created=created, model=request.model,
                                           choices=choices, usage=usage))

    async for event in deltas_and_usage(batches, request, lambda usage: chunk([], usage=usage)):
        if isinstance(event, str):
            yield event
            continue
        logprobs = None
        if request.logprobs is not None:
            entries = event.logprobs or []
            # The echoed prompt comes first in the choice's first delta; token offsets follow it.
            start = offsets[event.index] + len(event.text) - sum(len(e.token) for e in entries)
            logprobs = legacy_logprobs(entries, request.logprobs, max(start, 0))
        offsets[event.index] += len(event.text)
        yield chunk([CompletionChoice(index=event.index, text=event.text, logprobs=logprobs,
                                      finish_reason=event.finish_reason)])
