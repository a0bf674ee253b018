"""The loop that owns a replica group's rank-0 engine, and the messages between it and the replica.

`run_engine_loop` drives an `Engine` (which is not thread-safe) on one thread: between steps it applies the
commands that arrived (`AddRequests`, `AbortRequest`, `StopEngine`); it steps while there is work and
heartbeats while idle; after every step it sends a `StepReport` with that step's outputs, the engine's stats
and the requests it refused (when added, or later: a grammar that could not be prepared). The loop is the
same wherever the engine runs, and `EngineHost` is what the replica's `EngineClient` needs of that place:

- `process_host.EngineProcess`: a child process of the replica, commands and reports over a pipe (default);
- `thread_host.EngineThread`: a thread of the replica's process (`engine.separate_process: false`, tests).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from serve_app.engine.engine import Engine, EngineStats
from serve_app.engine.sequence import ChoiceId, EngineRequest, RequestOutput
from serve_app.errors import ServiceError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddRequests:
    """One call's requests (a client request's `n` choices and prompts): in one command, so the engine admits
    them in the same step."""

    requests: list[EngineRequest]


@dataclass(frozen=True)
class AbortRequest:
    choice: ChoiceId


@dataclass(frozen=True)
class StopEngine:
    pass


Command = AddRequests | AbortRequest | StopEngine


@dataclass(frozen=True)
class StepReport:
    """What the engine sends its replica after building, after each step, and after applying commands."""

    stats: EngineStats | None
    outputs: list[RequestOutput] = field(default_factory=list)
    refused: dict[ChoiceId, ServiceError] = field(default_factory=dict)  # why the engine refused a choice
    failure: str | None = None  # the engine failed (its traceback, for the log); nothing follows this report


ReportSink = Callable[[StepReport], None]


class EngineHost(Protocol):
    """Where the engine runs, as the replica's `EngineClient` sees it."""

    def start(self, on_report: ReportSink, loop: asyncio.AbstractEventLoop) -> None:
        """Build the engine and start its loop; raise what building raised. Every report, the first (after
        building) included, is handed to `on_report` on `loop`, the event loop the streams run on."""

    def send(self, command: Command) -> None:
        """Queue a command for the engine loop; never blocks the caller."""

    def alive(self) -> bool:
        """The engine loop runs."""

    def healthy(self) -> bool:
        """The engine loop runs and every rank of its tensor-parallel group is there."""

    def stop(self) -> None:
        """Stop the engine (its group with it); a last report with a `failure` fails the open streams."""

    def kill(self) -> None:
        """Stop the engine now, without waiting for it (it may be hung, reading no command), and its group."""


def run_engine_loop(engine: Engine, heartbeat_interval_s: float,
                    next_command: Callable[[float], Command | None], report: ReportSink) -> None:
    """Drive `engine` until `StopEngine` arrives or it fails; then shut its tensor-parallel group down.

    `next_command(timeout)` returns the next command, waiting up to `timeout` seconds for one (0: only one
    already there), or None. A failure is reported, not raised: whoever waits on a stream must hear of it.
    """
    try:
        while True:
            idle = not engine.has_unfinished()
            refused: dict[ChoiceId, ServiceError] = {}
            applied = False
            command = next_command(heartbeat_interval_s if idle else 0)
            while command is not None:
                if isinstance(command, StopEngine):
                    return
                if isinstance(command, AbortRequest):
                    engine.abort_request(command.choice)
                else:
                    for request in command.requests:
                        try:
                            engine.add_request(request)
                        except ServiceError as error:
                            refused[request.choice] = error
                applied = True
                command = next_command(0)
            if idle and not applied:
                engine.heartbeat()  # a dead rank surfaces as a collective timeout, not a silent hang
                continue
            outputs = engine.step() if engine.has_unfinished() else []
            refused.update(engine.pop_refused())  # requests that failed after they were added (grammars)
            report(StepReport(engine.stats(), outputs, refused))
    except BaseException:  # reported to every stream, then the group is shut down
        logger.exception("engine loop failed")
        report(StepReport(None, failure=traceback.format_exc()))
    finally:
        try:  # release the followers rather than leave them waiting in a collective
            engine.shutdown()
        except Exception:
            logger.warning("the tensor-parallel group did not shut down cleanly", exc_info=True)
