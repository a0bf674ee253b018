"""Shared fixtures: the tiny Llama checkpoint every engine and integration test loads."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

# Tests never reach a model hub; fail fast instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The integration tests' Ray cluster runs as the README starts the service: Ray Serve's high-throughput mode,
# HAProxy in front of the ingress. Set either to 0 to test through Ray's Python proxy instead. Set here,
# before Ray is imported, because Serve reads them at import.
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")  # as the README starts it (docs/deploy.md)
# Without a GPU, Triton kernels (the CUDA decode attention) run in Triton's interpreter, on the CPU. Triton
# reads this when it is first imported, so it is set before anything can import it.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def free_port() -> int:
    """A port nothing on this machine listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# HAProxy also listens on fixed stats and metrics ports (8404, 9101): with the service from the README's first
# command still running on this machine, the tests' HAProxy could not bind them and every integration test
# failed. Ports of their own let the tests run beside it.
os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))
os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    from serve_app.tiny_llama import ensure_tiny_llama

    return ensure_tiny_llama()


@pytest.fixture(scope="session")
def greedy_reference(tiny_checkpoint):
    """`greedy(prompt, max_new)`: `transformers` `generate`'s greedy continuation on the tiny checkpoint, the
    reference every engine path is checked against (memoized)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    cache: dict[tuple[int, ...], list[int]] = {}

    def greedy(prompt: list[int], max_new: int) -> list[int]:
        key = (*prompt, -max_new)
        if key not in cache:
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                                     attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
            cache[key] = out[0, len(prompt):].tolist()
        return cache[key]

    return greedy
