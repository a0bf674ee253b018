"""`llama-serve run` stopped with SIGTERM (what docker, Kubernetes and systemd send) while a stream is in
flight: the stream runs to its last token, new requests get an OpenAI-shaped 503, `/health` fails so a
load balancer moves away, and then the service exits 0 and frees its port.

Its own service, started as a user starts it (the CPU tp=1 config, on free ports, in a Ray cluster of its
own: `--address local`, so that it never joins the other integration tests' cluster).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import yaml

from tests.conftest import free_port
from tests.integration.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama-2-chat"
# Most of the context: at this model's speed here the stream runs for seconds, long past the moment the
# drain begins (under a second after the signal).
STREAM_TOKENS = 900


def _config(tmp_path: Path, port: int) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "tiny-tp1.yaml").read_text())
    config["http_options"]["port"] = port
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # HAProxy's fixed ports and the ingress replicas' direct ports: not the other integration tests' ones.
    env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    env.update(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT="32000", RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT="32500",
               RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT="42000", RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT="42500")
    env.pop("RAY_ADDRESS", None)
    return env


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


class _Stream:
    """One streamed chat completion read on a thread: its SSE data lines as they arrive."""

    def __init__(self, base: str) -> None:
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(base,), daemon=True)
        self._thread.start()

    def _read(self, base: str) -> None:
        body = {"model": MODEL, "stream": True, "max_tokens": STREAM_TOKENS, "temperature": 0,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        try:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.lines.append(line.removeprefix("data: "))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)


def test_sigterm_finishes_the_stream_in_flight_refuses_new_work_then_exits(tmp_path):
    # The README's install puts the console script on PATH; the test runs it as a user would.
    assert shutil.which("llama-serve"), "llama-serve is not installed: pip install -e ."
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    service = subprocess.Popen(["llama-serve", "run", str(_config(tmp_path, port)), "--address", "local"],
                               cwd=ROOT, env=_environment(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_until(lambda: _status(f"{base}/health") == 200 or service.poll() is not None, timeout_s=600,
                   what="the service answering /health")
        assert service.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]

        stream = _Stream(base)
        wait_until(lambda: stream.lines or not stream.running, what="the stream's first chunk")
        service.send_signal(signal.SIGTERM)
        wait_until(lambda: _status(f"{base}/health") == 503 or service.poll() is not None,
                   what="/health failing while draining")
        assert service.poll() is None, "the service exited at the signal instead of draining"
        refused = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                             json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        # The drain began while the stream was still going: otherwise this test would show nothing.
        assert stream.running, "the stream ended before the drain began; make STREAM_TOKENS larger"

        stream.join(timeout_s=300)
        assert not stream.running and stream.error is None, stream.error
        assert stream.lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in stream.lines[:-1]]
        assert all("error" not in chunk for chunk in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # every token it asked for

        assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "service_unavailable"

        assert service.wait(timeout=120) == 0
        assert _status(f"{base}/health") is None  # nothing listens on the port any more
    finally:
        if service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()
        log.close()
