"""Stopping without losing answers: an ingress replica that drains when the application is told to stop.

In: a drain notice on the application's status board (`status_board.post_drain_notice`, written by
`llama-serve run` when it gets SIGTERM or Ctrl-C), read by `DrainWatch` about twice a second. Out: from then
on `DrainGate` refuses new work (POST) with an OpenAI-shaped 503 and answers `/health` with 503, so a load
balancer takes the replica out; requests already in flight run to their end. Each replica reports how many
are still in flight (`status_board.report_draining`), so the stopper knows when the last one has finished.
A request still running at the notice's `cut_at` is ended by the service, not by a closed connection: a
stream gets one error event, a response that has not started gets a 503. A notice withdrawn, or expired (its
stopper died), ends the drain: the replica takes requests again.

Why here and not in Serve: `serve run` cuts the streams when stopped (Ctrl-C reaches Ray's processes, SIGTERM
exits its driver at once), and Serve's own shutdown holds an ingress replica open for at most 30 s, answering
new requests meanwhile. The drain turns load balancers away at once and waits as long as an answer can last.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import ServiceUnavailableError, sse_error_event
from serve_app.ingress.edge import HEALTH_PATH, error_response, relative_path

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5
# What a refused request is told to wait before retrying: by then another replica or the restarted
# service should answer.
RETRY_AFTER_S = 5.0


def shutting_down_error() -> ServiceUnavailableError:
    return ServiceUnavailableError("The service is shutting down; retry on another replica or once it has "
                                   "restarted.", retry_after=RETRY_AFTER_S)


def cut_error() -> ServiceUnavailableError:
    return ServiceUnavailableError("The service shut down before this answer was complete; retry the request.",
                                   retry_after=RETRY_AFTER_S)


class DrainState:
    """One ingress replica's drain: whether it has begun, when requests still running are cut, and which run.

    `begin` and `end` are called from `DrainWatch`'s thread; the requests run on the replica's event loop,
    where the cut is done (`call_soon_threadsafe`), so `running` changes only there."""

    def __init__(self) -> None:
        self.draining = False
        self.cut_at: float | None = None  # time.time() at which requests still running are ended
        self.running: dict[asyncio.Task, None] = {}  # the requests in flight, each its own task
        self.cut_tasks: set[asyncio.Task] = set()  # those the cut cancelled
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def in_flight(self) -> int:
        return len(self.running)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the requests run on (the first request's)."""
        if self._loop is None:
            self._loop = loop
            if self.cut_at is not None and time.time() >= self.cut_at:
                loop.call_soon(self._cut_running)

    def begin(self, cut_at: float, now: float | None = None) -> None:
        """Drain from now on; end whatever still runs at `cut_at` (a later notice may move it)."""
        now = time.time() if now is None else now
        if not self.draining:
            logger.warning("draining: new requests are refused from now on; %d in flight, cut in %.0f s",
                           self.in_flight, max(0.0, cut_at - now))
        self.draining, self.cut_at = True, cut_at
        if now >= cut_at and self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut_running)

    def end(self) -> None:
        """The notice is gone (withdrawn, or expired: its stopper died): serve as before."""
        if self.draining:
            logger.warning("drain withdrawn: taking new requests again")
        self.draining, self.cut_at = False, None

    def _cut_running(self) -> None:
        if self.cut_at is None:  # withdrawn meanwhile
            return
        for task in list(self.running):
            if task not in self.cut_tasks:
                self.cut_tasks.add(task)
                task.cancel()  # the route's own cleanup cancels its engine request


class DrainGate:
    """ASGI middleware: tracks the requests that do work (every method but GET and HEAD), refuses new ones
    and fails `/health` while draining, and ends those still running at the cut.

    A request is cut by cancelling its own task, the one this middleware runs in: nothing is added to a
    request's path but two dict operations and a pass-through of its messages."""

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD"):
            if self.state.draining and relative_path(scope) == HEALTH_PATH:
                await error_response(shutting_down_error())(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            await error_response(shutting_down_error())(scope, receive, send)
            return
        state = self.state
        task = asyncio.current_task()
        state.bind(asyncio.get_running_loop())
        state.running[task] = None
        response = _ResponseWatch(send)
        try:
            await self.app(scope, receive, response.send)
        except asyncio.CancelledError:
            if task not in state.cut_tasks:
                raise
            if hasattr(task, "uncancel"):  # Python >= 3.11 counts cancellations: this one is handled here
                task.uncancel()
            await response.end_with(cut_error(), scope, receive)
        finally:
            state.running.pop(task, None)
            state.cut_tasks.discard(task)


class _ResponseWatch:
    """Passes a response's messages through and remembers how far it got, so that it can be ended."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False
        self.content_type = ""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            for name, value in message.get("headers", ()):
                if name.lower() == b"content-type":
                    self.content_type = value.decode("latin-1")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    async def end_with(self, error: ServiceUnavailableError, scope: Scope, receive: Receive) -> None:
        """End the response with `error`: the whole answer when nothing was sent, else its last bytes (an SSE
        error event, or the error body after a JSON answer's keep-alive spaces)."""
        if self.finished:
            return
        if not self.started:
            await error_response(error)(scope, receive, self._send)
            return
        if self.content_type.startswith("text/event-stream"):
            tail = sse_error_event(error).encode()
        else:
            tail = error_response(error).body
        await self._send({"type": "http.response.body", "body": tail, "more_body": False})


class DrainWatch:
    """A daemon thread that reads the application's drain notice and, once draining, reports this replica's
    requests in flight: `read_notice()` returns the notice's `cut_at` (or None), `report(in_flight)` writes."""

    def __init__(self, state: DrainState, read_notice, report, interval_s: float = WATCH_INTERVAL_S) -> None:
        self.state = state
        self._read_notice = read_notice
        self._report = report
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drain-watch", daemon=True)

    def start(self) -> DrainWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self) -> None:
        cut_at = self._read_notice()
        if cut_at is not None:
            self.state.begin(cut_at)
        else:
            self.state.end()
        if self.state.draining:
            self._report(self.state.in_flight)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - the board may be briefly unreachable; try again
                logger.warning("reading the drain notice failed: %s", type(exc).__name__)

