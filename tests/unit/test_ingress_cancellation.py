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


class _Events:
    """Stands for the stage's stream handle: records that the route cancelled it."""

    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class _Meter:
    def __init__(self):
        self.statuses: list[int] = []

    def finish(self, status: int) -> None:
        self.statuses.append(status)


def test_a_kept_alive_answer_is_spaces_then_the_json_body():
    import json

    from serve_app.ingress.deployment import _json_with_keepalive

    async def run():
        work, events, meter = _EngineWork(), _Events(), _Meter()

        async def body():
            return {"answer": await work()}

        parts = []
        async for part in _json_with_keepalive(body(), events, meter, 0.01):
            parts.append(part)
            if len(parts) == 3:
                work.finish.set()  # the engine finishes after a few keep-alives
        return parts, events, meter

    parts, events, meter = asyncio.run(run())
    assert parts[:3] == [b" "] * 3 and json.loads(b"".join(parts)) == {"answer": "body"}
    assert events.cancelled and meter.statuses == [200]


def test_a_kept_alive_answer_that_fails_ends_with_the_openai_error_and_its_status_is_counted():
    import json

    from serve_app.errors import EngineUnavailableError
    from serve_app.ingress.deployment import _json_with_keepalive

    async def failing():
        raise EngineUnavailableError("the engine has stopped")

    async def run():
        meter = _Meter()
        parts = [part async for part in _json_with_keepalive(failing(), _Events(), meter, 0.01)]
        return parts, meter

    parts, meter = asyncio.run(run())
    error = json.loads(b"".join(parts))["error"]
    assert error["code"] == "service_unavailable" and meter.statuses == [503]


def test_a_client_gone_from_a_kept_alive_answer_cancels_the_engine_request():
    """Starlette closes the body's generator when a write fails (the client left): the work is cancelled."""
    from serve_app.ingress.deployment import CLIENT_CLOSED_REQUEST, _json_with_keepalive

    async def run():
        work, events, meter = _EngineWork(), _Events(), _Meter()
        answer = _json_with_keepalive(work(), events, meter, 0.01)
        assert await anext(answer) == b" "
        await answer.aclose()
        await asyncio.sleep(0)
        return work.cancelled, events.cancelled, meter.statuses

    assert asyncio.run(run()) == (True, True, [CLIENT_CLOSED_REQUEST])


def test_deadlines_end_a_request_without_a_first_token_and_one_that_runs_too_long():
    from serve_app.errors import RequestTimeoutError
    from serve_app.ingress.deployment import Deadline

    async def never():
        await asyncio.Event().wait()

    async def endless():
        while True:
            await asyncio.sleep(0.001)
            yield "token"

    async def run():
        with pytest.raises(RequestTimeoutError) as first:
            await Deadline(None).first_token(never(), first_token_s=0.05)
        tokens = []
        with pytest.raises(RequestTimeoutError) as total:
            async for token in Deadline(0.05).bound(endless()):
                tokens.append(token)
        return first.value, total.value, tokens

    first, total, tokens = asyncio.run(run())
    assert first.status_code == 504 and first.code == "request_timeout" and "first token" in str(first)
    assert total.status_code == 504 and "0.05 s limit" in str(total) and tokens  # it streamed until then
