"""A replica group whose engine process dies: clients get a 503 they can retry on, never a hang or a 500, and
Serve replaces the group so that the service answers again, with no process left behind.

Runs its own application (`/crash`, tp=1), so that killing its engine disturbs no other test.
"""

from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.integration.conftest import ROOT, _wait_until_healthy

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
    """The engine processes of the `/crash` application's replica groups: children of its replicas, named
    `llama_serve::engine crash#<replica>` (as `ps` shows them)."""
    processes = _processes()
    replicas = {pid for pid, (_, cmdline) in processes.items() if "ServeReplica:crash:LlamaReplica" in cmdline}
    return [pid for pid, (parent, cmdline) in processes.items()
            if parent in replicas and cmdline.startswith("llama_serve::engine crash#")]


@pytest.fixture(scope="module")
def crash_app(server):
    from ray import serve

    from serve_app.app import build_app

    args = copy.deepcopy(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["applications"][0]["args"])
    args["model"]["tensor_parallel_size"] = 1
    serve.run(build_app(args), name="crash", route_prefix=CRASH_PREFIX, blocking=False)
    _wait_until_healthy(f"{server}{CRASH_PREFIX}/health")
    yield f"{server}{CRASH_PREFIX}"
    serve.delete("crash")


def _chat(base: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": HELLO, "max_tokens": 4})


def _eventually(condition, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition was not reached"
        time.sleep(0.5)


def test_a_dead_engine_is_a_503_until_serve_replaces_its_replica_group(crash_app):
    assert _chat(crash_app).status_code == 200
    (engine,) = _engine_processes()
    os.kill(engine, signal.SIGKILL)

    # The replica reads the end of its pipe; from then on its requests are refused with a retryable 503.
    answers: list[httpx.Response] = []
    _eventually(lambda: answers.append(_chat(crash_app)) or answers[-1].status_code != 200)
    refused = answers[-1]
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "service_unavailable"
    with pytest.raises(openai.InternalServerError):  # what the official client raises for it
        openai.OpenAI(base_url=f"{crash_app}/v1", api_key="none", max_retries=0).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=4)
    # The group says so on the status board: with no other group, the application is not ready.
    _eventually(lambda: httpx.get(f"{crash_app}/health", timeout=10).status_code == 503)

    # Serve's health check (every 2 s, three failures in a row) marks the group unhealthy and starts a new one
    # (how long that takes is measured in docs/benchmarks.md, not asserted here).
    _eventually(lambda: _chat(crash_app).status_code == 200)
    _eventually(lambda: httpx.get(f"{crash_app}/health", timeout=10).status_code == 200)
    assert len(_engine_processes()) == 1  # the new group's engine; the dead one's replica is gone
