"""The Llama 2 replica group: one Serve replica per tensor-parallel group, wrapping the engine.

Rank 0 runs in this replica's process; `build_engine` starts ranks 1..N-1 as actors in the replica's
placement-group bundles. A single engine thread owns the engine (it is not thread-safe): it drains the
add/abort commands, steps while there is work, and sends heartbeats while idle. Each `generate` call (all
engine requests of one client request) is an async stream fed by that thread; when the caller goes away
(client disconnect, every choice done) the stream's `finally` aborts the requests still running, and their KV
blocks are free after the engine's next command drain.

Admission is bounded: a request that would push the requests (or prompt tokens) waiting for their first
token past `AdmissionLimits` is refused at once with `OverloadedError` (429 + Retry-After), and Serve's own
`max_queued_requests` bounds the calls queued in front of this deployment (`BackPressureError`, 503).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ray import serve

from serve_app.autoscaling import engine_load_metrics
from serve_app.config import AppConfig, EngineConfig
from serve_app.engine.engine import Engine, EngineStats, build_engine
from serve_app.engine.sequence import EngineRequest, RequestOutput
from serve_app.errors import InvalidRequestError, OverloadedError

logger = logging.getLogger(__name__)


def client_request(request_id: str) -> str:
    """The client request an engine request belongs to: the stage names choice j of request r `r-j`."""
    return request_id.rsplit("-", 1)[0]


class EngineFailed(RuntimeError):
    """The engine thread died; the replica is unhealthy and Serve will replace it."""


@dataclass(frozen=True)
class StreamPacing:
    """How often one stream may send once its first token is out (that one always goes at once).

    Every message costs CPU in each deployment it crosses (serialization, an event-loop wake-up, an SSE
    write), and on the same cores as the engine. With `messages_per_s`, the interval grows with the number
    of open streams, so the replica group's message rate stays bounded however many streams are open,
    while a lone stream still gets every step's tokens.
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
    """The thread that owns an `Engine`, and the bridge from it to asyncio streams."""

    def __init__(self, engine: Engine | Callable[[], Engine], heartbeat_interval_s: float,
                 limits: AdmissionLimits | None = None, pacing: StreamPacing | None = None):
        """`engine`, or a function that builds it. Given the function, the engine thread builds the engine
        itself, so that all of this rank's torch work runs on one thread: a second thread running torch ops
        starts a second OpenMP team, and once a process has more OpenMP threads than cores, libgomp's
        workers stop spinning between parallel regions. On 2 cores that made a 110-token prefill take
        16 ms instead of 10 (docs/benchmarks.md). Raises what building raised."""
        self.heartbeat_interval_s = heartbeat_interval_s
        self.limits = limits
        self.pacing = pacing or StreamPacing()
        # Requests added but without a first output yet (the engine's waiting queue plus prefills in
        # flight), with their prompt lengths. Touched only from the event loop that calls `generate`.
        self._waiting: dict[str, int] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._open_calls = 0  # `generate` streams open: what pacing divides the message budget among
        self._failure: BaseException | None = None
        build = engine if callable(engine) and not isinstance(engine, Engine) else (lambda: engine)
        built = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build, built), name="engine-loop", daemon=True)
        self._thread.start()
        built.wait()
        if self._failure is not None:
            raise self._failure

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._failure is None

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
            raise EngineFailed("the engine is not running")
        self._admit(requests)
        clock = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        for request in requests:
            self._streams[request.request_id] = (clock, outputs)
            self._commands.put(("add", request))
        unfinished = {request.request_id for request in requests}
        self._open_calls += 1
        try:
            if self._failure is not None:  # failed after the check above, before this stream was known
                raise EngineFailed("the engine is not running") from self._failure
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
                    if isinstance(item, BaseException):
                        raise EngineFailed("the engine failed while running this request") from item
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
                self._commands.put(("abort", request_id))

    def stop(self) -> None:
        self._commands.put(("stop", None))
        self._thread.join(timeout=30)

    # -- the engine thread ----------------------------------------------------------------------------------

    def _run(self, build: Callable[[], Engine], built: threading.Event) -> None:
        try:
            self.engine = build()
            self._stats = self.engine.stats()
        except BaseException as exc:  # noqa: BLE001 - re-raised by __init__ in the calling thread
            self._failure = exc
            return
        finally:
            built.set()
        try:
            while True:
                block = not self.engine.has_unfinished()
                if not self._drain(block):
                    break
                if self.engine.has_unfinished():
                    for output in self.engine.step():
                        self._deliver(output.request_id, output)
                self._stats = self.engine.stats()
            self.engine.shutdown()
        except BaseException as exc:  # every stream must learn that the engine is gone
            logger.exception("engine loop failed")
            self._failure = exc
            for request_id in list(self._streams):
                self._deliver(request_id, exc)
            try:  # release the followers rather than leave them waiting in a collective
                self.engine.shutdown()
            except Exception:
                logger.warning("the tensor-parallel group did not shut down cleanly", exc_info=True)

    def _drain(self, block: bool) -> bool:
        """Apply pending commands; when idle, wait for one (heartbeating). False when asked to stop."""
        while True:
            try:
                if block:
                    command, arg = self._commands.get(timeout=self.heartbeat_interval_s)
                    block = False
                else:
                    command, arg = self._commands.get_nowait()
            except queue.Empty:
                if block:
                    self.engine.heartbeat()
                    continue
                return True
            if command == "stop":
                return False
            if command == "add":
                try:
                    self.engine.add_request(arg.request_id, arg.prompt_token_ids, arg.params)
                except ValueError as exc:
                    self._deliver(arg.request_id, exc)
            elif command == "abort":
                self.engine.abort_request(arg)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)


REPLICA_MAX_QUEUED_REQUESTS = 128


@serve.deployment(name="LlamaReplica", max_queued_requests=REPLICA_MAX_QUEUED_REQUESTS)
class LlamaReplica:
    """Serve wrapper: one tensor-parallel engine per replica."""

    def __init__(self, config: AppConfig):
        logging.basicConfig(level=logging.INFO)
        api = config.api
        limits = AdmissionLimits(api.max_waiting_requests, api.max_waiting_tokens, api.retry_after_s)
        self.loop = EngineLoop(lambda: build_engine(config.model, config.engine, use_ray=True),
                               config.engine.heartbeat_interval_s, limits,
                               StreamPacing.from_config(config.engine))

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[list[RequestOutput]]:
        async for batch in self.loop.generate(requests):
            yield batch

    def stats(self) -> EngineStats:
        return self.loop.stats

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine's own load, for `serve_app.autoscaling.EngineLoadPolicy`."""
        return engine_load_metrics(self.loop.stats)

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        if not self.loop.alive:
            raise EngineFailed("the engine loop has stopped")
        if not self.loop.engine.healthy():
            raise EngineFailed("a tensor-parallel rank has died")

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None and loop.alive:
            loop.stop()
