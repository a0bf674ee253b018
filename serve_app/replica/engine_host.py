"""Where a replica group's rank-0 engine runs: its own process (the default), or a thread of the replica's.

`run_engine` is the loop that owns an `Engine` (the engine is not thread-safe). Between steps it applies the
add/abort commands that arrived; it steps while there is work and heartbeats while idle; after every step it
sends a `StepReport` with that step's outputs and the engine's stats. The loop is the same in both homes:

- `EngineProcess` runs it as the main thread of a child process, commands and reports going over a pipe.
  The replica's event loop runs Ray Serve's streaming for every message it sends, and that is Python; on a
  thread of the same process it took turns with the engine's Python on one GIL, so every message delayed a
  step (docs/benchmarks.md). In its own process the engine steps while the replica streams.
- `EngineThread` runs it on a thread of the calling process: tests, benchmarks, and
  `engine.separate_process: false`.

Each host delivers reports to an `on_report` callback: the thread host from its thread, the process host on
the event loop its streams run on (`attach`).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.engine import Engine, EngineStats, build_engine
from serve_app.engine.sequence import EngineRequest, RequestOutput

logger = logging.getLogger(__name__)

ENGINE_TITLE = "llama_serve::engine"
# How often a starting engine process's replica checks that the follower ranks are still there.
FOLLOWER_CHECK_INTERVAL_S = 0.5


@dataclass(frozen=True)
class Add:
    """One call's requests (a client request's `n` choices and prompts): in one command, so the engine admits
    them in the same step."""

    requests: list[EngineRequest]


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Stop:
    pass


Command = Add | Abort | Stop


@dataclass(frozen=True)
class StepReport:
    """What the engine sends its replica after building, after each step, and after applying commands."""

    stats: EngineStats | None
    outputs: list[RequestOutput] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # request id -> why the engine refused it
    failure: str | None = None  # the engine failed (its traceback); nothing follows this report


def run_engine(engine: Engine, heartbeat_interval_s: float, next_command: Callable[[float], Command | None],
               report: Callable[[StepReport], None]) -> None:
    """Drive `engine` until a `Stop` arrives or it fails; then shut its tensor-parallel group down.

    `next_command(timeout)` returns the next command, waiting up to `timeout` seconds for one (0: only one
    already there), or None. A failure is reported, not raised: whoever waits on a stream must hear of it.
    """
    try:
        while True:
            idle = not engine.has_unfinished()
            refused: dict[str, str] = {}
            applied = False
            command = next_command(heartbeat_interval_s if idle else 0)
            while command is not None:
                if isinstance(command, Stop):
                    return
                if isinstance(command, Abort):
                    engine.abort_request(command.request_id)
                else:
                    for request in command.requests:
                        try:
                            engine.add_request(request.request_id, request.prompt_token_ids, request.params)
                        except ValueError as exc:
                            refused[request.request_id] = str(exc)
                applied = True
                command = next_command(0)
            if idle and not applied:
                engine.heartbeat()  # a dead rank surfaces as a collective timeout, not a silent hang
                continue
            outputs = engine.step() if engine.has_unfinished() else []
            report(StepReport(engine.stats(), outputs, refused))
    except BaseException:  # reported to every stream, then the group is shut down
        logger.exception("engine loop failed")
        report(StepReport(None, failure=traceback.format_exc()))
    finally:
        try:  # release the followers rather than leave them waiting in a collective
            engine.shutdown()
        except Exception:
            logger.warning("the tensor-parallel group did not shut down cleanly", exc_info=True)


class EngineThread:
    """The engine on a thread of this process. The thread builds the engine itself, so that all of this rank's
    torch work runs on one thread: a second thread running torch ops starts a second OpenMP team, and once a
    process has more OpenMP threads than cores, libgomp's workers stop spinning between parallel regions. On
    2 cores that made a 110-token prefill take 16 ms instead of 10 (docs/benchmarks.md)."""

    def __init__(self, engine: Engine | Callable[[], Engine], heartbeat_interval_s: float):
        self._build = engine if callable(engine) and not isinstance(engine, Engine) else (lambda: engine)
        self.heartbeat_interval_s = heartbeat_interval_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._on_report: Callable[[StepReport], None] | None = None
        self.engine: Engine | None = None

    def start(self, on_report: Callable[[StepReport], None]) -> None:
        """Build the engine and start stepping it; raises what building raised."""
        self._on_report = on_report
        built = threading.Event()
        failure: list[BaseException] = []

        def body() -> None:
            try:
                self.engine = self._build()
                on_report(StepReport(self.engine.stats()))
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the calling thread
                failure.append(exc)
                return
            finally:
                built.set()
            run_engine(self.engine, self.heartbeat_interval_s, self._next_command, on_report)

        self._thread = threading.Thread(target=body, name="engine-loop", daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            raise failure[0]

    def _next_command(self, timeout: float) -> Command | None:
        try:
            return self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait()
        except queue.Empty:
            return None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reports come from the engine thread, whatever loop the streams are on."""

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def healthy(self) -> bool:
        return self.alive() and self.engine is not None and self.engine.healthy()

    def stop(self) -> None:
        """Stop the engine (its group shuts down with it); open streams fail."""
        self.send(Stop())
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._on_report is not None:
                self._on_report(StepReport(None, failure="the engine was stopped"))


class EngineProcess:
    """The engine in a child process, with this process keeping the tensor-parallel followers.

    Ranks 1..N-1 are started here, because only the replica's process is in the replica's placement group
    (Ray actors); the child joins them as rank 0. Commands go over the pipe from a writer thread, so a
    full pipe (the engine busy with a long step) never blocks the caller's event loop. Reports are read by
    that event loop itself when the pipe has data: a reader thread would wake for every step and then wait
    for the interpreter lock the event loop holds (about 1 ms more to a first token, measured). The child
    exits when the pipe closes, so a replica killed outright does not leave an engine holding its GPU.
    """

    def __init__(self, model: ModelConfig, engine: EngineConfig, *, use_ray: bool, title: str = ENGINE_TITLE):
        """`title`: the child's process title (what `ps`, `top` and `nvidia-smi` show), rather than Python's
        `-c from multiprocessing.spawn import spawn_main ...`."""
        from serve_app.parallel.group import start_followers

        self.address, self.followers = start_followers(model, engine, use_ray=use_ray)
        context = multiprocessing.get_context("spawn")  # a forked child would inherit Ray's and torch's threads
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(target=_engine_process_main, name="llama-engine", daemon=True,
                                        args=(child_end, model, engine, self.address, title))
        self._child_end = child_end
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # (pickled command, is it Stop)
        self._writer = threading.Thread(target=self._write, name="engine-commands", daemon=True)
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_report: Callable[[StepReport], None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self, on_report: Callable[[StepReport], None]) -> None:
        """Start the child and wait until its engine is built; raises `RuntimeError` if building failed."""
        # Either way a group that failed to start leaves its live ranks waiting in a collective: kill them at once.
        try:
            self._process.start()
        except BaseException:
            self._release_followers(timeout_s=0.0)
            raise
        self._child_end.close()  # so that the child's exit reads as end-of-file here
        ready = self._wait_until_built()
        if ready.failure is not None:
            self._process.join(timeout=5)
            self._pipe.close()
            self._release_followers(timeout_s=0.0)
            raise RuntimeError(f"building the engine failed:\n{ready.failure}")
        on_report(ready)
        self._on_report = on_report
        self._writer.start()

    def _wait_until_built(self) -> StepReport:
        """The child's first report, or why there will be none. A follower rank that dies meanwhile (out of
        memory while loading or warming up, killed) ends the wait at once: rank 0 would otherwise sit in a
        collective until `collective_timeout_s` and then report only a timeout."""
        while not self._pipe.poll(FOLLOWER_CHECK_INTERVAL_S):
            failure = self.followers.failure() if self.followers is not None else None
            if failure is not None:
                self._process.kill()
                self._process.join(timeout=5)
                return StepReport(None, failure=f"a tensor-parallel follower failed while the group started: "
                                                f"{failure}")
        try:
            return self._pipe.recv()
        except EOFError:
            self._process.join(timeout=5)
            return StepReport(None, failure=f"the engine process exited with code {self._process.exitcode}")

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read reports on `loop`, the event loop that serves the streams, when data arrives: no thread of
        our own waking up for each step and waiting for the interpreter lock the event loop holds. The
        loop must keep running while the engine does (a replica's does)."""
        if loop is self._loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("an engine process reports to one event loop at a time")
        self._loop = loop
        loop.add_reader(self._pipe.fileno(), self._read_reports)

    def send(self, command: Command) -> None:
        """Queue `command` for the writer thread; pickled here, so a command that cannot be sent fails its
        caller instead of the writer."""
        self._commands.put((ForkingPickler.dumps(command), isinstance(command, Stop)))

    def _write(self) -> None:
        while True:
            payload, is_stop = self._commands.get()
            try:
                self._pipe.send_bytes(payload)
            except (BrokenPipeError, OSError):  # the child is gone; reading its end-of-file says so
                return
            except Exception:  # every stream waits on what it sent: fail them rather than leave them hanging
                logger.exception("sending to the engine process failed")
                self._on_report(StepReport(None, failure=traceback.format_exc()))
                return
            if is_stop:
                return

    def _read_reports(self) -> None:
        try:
            while self._pipe.poll(0):
                report: StepReport = self._pipe.recv()
                self._on_report(report)
        except (EOFError, OSError):
            self._loop.remove_reader(self._pipe.fileno())
            self._pipe.close()
            self._on_report(StepReport(None, failure=self._ending()))

    def _ending(self) -> str:
        if self._stopping:
            return "the engine was stopped"
        return f"the engine process exited (exit code {self._process.exitcode})"  # exitcode does not block

    def alive(self) -> bool:
        return self._process.is_alive() and self._writer.is_alive()

    def healthy(self) -> bool:
        return self.alive() and (self.followers is None or self.followers.healthy())

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the engine (its group shuts down with it), release the followers; open streams fail."""
        if self._stopping:
            return
        self._stopping = True
        self.send(Stop())
        # Unless the streams' event loop is running elsewhere, nothing reads the pipe while this waits: drain
        # it here, or a child blocked sending a report would never read its Stop.
        reading_here = self._loop is None or self._loop.is_closed() or running_loop() is self._loop
        deadline = time.monotonic() + timeout_s
        while self._process.is_alive() and time.monotonic() < deadline:
            if not reading_here or self._pipe.closed:
                self._process.join(timeout=0.1)
                continue
            try:
                if self._pipe.poll(0.1):
                    self._pipe.recv()  # the streams fail below; their last outputs go with them
            except (EOFError, OSError):
                self._process.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            logger.warning("the engine process did not stop in %.0f s; killing it", timeout_s)
            self._process.kill()
            self._process.join(timeout=5)
        if reading_here and not self._pipe.closed:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._pipe.fileno())
            self._pipe.close()
            if self._on_report is not None:
                self._on_report(StepReport(None, failure=self._ending()))
        self._release_followers()

    def _release_followers(self, timeout_s: float = 30.0) -> None:
        if self.followers is not None:
            self.followers.join(timeout_s)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running on this thread, or None on a thread without one (an engine thread)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _engine_process_main(pipe: Connection, model: ModelConfig, engine_config: EngineConfig, address,
                         title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # a machine with only the engine's own dependencies (a benchmark box): keep Python's
        pass
    else:
        setproctitle.setproctitle(title)
    logging.basicConfig(level=logging.INFO)
    try:
        engine = build_engine(model, engine_config, address=address)
    except BaseException:  # noqa: BLE001 - the parent raises it
        pipe.send(StepReport(None, failure=traceback.format_exc()))
        return
    pipe.send(StepReport(engine.stats()))

    def next_command(timeout: float) -> Command | None:
        try:
            if not pipe.poll(timeout):
                return None
            return pipe.recv()
        except (EOFError, OSError):  # the replica is gone
            return Stop()

    def report(step: StepReport) -> None:
        try:
            pipe.send(step)
        except (BrokenPipeError, OSError):
            pass  # the replica is gone; the next command read says so and stops the loop

    run_engine(engine, engine_config.heartbeat_interval_s, next_command, report)
