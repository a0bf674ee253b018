"""The service's Prometheus metrics, all named `llama_serve_*`, served by the ingress at `GET /metrics`.

In: per-request observations from the ingress (`RequestMeter`: each batch of stage events, then the end of
the request) and, at scrape time, every replica group's status from the status board (`status_board.py`).
Out: Prometheus text: this ingress replica's request metrics, and each group's engine gauges labelled by
`replica`.

Why prometheus_client in the ingress rather than Ray's metrics API: Ray's metrics are exported on each
node's metrics agent port, not through the service, so `GET /metrics` could not return them. Latencies are
measured where the client sees them (the ingress), which is the honest place for time to first token.

Every replica group also exports the same engine gauges through Ray's metrics (`ReplicaReporter`), and
every ingress replica its request metrics (`RayRequestExport`), labelled with their application,
deployment and replica: a Prometheus that scrapes Ray's nodes sees the whole application, each series once,
so sums over replicas are right. The stage's router adds its routing decisions there
(`replica/router.py`). docs/api.md (Metrics) says what to scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serve_app import status_board
from serve_app.engine.engine import EngineStats
from serve_app.status_board import GroupStatus

PREFIX = "llama_serve_"
CONTENT_TYPE = CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)

# The engine's gauges: name (after PREFIX) -> (help, value from EngineStats). Shared by the ingress's
# `/metrics` and each replica group's export through Ray, so both say the same thing under the same names.
ENGINE_GAUGES: dict[str, tuple[str, Callable[[EngineStats], float]]] = {
    "num_sequences_running": ("Sequences (choices) in the engine's running batch.",
                              lambda s: s.num_sequences_running),
    "num_sequences_waiting": ("Sequences (choices) waiting to be scheduled.", lambda s: s.num_sequences_waiting),
    "kv_cache_usage_ratio": ("Share of KV-cache blocks in use (0-1).", lambda s: s.kv_cache_usage),
    "kv_cache_free_blocks": ("Free KV-cache blocks.", lambda s: s.num_free_blocks),
    "num_preemptions": ("Preemptions since the engine started.", lambda s: s.num_preemptions),
    "prefix_cache_query_tokens": ("Tokens looked up in the prefix cache since the engine started.",
                                  lambda s: s.prefix_cache_query_tokens),
    "prefix_cache_hit_tokens": (("Tokens found in the prefix cache (not computed again) since the engine "
                                 "started."), lambda s: s.prefix_cache_hit_tokens),
    "engine_generated_tokens": ("Tokens the engine sampled since it started, aborted choices' included.",
                                lambda s: s.generated_tokens),
}

# Appended to the help of the request metrics on `/metrics`, which cover one ingress replica.
ONE_INGRESS = (" This ingress replica's requests only (the one that answered this scrape); Ray's metrics carry "
               "every ingress replica's (docs/api.md, Metrics).")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServiceMetrics:
    """One registry with every metric of the service; `render()` is the `/metrics` body.

    What it covers: the request metrics of this ingress replica only (a service with several ingress
    replicas answers each scrape from one of them), and every replica group's engine gauges. `ray_export`
    also sends the per-request metrics through Ray's metrics, where every ingress replica has its series.
    """

    def __init__(self, ray_export: RayRequestExport | None = None) -> None:
        self.ray_export = ray_export
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "From request arrival to its first generated token." + ONE_INGRESS,
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            f"{PREFIX}inter_token_latency_seconds", "Time between consecutive tokens of one choice." + ONE_INGRESS,
            ["route"], buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            f"{PREFIX}e2e_request_latency_seconds", "From request arrival to its last byte." + ONE_INGRESS,
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter(f"{PREFIX}requests", "Finished requests by route and HTTP status." + ONE_INGRESS,
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of finished requests." + ONE_INGRESS,
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Generated tokens (all choices)." + ONE_INGRESS,
                                         registry=r)
        self.time_per_output_token = Histogram(
            f"{PREFIX}time_per_output_token_seconds", "Per successful request: from its first token to its end, "
            "over its tokens after the first (all choices')." + ONE_INGRESS, ["route"], buckets=_TOKEN_BUCKETS, registry=r)
        by_group = " One series per replica group (label `replica`), from the application's status board."
        self.engine_gauges = {name: Gauge(f"{PREFIX}{name}", help_text + by_group, ["replica"], registry=r)
                              for name, (help_text, _) in ENGINE_GAUGES.items()}
        self.group_healthy = Gauge(f"{PREFIX}replica_group_healthy", "1 while the group's engine runs with every "
                                   "rank." + by_group, ["replica"], registry=r)

    def meter(self, route: str) -> RequestMeter:
        return RequestMeter(self, route)

    def set_groups(self, groups: list[GroupStatus]) -> None:
        """Every group's gauges as the board has them now; groups no longer on it drop out."""
        for gauge in [*self.engine_gauges.values(), self.group_healthy]:
            gauge.clear()
        for group in groups:
            self.group_healthy.labels(group.replica).set(1.0 if group.healthy else 0.0)
            if group.stats is not None:
                for name, (_, value) in ENGINE_GAUGES.items():
                    self.engine_gauges[name].labels(group.replica).set(value(group.stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMeter:
    """Times one request from its arrival: first token, the gaps between tokens of each choice, the end."""

    def __init__(self, metrics: ServiceMetrics, route: str, now: float | None = None) -> None:
        self.metrics = metrics
        self.route = route
        self.start = time.monotonic() if now is None else now
        self._first_token_at: float | None = None
        self._output_tokens = 0
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
                self._output_tokens = usage.completion_tokens
                if self.metrics.ray_export is not None:
                    self.metrics.ray_export.tokens(usage.prompt_tokens, usage.completion_tokens)
                continue
            tokens = getattr(event, "num_tokens", 0)
            if not tokens:
                continue
            if self._first_token_at is None:
                self._first_token_at = now
                self.metrics.time_to_first_token.labels(self.route).observe(now - self.start)
                if self.metrics.ray_export is not None:
                    self.metrics.ray_export.first_token(self.route, now - self.start)
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
        per_token = None
        if status < 400:
            self.metrics.e2e_request_latency.labels(self.route).observe(now - self.start)
            if self._first_token_at is not None and self._output_tokens > 1:
                per_token = (now - self._first_token_at) / (self._output_tokens - 1)
                self.metrics.time_per_output_token.labels(self.route).observe(per_token)
        if self.metrics.ray_export is not None:
            self.metrics.ray_export.finished(self.route, status, now - self.start if status < 400 else None,
                                             per_token)


class RayRequestExport:
    """An ingress replica's request metrics through Ray's metrics, under the same names as its `/metrics`.

    A few calls per request, never per token: the inter-token latency histogram stays on `/metrics`; Ray gets
    each request's time per output token instead. Ray adds the application, deployment and replica labels.
    """

    def __init__(self) -> None:
        from ray.serve.metrics import Counter as RayCounter
        from ray.serve.metrics import Histogram as RayHistogram

        self._requests = RayCounter(f"{PREFIX}requests", description="Finished requests by route and HTTP status.",
                                    tag_keys=("route", "status"))
        self._prompt_tokens = RayCounter(f"{PREFIX}prompt_tokens", description="Prompt tokens of finished requests.")
        self._generation_tokens = RayCounter(f"{PREFIX}generation_tokens",
                                             description="Generated tokens (all choices).")
        self._ttft = RayHistogram(f"{PREFIX}time_to_first_token_seconds", boundaries=list(_LATENCY_BUCKETS),
                                  description="From request arrival to its first generated token.",
                                  tag_keys=("route",))
        self._e2e = RayHistogram(f"{PREFIX}e2e_request_latency_seconds", boundaries=list(_LATENCY_BUCKETS),
                                 description="From request arrival to its last byte.", tag_keys=("route",))
        self._tpot = RayHistogram(f"{PREFIX}time_per_output_token_seconds", boundaries=list(_TOKEN_BUCKETS),
                                  description="Per successful request: from its first token to its end, over "
                                  "its tokens after the first (all choices').", tag_keys=("route",))

    def first_token(self, route: str, seconds: float) -> None:
        self._ttft.observe(seconds, tags={"route": route})

    def tokens(self, prompt: int, generated: int) -> None:
        self._prompt_tokens.inc(prompt)
        if generated:
            self._generation_tokens.inc(generated)

    def finished(self, route: str, status: int, e2e_s: float | None, per_token_s: float | None) -> None:
        self._requests.inc(tags={"route": route, "status": str(status)})
        if e2e_s is not None:
            self._e2e.observe(e2e_s, tags={"route": route})
        if per_token_s is not None:
            self._tpot.observe(per_token_s, tags={"route": route})


class ReplicaReporter:
    """Inside a replica group's Serve replica: once a second, the group's status onto the application's
    status board (for the ingress's `/health` and `/metrics`) and its engine gauges through Ray's metrics.

    `ray.serve.metrics` labels the gauges with the application, deployment and replica, and Ray's metrics
    agent on each node serves them (`ray_llama_serve_*`) to whatever scrapes Ray. From a timer thread rather
    than per engine step: a step's report would cost the replica's event loop a Python call per gauge,
    hundreds of times a second, for values a scraper reads every few seconds.
    """

    def __init__(self, app: str, replica: str, read: Callable[[], tuple[EngineStats | None, bool]],
                 interval_s: float = status_board.PUBLISH_INTERVAL_S) -> None:
        """`read()` gives the engine's latest stats and whether the group is healthy."""
        from ray.serve.metrics import Gauge as RayGauge

        self._app, self._replica = app, replica
        self._read = read
        self._interval_s = interval_s
        self._gauges = {name: RayGauge(f"{PREFIX}{name}", description=help_text)
                        for name, (help_text, _) in ENGINE_GAUGES.items()}
        self._alive = RayGauge(f"{PREFIX}engine_alive",
                               description="1 while the replica group's engine runs with every rank.")
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # a report in flight finishes before `stop` withdraws the group
        threading.Thread(target=self._run, name="replica-reporter", daemon=True).start()

    def report(self) -> None:
        stats, healthy = self._read()
        with self._lock:
            if self._stopped.is_set():
                return
            status_board.publish(self._app, GroupStatus(self._replica, healthy, stats, time.time()))
        self._alive.set(1.0 if healthy else 0.0)
        if stats is not None:
            for name, (_, value) in ENGINE_GAUGES.items():
                self._gauges[name].set(value(stats))

    def stop(self) -> None:
        """Stop reporting and take the group off the board."""
        with self._lock:
            self._stopped.set()
        try:
            status_board.withdraw(self._app, self._replica)
        except Exception:
            logger.warning("could not withdraw the replica group from the status board", exc_info=True)

    def _run(self) -> None:
        while True:
            try:
                self.report()
            except Exception:  # a hiccup must not end the reports for the replica's lifetime
                logger.exception("reporting the replica group's status failed")
            if self._stopped.wait(self._interval_s):
                return
