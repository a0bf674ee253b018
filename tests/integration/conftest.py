"""One real app for all integration tests: started once per session on a local Ray cluster.

Three applications run side by side: the CPU default (`configs/tiny.yaml`, tp=2) at `/`, the same model at
tp=1 under `/tp1` with its engine on a thread of the replica (as `configs/tiny-tp1.yaml`; the others run it
in its own process), so greedy outputs of both hosts can be checked against `transformers`' `generate`, and
under `/edge` a tp=1 copy with an API key and small limits (context, body, messages, engine batch and waiting
queue) for the tests of the API's edges.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
# A fixed port would let a second test run on the same machine answer this run's requests.
PORT = free_port()
BASE = f"http://127.0.0.1:{PORT}"
EDGE_PREFIX = "/edge"
EDGE_KEY = "sk-edge-test-0123456789abcdef"
EDGE_API = {
    "api_keys": [EDGE_KEY],
    "max_body_bytes": 16384,
    "max_messages": 8,
    "max_prompts": 4,
    "max_waiting_requests": 2,
    "max_waiting_tokens": 4096,
    "retry_after_s": 2,
}


def edge_args(args: dict) -> dict:
    """The `/edge` application: tp=1, a 256-token context, 2 running sequences, 2 waiting, an API key."""
    edge = copy.deepcopy(args)
    edge["model"].update(tensor_parallel_size=1, max_model_len=256)
    edge["engine"]["max_num_seqs"] = 2
    edge["api"] = EDGE_API
    return edge


@pytest.fixture(scope="session")
def server():
    ray = pytest.importorskip("ray")
    from ray import serve

    from serve_app.app import build_app

    app_config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["applications"][0]
    args = app_config["args"]
    tp1_args = copy.deepcopy(args)
    tp1_args["model"]["tensor_parallel_size"] = 1
    tp1_args["engine"]["separate_process"] = False  # as configs/tiny-tp1.yaml: the engine on a thread, served
    # Logical CPUs, for Ray's accounting: the five applications (with test_engine_recovery.py's and
    # test_routing.py's) reserve about 6.25.
    ray.init(num_cpus=7, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(args), name="tp2", route_prefix="/", blocking=False)
    serve.run(build_app(tp1_args), name="tp1", route_prefix="/tp1", blocking=False)
    serve.run(build_app(edge_args(args)), name="edge", route_prefix=EDGE_PREFIX, blocking=False)
    _wait_until_healthy(f"{BASE}/health")
    _wait_until_healthy(f"{BASE}/tp1/health")
    _wait_until_healthy(f"{BASE}{EDGE_PREFIX}/health")
    yield BASE
    serve.shutdown()
    ray.shutdown()


def wait_until(condition, timeout_s: float = 300.0, what: str = "the condition"):
    """Poll `condition` until it returns something true, and return that; fail after `timeout_s`, a bound
    generous enough for a loaded 2-core machine (never a speed assertion: those live in benchmarks)."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what} was not reached in {timeout_s:g} s"
        time.sleep(0.5)
    return result


def _answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_until_healthy(url: str) -> None:
    wait_until(lambda: _answers_200(url), what=f"{url} answering 200")




def pytest_collection_modifyitems(config, items):
    """`test_graceful_stop.py` runs first, before the shared app's Ray cluster exists. With that cluster up
    beside its own (three more applications on this 2-core machine), its ingress saw the drain notice 16 s
    late or not at all in three full runs of session 15, while it passed alone and under two CPU hogs: an
    open bug (docs/deploy.md, "Stopping"), which this ordering keeps from making the suite flaky."""
    items.sort(key=lambda item: 0 if item.path.name == "test_graceful_stop.py" else 1)
