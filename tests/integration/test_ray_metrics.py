"""Every replica group's engine gauges reach Ray's metrics, one series per group, labelled with its application
and replica: what a Prometheus scraping Ray's nodes (KubeRay's PodMonitor, `ray up` clusters) sees.

The ingress's `/metrics` answers for one group per scrape; this is how an operator sees all of them.
"""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

MODEL = "tiny-llama-2-chat"


def _ray_samples(name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every series of `name` that the metrics agents of the cluster's nodes serve now."""
    import ray

    found = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            found += [(sample.labels, sample.value) for sample in family.samples if sample.name == name]
    return found


def _group_values(name: str, application: str) -> dict[str, float]:
    """replica -> value of `name` for the LlamaReplica groups of `application`."""
    return {labels["replica"]: value for labels, value in _ray_samples(name)
            if labels.get("application") == application and labels.get("deployment") == "LlamaReplica"}


def _wait_for(predicate, timeout: float = 60.0):
    # Ray's metrics agents export on their own period (seconds), so a value shows up some time after it is set.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(1)
    raise AssertionError("the metric did not reach Ray's metrics in time")


def test_each_replica_group_exports_its_engine_gauges_through_ray(server):
    def every_application_exported() -> dict[str, dict[str, float]] | None:
        found = {app: _group_values("ray_llama_serve_engine_alive", app) for app in ("tp2", "tp1", "edge")}
        return found if all(found.values()) else None

    alive = _wait_for(every_application_exported)
    for app, groups in alive.items():
        assert len(groups) == 1 and list(groups.values()) == [1.0], (app, groups)

    prompt = "Name three rivers that flow through Europe, and say which sea each one reaches."
    response = httpx.post(f"{server}/tp1/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2})
    assert response.status_code == 200
    # What the group itself reports now (the ingress's /metrics pulls it from the replica at scrape time).
    looked_up = _ingress_gauge(f"{server}/tp1", "llama_serve_prefix_cache_query_tokens")
    assert looked_up >= response.json()["usage"]["prompt_tokens"]

    # Ray's export of that group converges to the same value.
    _wait_for(lambda: _group_values("ray_llama_serve_prefix_cache_query_tokens", "tp1") == {
        next(iter(alive["tp1"])): looked_up})
    assert _group_values("ray_llama_serve_kv_cache_free_blocks", "tp1")


def _ingress_gauge(base: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in {base}/metrics")
