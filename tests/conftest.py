"""Shared fixtures: the tiny Llama checkpoint every engine and integration test loads."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    from serve_app.tiny_llama import ensure_tiny_llama

    return ensure_tiny_llama()
