"""Every replica group's engine gauges and every ingress replica's request metrics reach Ray's metrics, labelled
with their application and replica: what a Prometheus scraping Ray's nodes (KubeRay's PodMonitor, `ray up`
clusters) sees.

The ingress's `/metrics` has them too, from the status board; this is how a Prometheus that scrapes Ray sees
them.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import wait_until

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


def test_each_replica_group_exports_its_engine_gauges_through_ray(server):
    applications = {"tp2": server, "tp1": f"{server}/tp1", "edge": f"{server}/edge"}

    def every_group_exported() -> bool:
        # Each group the application's ingress sees on its status board (there can be two, when an earlier
        # test's load scaled the application up) is alive in Ray's metrics under the same replica label.
        for app, base in applications.items():
            groups = _ingress_gauges(base, "llama_serve_replica_group_healthy", headers=_headers(app))
            exported = _group_values("ray_llama_serve_engine_alive", app)
            if not groups or any(exported.get(replica) != 1.0 for replica in groups):
                return False
        return True

    wait_until(every_group_exported, what="every group in Ray's metrics")

    prompt = "Name three rivers that flow through Europe, and say which sea each one reaches."
    response = httpx.post(f"{server}/tp1/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2})
    assert response.status_code == 200
    # What the groups themselves report (the ingress's /metrics reads it from the status board, where each
    # group writes it about once a second), and Ray's export of each converges to the same values.
    prompt_tokens = response.json()["usage"]["prompt_tokens"]

    def exported_as_reported() -> bool:
        # Read both sides afresh each time: a group that an earlier test's load added may be scaled away
        # meanwhile, and then neither side has it any more.
        reported = _ingress_gauges(applications["tp1"], "llama_serve_prefix_cache_query_tokens")
        exported = _group_values("ray_llama_serve_prefix_cache_query_tokens", "tp1")
        return sum(reported.values()) >= prompt_tokens and all(
            exported.get(replica) == value for replica, value in reported.items())

    wait_until(exported_as_reported, what="Ray's export of the groups' values")
    assert _group_values("ray_llama_serve_kv_cache_free_blocks", "tp1")


def test_each_ingress_replica_exports_its_request_metrics_through_ray(server):
    def ingress_sample(name: str, **labels: str) -> float:
        return sum(value for found, value in _ray_samples(name) if found.get("application") == "tp1"
                   and found.get("deployment") == "Ingress" and all(found.get(k) == v for k, v in labels.items()))

    def requests_ok() -> float:
        return ingress_sample("ray_llama_serve_requests_total", route="chat", status="200")

    before = requests_ok()
    response = httpx.post(f"{server}/tp1/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})
    assert response.status_code == 200
    wait_until(lambda: requests_ok() >= before + 1, what="the request counted in Ray's metrics")
    assert ingress_sample("ray_llama_serve_generation_tokens_total") >= response.json()["usage"]["completion_tokens"]
    assert ingress_sample("ray_llama_serve_time_to_first_token_seconds_count", route="chat") >= 1


def _headers(app: str) -> dict[str, str]:
    from tests.integration.conftest import EDGE_KEY

    return {"Authorization": f"Bearer {EDGE_KEY}"} if app == "edge" else {}


def _ingress_gauges(base: str, name: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """replica -> value of `name` for each replica group, as the application's ingress has it in /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=10, headers=headers or {}).text
    return {sample.labels["replica"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}
