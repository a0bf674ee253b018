"""The replica's side of the engine: admission, one async stream per call, pacing, aborts.

Each `generate` call (all engine requests of one client request) is an async stream fed by the engine host's
reports (`engine_host.py`: the engine in its own process, or on a thread). When the caller goes away (client
disconnect, every choice done) the stream's `finally` aborts the requests still running, and their KV blocks
are free after the engine's next command drain.

Admission is bounded: a request that would push the requests (or prompt tokens) waiting for their first
token past `AdmissionLimits` is refused at once with `OverloadedError` (429 + Retry-After), and Serve's own
`max_queued_requests` bounds the calls queued in front of the deployment (`BackPressureError`, 503).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serve_app.config import EngineConfig
from serve_app.engine.engine import EngineStats
from serve_app.engine.sequence import EngineRequest, RequestOutput
from serve_app.errors import InvalidRequestError, OverloadedError, ServiceUnavailableError
from serve_app.replica.engine_host import Abort, Add, EngineProcess, EngineThread, StepReport, running_loop

EngineHost = EngineProcess | EngineThread

logger = logging.getLogger(__name__)


def client_request(request_id: str) -> str:
    """The client request an engine request belongs to: the stage names choice j of request r `r-j`."""
    return request_id.rsplit("-", 1)[0]


class EngineFailed(ServiceUnavailableError):
    """The engine has stopped or failed; the replica is unhealthy and Serve will replace it. A client gets a
    503 with Retry-After: another replica group, or this one's replacement, can serve the retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=1.0)


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


class EngineLoop:
    """The bridge from an engine host (`EngineProcess` or `EngineThread`) to asyncio streams: admission,
    one stream per `generate` call, pacing, and aborting what a closed stream leaves running."""

    def __init__(self, host: EngineHost, limits: AdmissionLimits | None = None,
                 pacing: StreamPacing | None = None):
        """Starts `host`, and raises what building its engine raised."""
        self.host = host
        self.limits = limits
        self.pacing = pacing or StreamPacing()
        # Requests added but without a first output yet (the engine's waiting queue plus prefills in
        # flight), with their prompt lengths. Touched only from the event loop that calls `generate`.
        self._waiting: dict[str, int] = {}
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._open_calls = 0  # `generate` streams open: what pacing divides the message budget among
        self._failure: EngineFailed | None = None
        self._stats: EngineStats | None = None
        host.start(self._on_report)

    @property
    def alive(self) -> bool:
        return self.host.alive() and self._failure is None

    def healthy(self) -> bool:
        """The engine runs and every rank of its tensor-parallel group is there."""
        return self.alive and self.host.healthy()

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_waiting(self) -> int:
        """Client requests admitted whose engine requests have not all produced a first token."""
        return len({client_request(request_id) for request_id in self._waiting})

    def _admit(self, requests: list[EngineRequest]) -> None:
        """Refuse a call the waiting queue has no room for. A call's requests (the `n` choices of one client
        request, and each of its prompts) are admitted together, and a lone call is always admitted."""
        limits, tokens = self.limits, sum(len(request.prompt_token_ids) for request in requests)
        waiting_groups = {client_request(request_id) for request_id in self._waiting}
        if limits is not None and waiting_groups and (
            len(waiting_groups) >= limits.max_waiting_requests
            or sum(self._waiting.values()) + tokens > limits.max_waiting_tokens
        ):
            raise OverloadedError("The server is overloaded: too many requests are waiting. Please retry "
                                  "shortly.", retry_after=limits.retry_after_s)
        for request in requests:
            self._waiting[request.request_id] = len(request.prompt_token_ids)

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[list[RequestOutput]]:
        """One stream for all of a client request's engine requests, so one replica group admits and runs
        them all; each message carries whatever any of them produced since the last one. Closing the stream
        aborts those still running."""
        if not self.alive:
            raise EngineFailed("The model's engine is not running. Please retry.")
        clock = asyncio.get_running_loop()
        self.host.attach(clock)
        self._admit(requests)
        outputs: asyncio.Queue = asyncio.Queue()
        for request in requests:
            self._streams[request.request_id] = (clock, outputs)
        self.host.send(Add(requests))
        unfinished = {request.request_id for request in requests}
        self._open_calls += 1
        try:
            if self._failure is not None:  # failed after the check above, before this stream was known
                raise EngineFailed("The model's engine is not running. Please retry.") from self._failure
            last_sent = None  # the first message goes at once
            while unfinished:
                batch = [await outputs.get()]
                if last_sent is not None and isinstance(batch[-1], RequestOutput) and not batch[-1].finished:
                    hold = last_sent + self.pacing.interval(self._open_calls) - clock.time()
                    if hold > 0:
                        await asyncio.sleep(hold)  # let later steps join this message
                while not outputs.empty():
                    batch.append(outputs.get_nowait())
                for item in batch:
                    if isinstance(item, ValueError):  # the engine refused a request itself
                        raise InvalidRequestError(str(item)) from None
                    if isinstance(item, EngineFailed):
                        raise EngineFailed("The model's engine failed while running this request. Please "
                                           "retry.") from item
                    self._waiting.pop(item.request_id, None)
                    if item.finished:
                        unfinished.discard(item.request_id)
                last_sent = clock.time()
                yield batch
        finally:
            self._open_calls -= 1
            for request in requests:
                self._waiting.pop(request.request_id, None)
                self._streams.pop(request.request_id, None)
            for request_id in unfinished:
                self.host.send(Abort(request_id))

    def stop(self) -> None:
        self.host.stop()

    def _on_report(self, report: StepReport) -> None:
        """On the host's thread or the streams' event loop: hand each stream its share of a step."""
        if report.stats is not None:
            self._stats = report.stats
        deliveries: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, list]] = {}

        def deliver(request_id: str, item: RequestOutput | BaseException) -> None:
            stream = self._streams.get(request_id)
            if stream is not None:
                deliveries.setdefault(id(stream[1]), (*stream, []))[2].append(item)

        for request_id, reason in report.refused.items():
            deliver(request_id, ValueError(reason))
        for output in report.outputs:
            deliver(output.request_id, output)
        if report.failure is not None and self._failure is None:  # the first report of a failure is the cause
            logger.warning("the engine stopped:\n%s", report.failure)
            self._failure = EngineFailed(f"the engine failed: {report.failure.strip().splitlines()[-1]}")
        if self._failure is not None:
            for request_id in list(self._streams):
                deliver(request_id, self._failure)
        here = running_loop()
        for loop, outputs, items in deliveries.values():
            if loop is here:
                _put_all(outputs, items)
            elif not loop.is_closed():  # a closed loop's streams are gone with it
                loop.call_soon_threadsafe(_put_all, outputs, items)


def _put_all(outputs: asyncio.Queue, items: list) -> None:
    for item in items:
        outputs.put_nowait(item)


