"""The replica's engine watchdog without Ray: a hung engine or a lost rank fails its streams with a 503 and is
killed, the client turns unhealthy and admits nothing more; an idle engine is never taken for a hung one."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest, FinishReason, RequestOutput
from serve_app.errors import EngineUnavailableError, to_service_error
from serve_app.replica.engine_client import EngineClient
from serve_app.replica.engine_loop import StepReport


class SilentHost:
    """An engine host whose engine takes requests and then never reports again (a hung step), or whose
    tensor-parallel group loses a rank when the test says so."""

    def __init__(self):
        self.killed = False
        self.rank_lost = False

    def start(self, on_report, loop):
        self.on_report = on_report
        on_report(StepReport(None))

    def send(self, command):
        pass

    def alive(self):
        return not self.killed

    def healthy(self):
        return self.alive() and not self.rank_lost

    def stop(self):
        pass

    def kill(self):
        self.killed = True


def _request(name: str) -> EngineRequest:
    return EngineRequest(ChoiceId(name, 0), [1, 2, 3], SamplingParams(max_tokens=8))


async def _drain(client: EngineClient, name: str) -> None:
    async for _ in client.generate([_request(name)]):
        pass


def test_a_hung_engine_fails_its_streams_and_is_killed():
    host = SilentHost()

    async def run() -> None:
        client = EngineClient(host, step_timeout_s=0.5)
        with pytest.raises(EngineUnavailableError, match="has not finished a step") as failed:
            await asyncio.wait_for(_drain(client, "hung"), timeout=120)  # only a broken watchdog waits this long
        assert to_service_error(failed.value).status_code == 503 and failed.value.retry_after
        assert host.killed and not client.alive and not client.healthy()
        with pytest.raises(EngineUnavailableError):  # admitted only to a healthy engine
            await _drain(client, "after")

    asyncio.run(run())


def test_a_lost_rank_fails_the_streams_and_the_admission():
    host = SilentHost()

    async def run() -> None:
        client = EngineClient(host)  # no step timeout: the rank check alone
        stream = asyncio.ensure_future(_drain(client, "s"))
        await asyncio.sleep(0)
        host.rank_lost = True
        with pytest.raises(EngineUnavailableError, match="rank"):
            await asyncio.wait_for(stream, timeout=120)
        assert host.killed and not client.healthy()
        with pytest.raises(EngineUnavailableError, match="rank"):
            await _drain(client, "after")

    asyncio.run(run())


def test_an_idle_engine_is_not_taken_for_a_hung_one():
    host = SilentHost()

    async def run() -> None:
        client = EngineClient(host, step_timeout_s=0.3)
        await asyncio.sleep(1.5)  # no stream waits on the engine, so no report is due
        assert client.alive and not host.killed

    asyncio.run(run())


def test_a_stream_that_outlives_the_timeout_lives_while_the_engine_reports():
    host = SilentHost()

    async def run() -> None:
        client = EngineClient(host, step_timeout_s=3.0)
        stream = client.generate([_request("long")])
        first = asyncio.ensure_future(stream.__anext__())
        for step in range(20):  # a step every 0.2 s, for longer than the timeout in all
            await asyncio.sleep(0.2)
            host.on_report(StepReport(None, [RequestOutput(ChoiceId("long", 0), [7],
                                                           FinishReason.LENGTH if step == 19 else None)]))
        batches = [await first] + [batch async for batch in stream]
        assert sum(len(batch) for batch in batches) == 20 and client.alive and not host.killed

    asyncio.run(run())
