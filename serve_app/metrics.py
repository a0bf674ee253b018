"""The service's Prometheus metrics, all named `llama_serve_*`, served by the ingress at `GET /metrics`.

In: per-request observations from the ingress (`RequestMeter`: each batch of stage events, then the end of
the request) and, at scrape time, the engine's `EngineStats` fetched from the replica. Out: Prometheus text.

Why prometheus_client in the ingress rather than Ray's metrics API: Ray's metrics are exported on each
node's metrics agent port, not through the service, so `GET /metrics` could not return them. Latencies are
measured where the client sees them (the ingress), which is the honest place for time to first token; the
engine's gauges are pulled from the replica when scraped. One registry per ingress replica: with several
ingress replicas or replica groups, each scrape answers for the ingress replica and the replica group that
served it (see docs/api.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serve_app.engine.engine import EngineStats

PREFIX = "llama_serve_"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServiceMetrics:
    """One registry with every metric of the service; `render()` is the `/metrics` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "From request arrival to its first generated token.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            f"{PREFIX}inter_token_latency_seconds", "Time between consecutive tokens of one choice.",
            ["route"], buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            f"{PREFIX}e2e_request_latency_seconds", "From request arrival to its last byte.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter(f"{PREFIX}requests", "Finished requests by route and HTTP status.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Generated tokens (all choices).",
                                         registry=r)
        self.num_requests_running = Gauge(f"{PREFIX}num_requests_running",
                                          "Engine sequences in the running batch.", registry=r)
        self.num_requests_waiting = Gauge(f"{PREFIX}num_requests_waiting",
                                          "Engine sequences waiting to be scheduled.", registry=r)
        self.kv_cache_usage = Gauge(f"{PREFIX}kv_cache_usage_ratio", "Share of KV-cache blocks in use (0-1).",
                                    registry=r)
        self.kv_cache_free_blocks = Gauge(f"{PREFIX}kv_cache_free_blocks", "Free KV-cache blocks.", registry=r)
        self.num_preemptions = Gauge(f"{PREFIX}num_preemptions", "Preemptions since the engine started.",
                                     registry=r)
        self.prefix_cache_query_tokens = Gauge(
            f"{PREFIX}prefix_cache_query_tokens", "Tokens looked up in the prefix cache since the engine started.",
            registry=r)
        self.prefix_cache_hit_tokens = Gauge(
            f"{PREFIX}prefix_cache_hit_tokens", "Tokens found in the prefix cache (not computed again) since the "
            "engine started.", registry=r)

    def meter(self, route: str) -> RequestMeter:
        return RequestMeter(self, route)

    def set_engine_stats(self, stats: EngineStats) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.kv_cache_free_blocks.set(stats.num_free_blocks)
        self.num_preemptions.set(stats.num_preemptions)
        self.prefix_cache_query_tokens.set(stats.prefix_cache_query_tokens)
        self.prefix_cache_hit_tokens.set(stats.prefix_cache_hit_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMeter:
    """Times one request from its arrival: first token, the gaps between tokens of each choice, the end."""

    def __init__(self, metrics: ServiceMetrics, route: str, now: float | None = None) -> None:
        self.metrics = metrics
        self.route = route
        self.start = time.monotonic() if now is None else now
        self._first_seen = False
        self._last_token_at: dict[int, float] = {}
        self._done = False

    def observe(self, events: Iterable, now: float | None = None) -> None:
        """One batch of stage events (`ChoiceDelta` with `num_tokens`, `UsageReport` with `usage`)."""
        now = time.monotonic() if now is None else now
        for event in events:
            usage = getattr(event, "usage", None)
            if usage is not None:
                self.metrics.prompt_tokens.inc(usage.prompt_tokens)
                self.metrics.generation_tokens.inc(usage.completion_tokens)
                continue
            tokens = getattr(event, "num_tokens", 0)
            if not tokens:
                continue
            if not self._first_seen:
                self._first_seen = True
                self.metrics.time_to_first_token.labels(self.route).observe(now - self.start)
            previous = self._last_token_at.get(event.index)
            if previous is not None:
                # Tokens that arrive together (coalesced) share the gap since the choice's previous ones.
                gap = (now - previous) / tokens
                for _ in range(tokens):
                    self.metrics.inter_token_latency.labels(self.route).observe(gap)
            self._last_token_at[event.index] = now

    def finish(self, status: int, now: float | None = None) -> None:
        """Count the request once, with its final status (an SSE error event counts as its error status)."""
        if self._done:
            return
        self._done = True
        now = time.monotonic() if now is None else now
        self.metrics.requests.labels(self.route, str(status)).inc()
        if status < 400:
            self.metrics.e2e_request_latency.labels(self.route).observe(now - self.start)
