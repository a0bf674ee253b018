"""A replica group whose engine process dies: clients get a 503 they can retry on, never a hang or a 500, and
Serve replaces the group so that the service answers again, with no process left behind.

Runs its own application (`/crash`, tp=1), so that killing its engine disturbs no other test.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.integration.conftest import ROOT, _wait_until_healthy, wait_until

pytestmark = pytest.mark.integration

CRASH_PREFIX = "/crash"
MODEL = "tiny-llama-2-chat"
HELLO = [{"role": "user", "content": "Hello!"}]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def _engine_processes() -> list[int]:
    """The engine processes of the `/crash` application's replica groups, named `llama_serve::engine
    crash#<replica>` (as `ps` shows them), wherever they are parented: one a dead replica left behind counts."""
    return [pid for pid, (_, cmdline) in _processes().items() if cmdline.startswith("llama_serve::engine crash#")]


def _the_engine() -> int:
    """The one engine process of the `/crash` application; if there is not exactly one, fail saying what runs
    under its replica groups instead (a recovery test that finds none has nothing to kill)."""
    engines = _engine_processes()
    if len(engines) != 1:
        processes = _processes()
        replicas = {pid for pid, (_, cmdline) in processes.items() if "crash:LlamaReplica" in cmdline}
        children = {pid: cmdline[:120] for pid, (parent, cmdline) in processes.items() if parent in replicas}
        pytest.fail(f"expected one engine process titled 'llama_serve::engine crash#...', found {engines}; "
                    f"the crash replica groups' processes {sorted(replicas)} have the children {children}")
    return engines[0]


def _crash_args(tensor_parallel_size: int) -> dict:
    """configs/tiny.yaml's application at this tp, with one replica group, always: these tests kill its
    processes one by one, and the loads they apply would otherwise have the autoscaler add a second beside it."""
    args = copy.deepcopy(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["applications"][0]["args"])
    args["model"]["tensor_parallel_size"] = tensor_parallel_size
    replica = {key: value for key, value in args["deployments"]["replica"].items() if key != "autoscaling_config"}
    args["deployments"]["replica"] = {**replica, "num_replicas": 1}
    return args


@pytest.fixture(scope="module")
def crash_app(server):
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(_crash_args(tensor_parallel_size=1)), name="crash", route_prefix=CRASH_PREFIX,
              blocking=False)
    _wait_until_healthy(f"{server}{CRASH_PREFIX}/health")
    yield f"{server}{CRASH_PREFIX}"
    serve.delete("crash")


def _chat(base: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": HELLO, "max_tokens": 4})


def test_a_dead_engine_is_a_503_until_serve_replaces_its_replica_group(crash_app):
    assert _chat(crash_app).status_code == 200
    engine = _the_engine()
    os.kill(engine, signal.SIGKILL)

    # The replica reads the end of its pipe; from then on its requests are refused with a retryable 503.
    answers: list[httpx.Response] = []
    wait_until(lambda: answers.append(_chat(crash_app)) or answers[-1].status_code != 200)
    refused = answers[-1]
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "service_unavailable"
    with pytest.raises(openai.InternalServerError):  # what the official client raises for it
        openai.OpenAI(base_url=f"{crash_app}/v1", api_key="none", max_retries=0).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=4)
    # The group says so on the status board: with no other group, the application is not ready.
    wait_until(lambda: httpx.get(f"{crash_app}/health", timeout=10).status_code == 503)

    # Serve's health check (every 2 s, three failures in a row) marks the group unhealthy and starts a new one
    # (how long that takes is measured in docs/benchmarks.md, not asserted here).
    wait_until(lambda: _chat(crash_app).status_code == 200)
    wait_until(lambda: httpx.get(f"{crash_app}/health", timeout=10).status_code == 200)
    assert len(_engine_processes()) == 1  # the new group's engine; the dead one's replica is gone


def _gauge(base: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    # Right after hundreds of abandoned requests, on a loaded 2-core machine, one scrape took over 10 s (the
    # ingress still cleaning up): a bound for a hung server, not for a slow one.
    text = httpx.get(f"{base}/metrics", timeout=60).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name)


def test_health_and_liveness_answer_while_the_group_is_saturated(crash_app):
    """Readiness and liveness read the status board and the ingress itself, never a replica group: with every
    sequence slot taken and the waiting queue full, they still answer (a probe that queued behind the streams
    would wait for minutes of generation)."""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 400, "stream": True, "min_p": 0,
            "logit_bias": {"2": -100}}

    async def saturate_and_probe() -> list[int]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=100)) as client:
            async def hold() -> None:
                async with client.stream("POST", f"{crash_app}/v1/chat/completions", json=body) as response:
                    async for _ in response.aiter_lines():
                        pass

            holders = [asyncio.create_task(hold()) for _ in range(70)]  # > 32 running + 32 waiting
            try:
                await asyncio.to_thread(wait_until, lambda: _gauge(crash_app, "llama_serve_num_sequences_running")
                                        == 32 and _gauge(crash_app, "llama_serve_num_sequences_waiting") > 0)
                async with httpx.AsyncClient(timeout=10) as probe:
                    statuses = [(await probe.get(f"{crash_app}{path}")).status_code
                                for path in ("/health", "/health/live") * 5]
                assert _gauge(crash_app, "llama_serve_num_sequences_running") == 32  # still saturated
                return statuses
            finally:
                for holder in holders:
                    holder.cancel()
                await asyncio.gather(*holders, return_exceptions=True)

    assert asyncio.run(saturate_and_probe()) == [200] * 10
    wait_until(lambda: _gauge(crash_app, "llama_serve_num_sequences_running") == 0)


def test_two_hundred_abandoned_streams_leave_no_sequence_behind(crash_app):
    """Clients that open streams and leave at once (a retry storm, a closed browser tab): whatever was
    admitted is aborted, refused ones got their 429, and the next client is served by an empty engine."""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 500, "stream": True, "min_p": 0,
            "logit_bias": {"2": -100}}  # never EOS: only an abort ends them early

    async def abandon() -> list[int]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            async def one() -> int:
                async with client.stream("POST", f"{crash_app}/v1/chat/completions", json=body) as response:
                    if response.status_code == 200:
                        async for _ in response.aiter_lines():  # its first chunk: it is running
                            break
                    return response.status_code

            return await asyncio.gather(*(one() for _ in range(200)))

    generated_before = _gauge(crash_app, "llama_serve_engine_generated_tokens")
    statuses = asyncio.run(abandon())
    assert set(statuses) <= {200, 429, 503} and 200 in statuses, statuses
    wait_until(lambda: _gauge(crash_app, "llama_serve_num_sequences_running") == 0
                and _gauge(crash_app, "llama_serve_num_sequences_waiting") == 0)
    assert _gauge(crash_app, "llama_serve_kv_cache_usage_ratio") == 0
    # Aborted, not run out: had the admitted streams run to max_tokens, they would have made this many tokens.
    generated = _gauge(crash_app, "llama_serve_engine_generated_tokens") - generated_before
    assert generated < statuses.count(200) * body["max_tokens"] / 2
    # Requests whose clients left while Serve still queued them reach the replica (and are aborted) for a
    # little longer, so the next client may meet a full queue at first: it is served once they are through.
    wait_until(lambda: _chat(crash_app).status_code == 200)


def test_two_hundred_non_streamed_requests_abandoned_after_half_a_second_are_aborted(crash_app):
    """As an `openai` client with `timeout=0.5` leaves them. Behind HAProxy only a write shows that a client has
    gone: the keep-alive spaces of `api.non_stream_keepalive_s` are that write."""
    generated_before = _gauge(crash_app, "llama_serve_engine_generated_tokens")
    impatient = openai.AsyncOpenAI(base_url=f"{crash_app}/v1", api_key="none", timeout=0.5, max_retries=0)

    async def abandon() -> list[str]:
        async def one() -> str:
            try:
                await impatient.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=500,
                                                        extra_body={"min_p": 0, "logit_bias": {"2": -100}})
            except openai.APIError as exc:
                return type(exc).__name__
            return "answered"

        return await asyncio.gather(*(one() for _ in range(200)))

    outcomes = asyncio.run(abandon())
    assert "APITimeoutError" in outcomes, outcomes
    wait_until(lambda: _gauge(crash_app, "llama_serve_num_sequences_running") == 0
                and _gauge(crash_app, "llama_serve_num_sequences_waiting") == 0)
    assert _gauge(crash_app, "llama_serve_kv_cache_usage_ratio") == 0
    generated = _gauge(crash_app, "llama_serve_engine_generated_tokens") - generated_before
    # Admitted ones (at most max_num_seqs + max_waiting_requests = 64) would have made 500 tokens each.
    assert generated < 64 * 500 / 2
    wait_until(lambda: _chat(crash_app).status_code == 200)


def test_an_engine_killed_mid_stream_ends_the_stream_with_one_error_event(crash_app):
    wait_until(lambda: _chat(crash_app).status_code == 200)
    client = openai.OpenAI(base_url=f"{crash_app}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1000, stream=True,
                                            extra_body={"min_p": 0, "logit_bias": {"2": -100}})
    chunks = iter(stream)
    next(chunks)  # the stream is open and generating
    engine = _the_engine()
    os.kill(engine, signal.SIGKILL)
    with pytest.raises(openai.APIError) as raised:  # the SSE error event, as the official client reports it
        for _ in chunks:
            pass
    assert "engine" in str(raised.value).lower()

    # A new group serves again once Serve has replaced the dead one (until then requests get 503).
    wait_until(lambda: _chat(crash_app).status_code == 200)


def _stream_then(base: str, act) -> None:
    """Open a long stream, let it produce a chunk, run `act`, and expect the official client to raise the
    stream's error event."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1000, stream=True,
                                            extra_body={"min_p": 0, "logit_bias": {"2": -100}})
    chunks = iter(stream)
    next(chunks)
    act()
    with pytest.raises(openai.APIError):
        for _ in chunks:
            pass


def _pids(marker: str) -> set[int]:
    return {pid for pid, (_, cmdline) in _processes().items() if cmdline.startswith(marker)}


def test_a_replica_actor_killed_mid_stream_is_an_error_and_serve_replaces_it(crash_app):
    wait_until(lambda: _chat(crash_app).status_code == 200)
    # The serving group's replica is its engine's parent (a replaced one may still be shutting down beside it).
    engine = _the_engine()
    replica = _processes()[engine][0]
    _stream_then(crash_app, lambda: os.kill(replica, signal.SIGKILL))
    wait_until(lambda: _chat(crash_app).status_code == 200)
    wait_until(lambda: httpx.get(f"{crash_app}/health", timeout=10).status_code == 200)
    wait_until(lambda: len(_engine_processes()) == 1)  # the dead replica's engine went with it


def test_a_redeploy_with_a_stream_in_flight_then_a_follower_rank_killed_mid_stream(crash_app):
    """Redeploy the application at tp=2 while a stream runs on the old group: the stream ends (finished by the
    draining replica, or with an error event), and the new group serves. Then kill its follower rank under a
    stream: the client gets the error, and Serve replaces the group."""
    from ray import serve

    from serve_app.app import build_app

    wait_until(lambda: _chat(crash_app).status_code == 200)
    ranks_before = _pids("ray::RankActor")
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{crash_app}/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        serve.run(build_app(_crash_args(tensor_parallel_size=2)), name="crash", route_prefix=CRASH_PREFIX,
                  blocking=False)
        tail = [line for line in lines if line]
    assert tail[-1] == "data: [DONE]" or any('"error"' in line for line in tail), tail[-3:]
    wait_until(lambda: len(_pids("ray::RankActor") - ranks_before) == 1)
    wait_until(lambda: _chat(crash_app).status_code == 200)

    (follower,) = _pids("ray::RankActor") - ranks_before
    _stream_then(crash_app, lambda: os.kill(follower, signal.SIGKILL))
    wait_until(lambda: _chat(crash_app).status_code == 200)
    wait_until(lambda: httpx.get(f"{crash_app}/health", timeout=10).status_code == 200)


def test_deleting_the_application_with_streams_in_flight_leaves_no_process_behind(crash_app):
    from ray import serve

    wait_until(lambda: _chat(crash_app).status_code == 200)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1000, "stream": True, "min_p": 0,
            "logit_bias": {"2": -100}}
    with httpx.stream("POST", f"{crash_app}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert _engine_processes()
        serve.delete("crash", _blocking=False)
        try:  # the stream ends (its replica drains or stops); it does not hang
            for _ in lines:
                pass
        except httpx.HTTPError:
            pass
    wait_until(lambda: not _engine_processes() and not any(
        "ServeReplica:crash:" in cmdline for _, cmdline in _processes().values()))
