"""A non-streamed request whose client goes away is cancelled down to its engine stream.

Uvicorn (and Ray's Python proxy) report a closed connection as an `http.disconnect` message; the ingress must
then cancel the work it awaits, or an abandoned request runs to its last token. (Streams are Starlette's: a
write to a closed connection ends them.)
"""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from serve_app.ingress.deployment import ClientDisconnected, _unless_disconnected


def _request(disconnect: asyncio.Event) -> Request:
    async def receive():
        await disconnect.wait()
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


class _EngineWork:
    """Stands for the stage stream a route awaits: runs until cancelled, or returns once `finish` is set."""

    def __init__(self):
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.cancelled = False

    async def __call__(self) -> str:
        self.started.set()
        try:
            await self.finish.wait()
            return "body"
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def test_a_client_that_leaves_cancels_the_work():
    async def run():
        disconnect, work = asyncio.Event(), _EngineWork()
        waiting = asyncio.ensure_future(_unless_disconnected(_request(disconnect), work()))
        await work.started.wait()
        disconnect.set()
        with pytest.raises(ClientDisconnected):
            await asyncio.wait_for(waiting, 60)  # a generous bound: without the watch it would never end
        await asyncio.sleep(0)  # the cancellation is delivered at the work's next step
        return work.cancelled

    assert asyncio.run(run())


def test_work_that_finishes_first_is_the_answer_and_nothing_keeps_listening():
    async def run():
        disconnect, work = asyncio.Event(), _EngineWork()
        work.finish.set()
        result = await _unless_disconnected(_request(disconnect), work())
        return result, work.cancelled, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    result, cancelled, left = asyncio.run(run())
    assert result == "body" and not cancelled
    assert all(task.done() or task.cancelling() for task in left)


def test_a_route_cancelled_from_outside_cancels_the_work():
    """Ray cancels the route's task when its own proxy sees the client go: the work must go with it."""
    async def run():
        disconnect, work = asyncio.Event(), _EngineWork()
        waiting = asyncio.ensure_future(_unless_disconnected(_request(disconnect), work()))
        await work.started.wait()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0)
        return work.cancelled

    assert asyncio.run(run())
