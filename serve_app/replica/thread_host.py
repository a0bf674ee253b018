"""The replica group's rank-0 engine on a thread of the replica's process (`engine.separate_process: false`).

No second process on the engine's cores, at the price of sharing one interpreter lock with the replica's
streaming: worth it where cores are few (`configs/tiny-tp1.yaml`), and what tests and benchmarks use to run
the whole replica side in one process.

In: `Command`s from the replica (`send`). Out: `StepReport`s, handed to the replica's event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.engine import Engine, start_engine
from serve_app.replica.engine_loop import Command, ReportSink, StepReport, StopEngine, run_engine_loop


class EngineThread:
    """The engine on a thread of this process, which also owns its tensor-parallel group.

    The thread builds the engine itself, so that all of this rank's torch work runs on one thread: a second
    thread running torch ops starts a second OpenMP team, and once a process has more OpenMP threads than
    cores, libgomp's workers stop spinning between parallel regions, which slows every step on a small
    machine.
    """

    def __init__(self, model: ModelConfig, engine: EngineConfig, *, use_ray: bool = False):
        self._model, self._config, self._use_ray = model, engine, use_ray
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._on_report: ReportSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine: Engine | None = None

    def start(self, on_report: ReportSink, loop: asyncio.AbstractEventLoop) -> None:
        """Build the engine and start stepping it; raises what building raised. The first report is handed
        to `on_report` before this returns, the rest on `loop` as they come."""
        self._on_report, self._loop = on_report, loop
        built = threading.Event()
        failure: list[BaseException] = []
        first: list[StepReport] = []

        def body() -> None:
            try:
                self.engine = start_engine(self._model, self._config, use_ray=self._use_ray)
                first.append(StepReport(self.engine.stats()))
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the calling thread
                failure.append(exc)
                return
            finally:
                built.set()
            run_engine_loop(self.engine, self._config.heartbeat_interval_s, self._next_command, self._report)

        self._thread = threading.Thread(target=body, name="engine-loop", daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            raise failure[0]
        on_report(first[0])

    def _report(self, report: StepReport) -> None:
        if not self._loop.is_closed():  # a closed loop's streams are gone with it
            self._loop.call_soon_threadsafe(self._on_report, report)

    def _next_command(self, timeout: float) -> Command | None:
        try:
            return self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait()
        except queue.Empty:
            return None

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def healthy(self) -> bool:
        return self.alive() and self.engine is not None and self.engine.healthy()

    def kill(self) -> None:
        """A thread cannot be killed: the loop is told to stop (if it ever reads again) and the followers are
        killed, which fails a step waiting on them; the thread ends with the process, which Serve replaces."""
        self.send(StopEngine())
        if self.engine is not None and self.engine.group is not None:
            self.engine.group.stop(timeout_s=0.0)

    def stop(self) -> None:
        """Stop the engine (its group shuts down with it); open streams fail."""
        self.send(StopEngine())
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._on_report is not None:
                self._on_report(StepReport(None, failure="the engine was stopped"))
