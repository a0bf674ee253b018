"""The sampling/postprocessing stage's work for one request, without Ray: `ChatProcessor`.

In: a validated `ChatCompletionRequest` (`chat`) or `CompletionRequest` (`complete`). Out: a stream of
`StageEvent`s — text deltas (or tool calls) per choice, each choice's finish reason, and one `UsageReport`
at the end.

Forward: render the Llama 2 chat template (with the tool schemas when tools are on) or tokenize the raw
prompt, check the context budget and the request limits, build the grammar the output must follow
(`response_format`, tool calls: `structured_output.py`, off the event loop) and per-choice
`SamplingParams`. Back, in one
generation loop shared by both routes: incremental detokenization, stop strings (held back until they
cannot match, never returned), finish reasons, logprobs in OpenAI's shape, tool calls parsed from a finished
reply, usage and cost. The engine is reached through an injected `generate` function, so tests drive this
class with a fake engine; `deployment.ChatStage` is its Serve wrapper.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from serve_app.affinity import AffinityKey
from serve_app.config import ApiConfig, ModelConfig, PricingConfig
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest, FinishReason, RequestOutput, SampleLogprobs
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
from serve_app.stage.chat_template import render_chat
from serve_app.stage.detokenizer import IncrementalDetokenizer
from serve_app.stage.stop import StopStringMatcher
from serve_app.stage.structured_output import needs_grammar, request_grammar
from serve_app.stage.tools import may_become_tool_call, parse_tool_calls, with_tools

# The replica group's `generate`: a request's choices, and the key its group is chosen by.
EngineGenerate = Callable[[list[EngineRequest], AffinityKey], AsyncIterator[list[RequestOutput]]]
# Requests with more text than this (a few milliseconds of tokenizing) are tokenized on a worker thread.
INLINE_TOKENIZE_CHARS = 8192
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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


class ChatProcessor:
    """Requests in, engine requests to the replica group, and the replica's outputs back as `StageEvent`s."""

    def __init__(self, tokenizer, model: ModelConfig, pricing: PricingConfig, generate: EngineGenerate,
                 api: ApiConfig | None = None):
        self.tokenizer = tokenizer
        self.model = model
        self.pricing = pricing
        self.generate = generate
        self.api = api or ApiConfig()
        # No token's text is longer than this, so a text of n characters is at least n / this many tokens.
        self._max_token_chars = max(len(piece) for piece in tokenizer.get_vocab()
                                    if not _BYTE_PIECE.fullmatch(piece) and piece not in tokenizer.all_special_tokens)

    # -- forward ---------------------------------------------------------------------------------------------

    def prepare(self, request: ChatCompletionRequest) -> tuple[list[int], int, AffinityKey]:
        """The prompt's token ids, the completion budget and the affinity key; raises before any engine work
        is done."""
        self._check_n(request)
        if len(request.messages) > self.api.max_messages:
            raise InvalidRequestError(f"Too many messages: {len(request.messages)}; at most "
                                      f"{self.api.max_messages} are allowed.", param="messages")
        messages = request.messages
        if request.uses_tools:
            messages = with_tools(messages, request.tools, request.forced_tool,
                                  request.tool_choice == "required", request.parallel_tool_calls)
        self._check_size([message.content or "" for message in messages], "messages")
        chat = render_chat(messages, self._encode, self.tokenizer.bos_token_id, self.tokenizer.eos_token_id)
        prompt = chat.token_ids
        affinity = AffinityKey.for_request(request.prompt_cache_key, request.user, chat.opening)
        return prompt, self._budget(prompt, request.max_tokens, request, "messages"), affinity

    def prepare_completion(self, request: CompletionRequest) -> list[_Prompt]:
        """Each prompt's token ids (BOS + text) and budget; raises before any engine work is done."""
        self._check_n(request)
        texts = request.prompts
        if len(texts) > self.api.max_prompts:
            raise InvalidRequestError(f"Too many prompts: {len(texts)}; at most {self.api.max_prompts} are "
                                      "allowed.", param="prompt")
        prompts = []
        for text in texts:
            self._check_size([text], "prompt")
            ids = [self.tokenizer.bos_token_id, *self._encode(text)]
            prompts.append(_Prompt(ids, self._budget(ids, request.max_tokens, request, "prompt"),
                                   text if request.echo else ""))
        return prompts

    def _check_size(self, texts: list[str], param: str) -> None:
        """Refuse, without tokenizing it, text that cannot fit the context whatever its tokens: tokenizing a
        body's worth of text takes seconds, and most of it would be thrown away."""
        at_least = -(-sum(len(text) for text in texts) // self._max_token_chars)
        if at_least >= self.model.max_model_len:
            raise ContextLengthExceededError(at_least, None, self.model.max_model_len, param=param, at_least=True)

    def _check_n(self, request: SamplingRequest) -> None:
        if request.n > self.api.max_n:
            raise InvalidRequestError(f"Invalid 'n': at most {self.api.max_n} choices per request, got "
                                      f"{request.n}.", param="n")

    def _budget(self, prompt: list[int], max_tokens: int | None, request: SamplingRequest, param: str) -> int:
        limit = self.model.max_model_len
        if len(prompt) >= limit or (max_tokens is not None and len(prompt) + max_tokens > limit):
            raise ContextLengthExceededError(len(prompt), max_tokens, limit, param=param)
        return max_tokens or limit - len(prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- generation ------------------------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> AsyncIterator[list[StageEvent]]:
        # A long conversation is tokenized off the event loop, so it does not stall every other stream here.
        if sum(len(message.content or "") for message in request.messages) > INLINE_TOKENIZE_CHARS:
            prompt, max_tokens, affinity = await asyncio.to_thread(self.prepare, request)
        else:
            prompt, max_tokens, affinity = self.prepare(request)
        grammar = await _grammar(request)
        parse = (lambda text: parse_tool_calls(text, request.tools)) if request.uses_tools else None
        prompts = [_Prompt(prompt, max_tokens)]
        async for events in self._run(prompts, affinity, request, grammar, request.logprobs, parse):
            yield events

    async def complete(self, request: CompletionRequest) -> AsyncIterator[list[StageEvent]]:
        if sum(len(text) for text in request.prompts) > INLINE_TOKENIZE_CHARS:
            prompts = await asyncio.to_thread(self.prepare_completion, request)
        else:
            prompts = self.prepare_completion(request)
        grammar = await _grammar(request)
        affinity = AffinityKey.for_prompt(request.prompt_cache_key, request.user, prompts[0].token_ids)
        async for events in self._run(prompts, affinity, request, grammar, request.logprobs is not None, None):
            yield events

    async def _run(self, prompts: list[_Prompt], affinity: AffinityKey, request: SamplingRequest,
                   grammar: str | None,
                   logprobs: bool, parse_tools: Callable[[str], list[ToolCall] | None] | None,
                   ) -> AsyncIterator[list[StageEvent]]:
        """`n` choices per prompt (choice index = prompt index * n + j), streamed as they come.

        All choices go to the replica group in one call, so one group admits and runs them together. A choice
        that ends on a stop string is ended there too (the replica matches stop strings as this stage does),
        while the others run on. With `parse_tools`, a choice's text is held while it may still be a tool
        call (only the whole reply says whether it is one); a reply whose start rules that out streams as
        usual.
        """
        request_id = uuid.uuid4().hex
        choices: dict[ChoiceId, _Choice] = {}
        for p, prompt in enumerate(prompts):
            for j in range(request.n):
                index = p * request.n + j
                base = request.to_sampling_params(prompt.max_tokens, grammar)
                # Each choice is its own engine sequence; seeded requests get seed + j so that n choices
                # differ from each other but each one reproduces.
                params = base if base.seed is None or j == 0 else _with_seed(base, base.seed + j)
                engine_request = EngineRequest(ChoiceId(request_id, index), prompt.token_ids, params)
                choices[engine_request.choice] = _Choice(
                    self, index, engine_request, prompt.echo, request.stop or [], logprobs, parse_tools)
        stream = self.generate([choice.engine_request for choice in choices.values()], affinity)
        try:
            async for outputs in stream:
                by_choice: dict[ChoiceId, list[RequestOutput]] = {}
                for output in outputs:
                    by_choice.setdefault(output.choice, []).append(output)
                events = [event for choice, outs in by_choice.items()
                          if (event := choices[choice].push(outs)) is not None]
                if all(choice.done for choice in choices.values()):
                    events.append(UsageReport(self._usage(prompts, list(choices.values()), request.n)))
                    yield events
                    return
                if events:
                    yield events
            raise RuntimeError("the engine stream ended before every choice finished")
        finally:
            await _close(stream)

    def _usage(self, prompts: list[_Prompt], choices: list[_Choice], n: int) -> Usage:
        """Usage over all choices. A prompt counts once however many choices share it, and so do its cached
        tokens: those its least-cached choice found, the tokens none of its choices had to compute. (Choices
        admitted later may find the blocks an earlier one computed; this request paid for those.)"""
        cached_tokens = sum(min(choice.cached_tokens for choice in choices[p * n:(p + 1) * n])
                            for p in range(len(prompts)))
        pricing = self.pricing
        prompt_tokens = sum(len(prompt.token_ids) for prompt in prompts)
        completion_tokens = sum(choice.completion_tokens for choice in choices)
        return Usage.from_counts(
            prompt_tokens, completion_tokens, pricing.input_per_million_tokens / 1e6,
            pricing.output_per_million_tokens / 1e6, cached_tokens=cached_tokens,
            cached_input_price_per_token=pricing.cached_input_per_million / 1e6)

    def token_logprobs(self, outputs: list[RequestOutput]) -> list[TokenLogprob]:
        """OpenAI's per-token logprobs for the tokens in `outputs`, in order."""
        return [self._logprob_entry(entry) for output in outputs for entry in output.logprobs or []]

    def _logprob_entry(self, entry: SampleLogprobs) -> TokenLogprob:
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


class _Choice:
    """One choice on its way back: incremental detokenizing, stop strings (held back until they cannot match,
    never returned), finish reason, logprobs, and the tool calls of a finished reply."""

    def __init__(self, processor: ChatProcessor, index: int, engine_request: EngineRequest, echo: str,
                 stop: list[str], logprobs: bool, parse_tools: Callable[[str], list[ToolCall] | None] | None):
        self.processor, self.index, self.engine_request = processor, index, engine_request
        self.logprobs, self.parse_tools = logprobs, parse_tools
        self.detokenizer = IncrementalDetokenizer(processor.tokenizer)
        self.stops = StopStringMatcher(stop)
        self.has_stop_strings = bool(stop)
        # Text, logprobs and tokens not sent yet (the echoed prompt goes out with the first delta).
        self.held_text, self.held_logprobs, self.held_tokens = echo, [], 0
        self.completion_tokens = 0
        self.cached_tokens = 0  # of its prompt, as its first output reports them
        self.done = False

    def push(self, outputs: list[RequestOutput]) -> ChoiceDelta | None:
        """Take this choice's outputs from one message; the delta to send now, if any."""
        if self.done:
            return None  # ended on a stop string: what the engine made after it is not the reply's
        first = outputs[0].num_cached_tokens
        if first is not None:
            self.cached_tokens = first
        new_tokens = [t for output in outputs for t in output.new_token_ids]
        if self.has_stop_strings:
            # One token at a time, so a stop string completed mid-batch ends the count (usage) and the
            # logprobs at the token that completed it, whatever the batching.
            text, stopped, used = "", False, 0
            for token in new_tokens:
                piece, stopped = self.stops.push(self.detokenizer.push([token]))
                text, used = text + piece, used + 1
                if stopped:
                    break
        else:
            text, stopped = self.stops.push(self.detokenizer.push(new_tokens))
            used = len(new_tokens)
        self.completion_tokens += used
        self.held_tokens += used  # tokens whose text is not sent yet, for the latency metrics
        last = outputs[-1]
        reason = None
        if stopped:
            reason = FinishReason.STOP.value
        elif last.finished:
            tail, stopped = self.stops.push(self.detokenizer.flush())
            text += tail if stopped else tail + self.stops.flush()
            reason = FinishReason.STOP.value if stopped else last.finish_reason.value
        self.held_text += text
        self.held_logprobs += self.processor.token_logprobs(outputs)[:used] if self.logprobs else []
        self.done = reason is not None
        if self.parse_tools is not None and not may_become_tool_call(self.held_text):
            self.parse_tools = None  # plain text: stream it like any reply
        if self.done and self.parse_tools is not None and (calls := self.parse_tools(self.held_text)):
            return ChoiceDelta(self.index, "", "tool_calls", self.held_logprobs or None, self.held_tokens, calls)
        if self.done or (self.parse_tools is None and (self.held_text or self.held_logprobs)):
            delta = ChoiceDelta(self.index, self.held_text, reason, self.held_logprobs or None, self.held_tokens)
            self.held_text, self.held_logprobs, self.held_tokens = "", [], 0
            return delta
        return None


async def _grammar(request: SamplingRequest) -> str | None:
    """The grammar of the request's output, built and checked on a worker thread (a large schema takes
    milliseconds to check, which the event loop's other streams should not wait for)."""
    return await asyncio.to_thread(request_grammar, request) if needs_grammar(request) else None


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed % 2**63)


async def _close(stream) -> None:
    """Stop the engine stream we no longer read, so the replica aborts the request and frees its blocks."""
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        cancel()
    else:
        await stream.aclose()
