"""The sampling/postprocessing stage's work for one chat request, without Ray.

In: a validated `ChatCompletionRequest`. Out: a stream of `StageEvent`s — text deltas per choice, each
choice's finish reason, and one `UsageReport` at the end.

Forward: render the Llama 2 chat template, tokenize, check the context budget, and build per-choice
`SamplingParams`. Back: incremental detokenization, stop strings (held back until they cannot match, never
returned), finish reasons, logprobs in OpenAI's shape, usage and cost. The engine is reached through an
injected `generate` function, so tests drive this class with a fake engine.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from serve_app.config import ModelConfig, PricingConfig
from serve_app.errors import ContextLengthExceededError, InvalidRequestError
from serve_app.protocol import ChatCompletionRequest, TokenLogprob, TopLogprob, Usage
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import EngineRequest, FinishReason, RequestOutput
from serve_app.engine.sequence import TokenLogprob as EngineLogprob
from serve_app.stage.chat_template import render_chat_prompt
from serve_app.stage.detokenizer import IncrementalDetokenizer
from serve_app.stage.stop import StopStringMatcher

EngineGenerate = Callable[[EngineRequest], AsyncIterator[list[RequestOutput]]]


@dataclass(frozen=True)
class ChoiceDelta:
    """New text of choice `index`; `finish_reason` is set on the choice's last delta."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class UsageReport:
    usage: Usage


StageEvent = ChoiceDelta | UsageReport


class ChatStage:
    def __init__(self, tokenizer, model: ModelConfig, pricing: PricingConfig, generate: EngineGenerate):
        self.tokenizer = tokenizer
        self.model = model
        self.pricing = pricing
        self.generate = generate
        self.vocab_size = len(tokenizer)

    def prepare(self, request: ChatCompletionRequest) -> tuple[list[int], int]:
        """The prompt's token ids and the completion budget; raises before any engine work is done."""
        prompt = render_chat_prompt(request.messages, self._encode, self.tokenizer.bos_token_id,
                                    self.tokenizer.eos_token_id)
        limit = self.model.max_model_len
        if len(prompt) >= limit or (request.max_tokens is not None and len(prompt) + request.max_tokens > limit):
            raise ContextLengthExceededError(len(prompt), request.max_tokens, limit)
        for token_id in request.logit_bias or {}:
            if int(token_id) >= self.vocab_size:
                raise InvalidRequestError(f"Token id {token_id} is outside the vocabulary (size "
                                          f"{self.vocab_size})", param="logit_bias")
        return prompt, request.max_tokens or limit - len(prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def chat(self, request: ChatCompletionRequest) -> AsyncIterator[list[StageEvent]]:
        prompt, max_tokens = self.prepare(request)
        base = request.to_sampling_params(max_tokens)
        events: asyncio.Queue = asyncio.Queue()
        completion_tokens = [0] * request.n

        async def run_choice(index: int) -> None:
            # Each choice is its own engine sequence; seeded requests get seed + index so that n choices differ
            # from each other but each one reproduces.
            params = base if base.seed is None or index == 0 else _with_seed(base, base.seed + index)
            engine_request = EngineRequest(f"{uuid.uuid4().hex}-{index}", prompt, params)
            detokenizer = IncrementalDetokenizer(self.tokenizer)
            stops = StopStringMatcher(request.stop or [])
            stream = self.generate(engine_request)
            try:
                async for outputs in stream:
                    new_tokens = [t for output in outputs for t in output.new_token_ids]
                    completion_tokens[index] += len(new_tokens)
                    text, stopped = stops.push(detokenizer.push(new_tokens))
                    last = outputs[-1]
                    logprobs = self._logprobs(outputs) if request.logprobs else None
                    if stopped:
                        await events.put([ChoiceDelta(index, text, FinishReason.STOP.value, logprobs)])
                        return
                    if last.finished:
                        tail, stopped = stops.push(detokenizer.flush())
                        text += tail if stopped else tail + stops.flush()
                        reason = FinishReason.STOP.value if stopped else last.finish_reason.value
                        await events.put([ChoiceDelta(index, text, reason, logprobs)])
                        return
                    if text or logprobs:
                        await events.put([ChoiceDelta(index, text, None, logprobs)])
            finally:
                await _close(stream)

        tasks = [asyncio.create_task(run_choice(index)) for index in range(request.n)]
        pending = set(tasks)
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
            rest.append(UsageReport(Usage.from_counts(
                len(prompt), sum(completion_tokens), self.pricing.input_per_million_tokens / 1e6,
                self.pricing.output_per_million_tokens / 1e6)))
            yield rest
        finally:
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
