"""One real app for all integration tests: started once per session on a local Ray cluster.

Two applications run side by side: the CPU default (`configs/tiny.yaml`, tp=2) at `/`, and the same model at
tp=1 under `/tp1`, so greedy outputs of both can be checked against `transformers`' `generate`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PORT = 8123
BASE = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="session")
def server():
    ray = pytest.importorskip("ray")
    from ray import serve

    from serve_app.app import build_app

    app_config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["applications"][0]
    args = app_config["args"]
    tp1_args = copy.deepcopy(args)
    tp1_args["model"]["tensor_parallel_size"] = 1
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(args), name="tp2", route_prefix="/", blocking=False)
    serve.run(build_app(tp1_args), name="tp1", route_prefix="/tp1", blocking=False)
    _wait_until_healthy(f"{BASE}/health")
    _wait_until_healthy(f"{BASE}/tp1/health")
    yield BASE
    serve.shutdown()
    ray.shutdown()


def _wait_until_healthy(url: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not become healthy")


