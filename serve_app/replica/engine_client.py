"""The replica's client of its engine: admission, one async stream per call, pacing, stop strings, aborts.

In: `generate(requests)`, all engine requests of one client request (its `n` choices, of each prompt). Out:
one async stream of `RequestOutput` batches for them, fed by the engine host's `StepReport`s
(`engine_loop.py`). The client runs on the replica's event loop, and so does every report it is handed.

- **Admission** is bounded: a call that would push the requests (or prompt tokens) waiting for their first
  token past `AdmissionLimits` is refused at once with `OverloadedError` (429 + Retry-After).
- **Pacing**: a stream's first token goes out at once; later ones are coalesced (`StreamPacing`).
- **Stop strings** end a choice in the engine at the token that completes one (`StopStringWatch`): with
  `n > 1` the other choices run on, and the stopped choice's KV blocks are freed at the engine's next
  command drain.
- **Aborts**: when the caller goes away (client disconnect, every choice done) the stream's `finally`
  aborts the choices still running.
- **A watchdog**: once a second it checks that the engine makes progress while streams wait on it (a step
  that takes longer than `step_timeout_s` is a hung engine: a CUDA or NCCL hang, where no collective times
  out at tp=1) and that every rank of its group is there. Either failure fails every open stream with a 503,
  kills the engine, and makes the replica unhealthy, so Serve replaces it; new requests are admitted only
  while the engine is healthy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from serve_app.config import EngineConfig
from serve_app.engine.engine import EngineStats
from serve_app.engine.sequence import ChoiceId, EngineRequest, FinishReason, RequestOutput
from serve_app.errors import EngineUnavailableError, OverloadedError, ServiceError
from serve_app.replica.engine_loop import AbortRequest, AddRequests, EngineHost, StepReport
from serve_app.stage.detokenizer import IncrementalDetokenizer
from serve_app.stage.stop import StopStringMatcher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPacing:
    """How often one stream may send once its first token is out (that one always goes at once).

    Every message costs CPU in each deployment it crosses (serialization, an event-loop wake-up, an SSE
    write), and on the same cores as the engine. With `messages_per_s`, the interval grows with the number
    of open streams, so the replica group's message rate stays bounded however many streams are open,
    while a lone stream sends as often as `1 / messages_per_s` (every step, with the GPU configs' budget).
    """

    min_interval_s: float = 0.0
    messages_per_s: float | None = None
    max_interval_s: float = 0.25

    def interval(self, open_streams: int) -> float:
        adaptive = open_streams / self.messages_per_s if self.messages_per_s else 0.0
        return min(max(self.min_interval_s, adaptive), max(self.max_interval_s, self.min_interval_s))

    @classmethod
    def from_config(cls, engine: EngineConfig) -> StreamPacing:
        return cls(engine.stream_interval_s, engine.stream_messages_per_s, engine.stream_max_interval_s)


@dataclass(frozen=True)
class AdmissionLimits:
    """How much may wait for its first token; a request past either bound is refused, not queued."""

    max_waiting_requests: int
    max_waiting_tokens: int
    retry_after_s: float = 1.0


class StopStringWatch:
    """Finds the token at which a choice's text completes one of its stop strings.

    The same detokenizer and matcher as the stage's, fed one token at a time, so the choice ends in the
    engine exactly where the stage cuts its text (the stage stays the one that returns the text).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._matcher = StopStringMatcher(list(stop))

    def tokens_until_stop(self, token_ids: list[int]) -> int | None:
        """How many of these new tokens the choice keeps when one of them completes a stop string (that
        token included); None when none does."""
        for count, token in enumerate(token_ids, start=1):
            if self._matcher.push(self._detokenizer.push([token]))[1]:
                return count
        return None


WATCHDOG_PERIOD_S = 1.0


class EngineClient:
    """The bridge from an engine host (`EngineProcess` or `EngineThread`) to asyncio streams."""

    def __init__(self, host: EngineHost, limits: AdmissionLimits | None = None,
                 pacing: StreamPacing | None = None, tokenizer=None, step_timeout_s: float | None = None):
        """Starts `host` (building its engine), and raises what building raised. Call it on the event loop
        that will run the streams. `tokenizer` lets stop strings end choices in the engine; without it a
        stopped choice runs on until its stream closes. `step_timeout_s`: the longest the engine may go
        without finishing a step while streams wait on it (None: no watchdog)."""
        self.host = host
        self.limits = limits
        self.pacing = pacing or StreamPacing()
        self._tokenizer = tokenizer
        self._step_timeout_s = step_timeout_s
        # Choices added but without a first output yet (the engine's waiting queue plus prefills in flight),
        # with their prompt lengths.
        self._waiting: dict[ChoiceId, int] = {}
        self._streams: dict[ChoiceId, asyncio.Queue] = {}
        self._stop_watches: dict[ChoiceId, StopStringWatch] = {}
        self._stopped: set[ChoiceId] = set()  # ended on a stop string; the engine may run them a step more
        self._open_calls = 0  # `generate` streams open: what pacing divides the message budget among
        self._failure: EngineUnavailableError | None = None
        self._stats: EngineStats | None = None
        self._loop = asyncio.get_running_loop()
        host.start(self._on_report, self._loop)
        # When the engine last showed progress: its last report, or when streams began to wait on it.
        self._progress_at = self._loop.time()
        self._watchdog = self._loop.call_later(WATCHDOG_PERIOD_S, self._watch_engine)

    @property
    def alive(self) -> bool:
        return self.host.alive() and self._failure is None

    def healthy(self) -> bool:
        """The engine runs and every rank of its tensor-parallel group is there."""
        return self.alive and self.host.healthy()

    def _watch_engine(self) -> None:
        """Once a second, on the streams' event loop: fail a hung or broken engine loudly."""
        if self._failure is not None:
            return
        stalled_s = self._loop.time() - self._progress_at
        if self._step_timeout_s is not None and self._streams and stalled_s > self._step_timeout_s:
            self._fail(f"The model's engine has not finished a step in {stalled_s:.0f} s (engine.step_timeout_s="
                       f"{self._step_timeout_s:g}). Please retry.")
        elif self.host.alive() and not self.host.healthy():
            self._fail("A tensor-parallel rank of the model's engine has died. Please retry.")
        else:
            self._watchdog = self._loop.call_later(WATCHDOG_PERIOD_S, self._watch_engine)
            return
        self.host.kill()

    def _fail(self, message: str) -> None:
        """The engine is gone for this replica group: every open stream, and every later call, gets a 503."""
        logger.error("%s", message)
        self._failure = EngineUnavailableError(message)
        for choice in list(self._streams):
            self._deliver(choice, self._failure)

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def stop(self) -> None:
        self._watchdog.cancel()
        self.host.stop()

    def _admit(self, requests: list[EngineRequest]) -> None:
        """Refuse a call the waiting queue has no room for. A call's requests (the `n` choices of one client
        request, and each of its prompts) are admitted together, and a lone call is always admitted."""
        limits, tokens = self.limits, sum(len(request.prompt_token_ids) for request in requests)
        waiting_requests = {choice.request_id for choice in self._waiting}
        if limits is not None and waiting_requests and (
            len(waiting_requests) >= limits.max_waiting_requests
            or sum(self._waiting.values()) + tokens > limits.max_waiting_tokens
        ):
            raise OverloadedError("The server is overloaded: too many requests are waiting. Please retry "
                                  "shortly.", retry_after=limits.retry_after_s)
        for request in requests:
            self._waiting[request.choice] = len(request.prompt_token_ids)

    async def generate(self, requests: list[EngineRequest], paced: bool = True,
                       ) -> AsyncIterator[list[RequestOutput]]:
        """One stream for all of a client request's engine requests, so one replica group admits and runs
        them all; each message carries whatever any of them produced since the last one. Closing the stream
        aborts those still running. `paced=False` yields every report at once: for a stream that a channel
        paces instead (`serve_app.channel`), with the same `StreamPacing`."""
        if not self.alive:
            raise self._failure or EngineUnavailableError("The model's engine is not running. Please retry.")
        clock = asyncio.get_running_loop()
        self._admit(requests)
        if not self._streams:  # the engine was idle: its progress is counted from now
            self._progress_at = clock.time()
        outputs: asyncio.Queue = asyncio.Queue()
        for request in requests:
            self._streams[request.choice] = outputs
            if request.params.stop and self._tokenizer is not None:
                self._stop_watches[request.choice] = StopStringWatch(self._tokenizer, request.params.stop)
        self.host.send(AddRequests(requests))
        unfinished = {request.choice for request in requests}
        self._open_calls += 1
        try:
            last_sent = None  # the first message goes at once
            while unfinished:
                batch = [await outputs.get()]
                if (paced and last_sent is not None and isinstance(batch[-1], RequestOutput)
                        and not batch[-1].finished):
                    hold = last_sent + self.pacing.interval(self._open_calls) - clock.time()
                    if hold > 0:
                        await asyncio.sleep(hold)  # let later steps join this message
                while not outputs.empty():
                    batch.append(outputs.get_nowait())
                for item in batch:
                    if isinstance(item, ServiceError):  # refused by the engine, or the engine failed
                        raise item
                    self._waiting.pop(item.choice, None)
                    if item.finished:
                        unfinished.discard(item.choice)
                last_sent = clock.time()
                yield batch
        finally:
            self._open_calls -= 1
            for request in requests:
                self._waiting.pop(request.choice, None)
                self._streams.pop(request.choice, None)
                self._stop_watches.pop(request.choice, None)
                self._stopped.discard(request.choice)
            for choice in unfinished:
                self.host.send(AbortRequest(choice))

    def _on_report(self, report: StepReport) -> None:
        """On the streams' event loop: hand each stream its share of a step."""
        self._progress_at = self._loop.time()
        if report.stats is not None:
            self._stats = report.stats
        for choice, error in report.refused.items():
            self._deliver(choice, error)
        for output in report.outputs:
            if output.choice not in self._stopped:
                self._deliver(output.choice, self._watch(output))
        if report.failure is not None and self._failure is None:  # the first report of a failure is the cause
            logger.warning("the engine stopped:\n%s", report.failure)
            self._fail(f"The model's engine failed ({report.failure.strip().splitlines()[-1]}). Please retry.")
        elif self._failure is not None:
            for choice in list(self._streams):
                self._deliver(choice, self._failure)

    def _deliver(self, choice: ChoiceId, item: RequestOutput | ServiceError) -> None:
        stream = self._streams.get(choice)
        if stream is not None:
            stream.put_nowait(item)

    def _watch(self, output: RequestOutput) -> RequestOutput:
        """`output`, ended at the token that completes a stop string if one does: the choice is finished
        here, and the engine is told to abort it."""
        watch = self._stop_watches.get(output.choice)
        if watch is None:
            return output
        keep = watch.tokens_until_stop(output.new_token_ids)
        if keep is None:
            return output
        del self._stop_watches[output.choice]
        if not output.finished:
            self._stopped.add(output.choice)
            self.host.send(AbortRequest(output.choice))
        return replace(output, new_token_ids=output.new_token_ids[:keep], finish_reason=FinishReason.STOP,
                       logprobs=output.logprobs[:keep] if output.logprobs is not None else None)
