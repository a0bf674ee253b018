"""The replica group's rank-0 engine in a child process of the replica: the default home.

The replica's event loop runs Ray Serve's streaming for every message it sends, and that is Python; on a
thread of the same process it would take turns with the engine's Python on one interpreter lock, so every
message would delay a step. In its own process the engine steps while the replica streams.

In: `Command`s from the replica (`send`). Out: `StepReport`s, read from the pipe by the replica's event loop
(`start(on_report, loop)`).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import socket
import threading
import time
import traceback
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.engine import build_engine
from serve_app.engine.worker import run_worker
from serve_app.parallel.group import GroupAddress, TensorParallelGroup
from serve_app.replica.engine_loop import Command, ReportSink, StepReport, StopEngine, run_engine_loop

logger = logging.getLogger(__name__)

ENGINE_TITLE = "llama_serve::engine"
# How often a starting engine process's replica checks that the follower ranks are still there.
FOLLOWER_CHECK_INTERVAL_S = 0.5


class EngineProcess:
    """The engine in a child process, with this process owning the tensor-parallel group's followers.

    Ranks 1..N-1 are launched here, because only the replica's process is in the replica's placement group
    (Ray actors); the child joins them as rank 0. Commands go over the pipe from a writer thread, so a
    full pipe (the engine busy with a long step) never blocks the caller's event loop. Reports are read by
    that event loop itself when the pipe has data: a reader thread would wake for every step and then wait
    for the interpreter lock the event loop holds. The child exits when the pipe closes, so a replica killed
    outright does not leave an engine holding its GPU.
    """

    def __init__(self, model: ModelConfig, engine: EngineConfig, *, use_ray: bool, title: str = ENGINE_TITLE):
        """`title`: the child's process title (what `ps`, `top` and `nvidia-smi` show), rather than Python's
        `-c from multiprocessing.spawn import spawn_main ...`."""
        self.group = TensorParallelGroup.launch(model, engine, run_worker, use_ray=use_ray)
        context = multiprocessing.get_context("spawn")  # a forked child would inherit Ray's and torch's threads
        self._pipe, child_end = context.Pipe()
        # Rank 0's listening socket goes to the child with its arguments (spawn duplicates it there).
        self._listener = self.group.take_listener()
        self._process = context.Process(target=_engine_process_main, name="llama-engine", daemon=True,
                                        args=(child_end, model, engine, self.group.address, self._listener,
                                              title))
        self._child_end = child_end
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # (pickled command, is it StopEngine)
        self._writer = threading.Thread(target=self._write, name="engine-commands", daemon=True)
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_report: ReportSink | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self, on_report: ReportSink, loop: asyncio.AbstractEventLoop) -> None:
        """Start the child and wait until its engine is built; raises `RuntimeError` if building failed.
        Then `loop` reads the reports, when data arrives: the loop must keep running while the engine does
        (a replica's does)."""
        # Either way a group that failed to start leaves its live ranks waiting in a collective: kill them at once.
        try:
            self._process.start()
        except BaseException:
            self.group.stop(timeout_s=0.0)
            raise
        finally:
            if self._listener is not None:  # the child holds its own copy now, or will never run
                self._listener.close()
        self._child_end.close()  # so that the child's exit reads as end-of-file here
        ready = self._wait_until_built()
        if ready.failure is not None:
            self._process.join(timeout=5)
            self._pipe.close()
            self.group.stop(timeout_s=0.0)
            raise RuntimeError(f"building the engine failed:\n{ready.failure}")
        self._on_report, self._loop = on_report, loop
        on_report(ready)
        loop.add_reader(self._pipe.fileno(), self._read_reports)
        self._writer.start()

    def _wait_until_built(self) -> StepReport:
        """The child's first report, or why there will be none. A follower rank that dies meanwhile (out of
        memory while loading or warming up, killed) ends the wait at once: rank 0 would otherwise sit in a
        collective until `collective_timeout_s` and then report only a timeout."""
        while not self._pipe.poll(FOLLOWER_CHECK_INTERVAL_S):
            failure = self.group.failure()
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

    def send(self, command: Command) -> None:
        """Queue `command` for the writer thread; pickled here, so a command that cannot be sent fails its
        caller instead of the writer."""
        self._commands.put((ForkingPickler.dumps(command), isinstance(command, StopEngine)))

    def _write(self) -> None:
        while True:
            payload, is_stop = self._commands.get()
            try:
                self._pipe.send_bytes(payload)
            except (BrokenPipeError, OSError):  # the child is gone; reading its end-of-file says so
                return
            except Exception:  # every stream waits on what it sent: fail them rather than leave them hanging
                logger.exception("sending to the engine process failed")
                self._loop.call_soon_threadsafe(self._on_report, StepReport(None, failure=traceback.format_exc()))
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
        return self.alive() and self.group.healthy()

    def kill(self) -> None:
        """SIGKILL the engine's process (a hung one frees its GPU with it) and its followers; its pipe's end
        of file then fails the streams."""
        self._stopping = True
        self._process.kill()
        self.group.stop(timeout_s=0.0)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the engine (its group shuts down with it), release the followers; open streams fail."""
        if self._stopping:
            return
        self._stopping = True
        self.send(StopEngine())
        # Unless the streams' event loop is running elsewhere, nothing reads the pipe while this waits: drain
        # it here, or a child blocked sending a report would never read its StopEngine.
        reading_here = self._loop is None or self._loop.is_closed() or _running_loop() is self._loop
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
        self.group.stop()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _engine_process_main(pipe: Connection, model: ModelConfig, engine_config: EngineConfig,
                         address: GroupAddress, listener: socket.socket | None, title: str) -> None:
    logging.basicConfig(level=logging.INFO)
    try:
        import setproctitle
    except ImportError:  # a machine with only the engine's own dependencies (a benchmark box): keep Python's
        logger.warning("setproctitle is not installed: the engine process keeps Python's name in ps, not %r",
                       title)
    else:
        setproctitle.setproctitle(title)
    try:
        engine = build_engine(model, engine_config, address, listener=listener)
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
            return StopEngine()

    def report(step: StepReport) -> None:
        try:
            pipe.send(step)
        except (BrokenPipeError, OSError):
            pass  # the replica is gone; the next command read says so and stops the loop

    run_engine_loop(engine, engine_config.heartbeat_interval_s, next_command, report)
