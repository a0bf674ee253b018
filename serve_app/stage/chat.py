"""The sampling/postprocessing stage's work for one request, without Ray.

In: a validated `ChatCompletionRequest` (`chat`) or `CompletionRequest` (`complete`). Out: a stream of
`StageEvent`s — text deltas (or tool calls) per choice, each choice's finish reason, and one `UsageReport`
at the end.

Forward: render the Llama 2 chat template (with the tool schemas when tools are on) or tokenize the raw
prompt, check the context budget and the request limits, and build per-choice `SamplingParams`. Back, in one
generation loop shared by both routes: incremental detokenization, stop strings (held back until they
cannot match, never returned), finish reasons, logprobs in OpenAI's shape, tool calls parsed from a finished
reply, usage and cost. The engine is reached through an injected `generate` function, so tests drive this
class with a fake engine.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from serve_app.config import ApiConfig, ModelConfig, PricingConfig
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import EngineRequest, FinishReason, RequestOutput
from serve_app.engine.sequence import TokenLogprob as EngineLogprob
from serve_app.errors import ContextLengthExceededError, InvalidRequestError
from serve_app.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from serve_app.stage.chat_template import render_chat_prompt
from serve_app.stage.detokenizer import IncrementalDetokenizer
from serve_app.stage.stop import StopStringMatcher
from serve_app.stage.tools import parse_tool_calls, with_tools

EngineGenerate = Callable[[EngineRequest], AsyncIterator[list[RequestOutput]]]


@dataclass(frozen=True)
class ChoiceDelta:
    """New text of choice `index`; `finish_reason` is set on the choice's last delta.

    `num_tokens` counts the engine tokens behind this delta (for latency metrics); `tool_calls` is set
    instead of text on the last delta of a reply that called tools.
    """

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_tokens: int = 0
    tool_calls: list[ToolCall] | None = field(default=None)


@dataclass(frozen=True)
class UsageReport:
    usage: Usage


StageEvent = ChoiceDelta | UsageReport


@dataclass(frozen=True)
class _Prompt:
    """One prompt to complete `n` times: its token ids, completion budget, and text to echo first."""

    token_ids: list[int]
    max_tokens: int
    echo: str = ""


class ChatStage:
    def __init__(self, tokenizer, model: ModelConfig, pricing: PricingConfig, generate: EngineGenerate,
                 api: ApiConfig | None = None):
        self.tokenizer = tokenizer
        self.model = model
        self.pricing = pricing
        self.generate = generate
        self.api = api or ApiConfig()
        self.vocab_size = len(tokenizer)

    # -- forward ---------------------------------------------------------------------------------------------

    def prepare(self, request: ChatCompletionRequest) -> tuple[list[int], int]:
        """The prompt's token ids and the completion budget; raises before any engine work is done."""
        self._check_n(request)
        if len(request.messages) > self.api.max_messages:
            raise InvalidRequestError(f"Too many messages: {len(request.messages)}; at most "
                                      f"{self.api.max_messages} are allowed.", param="messages")
        messages = with_tools(request.messages, request.tools) if request.uses_tools else request.messages
        prompt = render_chat_prompt(messages, self._encode, self.tokenizer.bos_token_id,
                                    self.tokenizer.eos_token_id)
        return prompt, self._budget(prompt, request.max_tokens, request, "messages")

    def prepare_completion(self, request: CompletionRequest) -> list[_Prompt]:
        """Each prompt's token ids (BOS + text) and budget; raises before any engine work is done."""
        self._check_n(request)
        texts = request.prompts
        if len(texts) > self.api.max_prompts:
            raise InvalidRequestError(f"Too many prompts: {len(texts)}; at most {self.api.max_prompts} are "
                                      "allowed.", param="prompt")
        prompts = []
        for text in texts:
            ids = [self.tokenizer.bos_token_id, *self._encode(text)]
            prompts.append(_Prompt(ids, self._budget(ids, request.max_tokens, request, "prompt"),
                                   text if request.echo else ""))
        return prompts

    def _check_n(self, request: SamplingRequest) -> None:
        if request.n > self.api.max_n:
            raise InvalidRequestError(f"Invalid 'n': at most {self.api.max_n} choices per request, got "
                                      f"{request.n}.", param="n")

    def _budget(self, prompt: list[int], max_tokens: int | None, request: SamplingRequest, param: str) -> int:
        limit = self.model.max_model_len
        if len(prompt) >= limit or (max_tokens is not None and len(prompt) + max_tokens > limit):
            raise ContextLengthExceededError(len(prompt), max_tokens, limit, param=param)
        for token_id in request.logit_bias or {}:
            if int(token_id) >= self.vocab_size:
                raise InvalidRequestError(f"Token id {token_id} is outside the vocabulary (size "
                                          f"{self.vocab_size})", param="logit_bias")
        return max_tokens or limit - len(prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- generation ------------------------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> AsyncIterator[list[StageEvent]]:
        prompt, max_tokens = self.prepare(request)
        parse = (lambda text: parse_tool_calls(text, request.tools)) if request.uses_tools else None
        async for events in self._run([_Prompt(prompt, max_tokens)], request, request.logprobs, parse):
            yield events

    async def complete(self, request: CompletionRequest) -> AsyncIterator[list[StageEvent]]:
        prompts = self.prepare_completion(request)
        async for events in self._run(prompts, request, request.logprobs is not None, None):
            yield events

    async def _run(self, prompts: list[_Prompt], request: SamplingRequest, logprobs: bool,
                   parse_tools: Callable[[str], list[ToolCall] | None] | None,
                   ) -> AsyncIterator[list[StageEvent]]:
        """`n` choices per prompt (choice index = prompt index * n + j), streamed as they come.

        With `parse_tools`, a choice's text is held until it finishes, since only the whole reply says
        whether it is a tool call.
        """
        events: asyncio.Queue = asyncio.Queue()
        request_id = uuid.uuid4().hex
        completion_tokens = [0] * (len(prompts) * request.n)

        async def run_choice(index: int, prompt: _Prompt) -> None:
            base = request.to_sampling_params(prompt.max_tokens)
            j = index % request.n
            # Each choice is its own engine sequence; seeded requests get seed + j so that n choices differ
            # from each other but each one reproduces.
            params = base if base.seed is None or j == 0 else _with_seed(base, base.seed + j)
            # `{request}-{choice}`: the replica admits all choices of one request together by that prefix.
            engine_request = EngineRequest(f"{request_id}-{index}", prompt.token_ids, params)
            detokenizer = IncrementalDetokenizer(self.tokenizer)
            stops = StopStringMatcher(request.stop or [])
            held_text, held_logprobs, held_tokens = prompt.echo, [], 0
            stream = self.generate(engine_request)
            try:
                async for outputs in stream:
                    new_tokens = [t for output in outputs for t in output.new_token_ids]
                    if request.stop:
                        # One token at a time, so a stop string completed mid-batch ends the count (usage)
                        # and the logprobs at the token that completed it, whatever the batching.
                        text, stopped, used = "", False, 0
                        for token in new_tokens:
                            piece, stopped = stops.push(detokenizer.push([token]))
                            text, used = text + piece, used + 1
                            if stopped:
                                break
                    else:
                        text, stopped = stops.push(detokenizer.push(new_tokens))
                        used = len(new_tokens)
                    completion_tokens[index] += used
                    held_tokens += used  # tokens whose text is not sent yet, for the latency metrics
                    last = outputs[-1]
                    reason = None
                    if stopped:
                        reason = FinishReason.STOP.value
                    elif last.finished:
                        tail, stopped = stops.push(detokenizer.flush())
                        text += tail if stopped else tail + stops.flush()
                        reason = FinishReason.STOP.value if stopped else last.finish_reason.value
                    held_text += text
                    held_logprobs += self._logprobs(outputs)[:used] if logprobs else []
                    if reason is not None and parse_tools is not None and (calls := parse_tools(held_text)):
                        await events.put([ChoiceDelta(index, "", "tool_calls", held_logprobs or None,
                                                      held_tokens, calls)])
                        return
                    if reason is not None or (parse_tools is None and (held_text or held_logprobs)):
                        await events.put([ChoiceDelta(index, held_text, reason, held_logprobs or None,
                                                      held_tokens)])
                        held_text, held_logprobs, held_tokens = "", [], 0
                    if reason is not None:
                        return
            finally:
                await _close(stream)

        tasks = [asyncio.create_task(run_choice(p * request.n + j, prompt))
                 for p, prompt in enumerate(prompts) for j in range(request.n)]
        pending = set(tasks)
        getter = None
        try:
            while pending:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait(pending | {getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    batch = getter.result()
                    while not events.empty():
                        batch.extend(events.get_nowait())
                    yield batch
                else:
                    getter.cancel()
                for task in done - {getter}:
                    pending.discard(task)
                    task.result()  # re-raise a failed choice
            rest = []
            while not events.empty():
                rest.extend(events.get_nowait())
            prompt_tokens = sum(len(prompt.token_ids) for prompt in prompts)
            rest.append(UsageReport(Usage.from_counts(
                prompt_tokens, sum(completion_tokens), self.pricing.input_per_million_tokens / 1e6,
                self.pricing.output_per_million_tokens / 1e6)))
            yield rest
        finally:
            if getter is not None:
                getter.cancel()
            for task in tasks:
                task.cancel()

    def _logprobs(self, outputs: list[RequestOutput]) -> list[TokenLogprob]:
        return [self._logprob_entry(entry) for output in outputs for entry in output.logprobs or []]

    def _logprob_entry(self, entry: EngineLogprob) -> TokenLogprob:
        token, raw = self._token_text(entry.token_id)
        top = [TopLogprob(token=text, logprob=value, bytes=raw_bytes)
               for text, raw_bytes, value in ((*self._token_text(i), v) for i, v in entry.top)]
        return TokenLogprob(token=token, logprob=entry.logprob, bytes=raw, top_logprobs=top)

    def _token_text(self, token_id: int) -> tuple[str, list[int] | None]:
        """OpenAI's per-token `token` and `bytes`: byte-fallback pieces are shown as `bytes:\\xNN`."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            value = int(piece[3:5], 16)
            return f"bytes:\\x{value:02x}", [value]
        text = piece.replace("\u2581", " ")
        return text, list(text.encode("utf-8"))


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed % 2**63)


async def _close(stream) -> None:
    """Stop the engine stream we no longer read, so the replica aborts the request and frees its blocks."""
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        cancel()
    else:
        await stream.aclose()
