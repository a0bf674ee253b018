"""The Llama 2 replica group's Serve deployment: one replica per tensor-parallel group.

A thin wrapper. The replica keeps ranks 1..N-1 (actors in its placement-group bundles) and, by default,
runs rank 0's engine in a child process (`engine_host.EngineProcess`); `EngineLoop` turns the engine's
reports into one stream per `generate` call. Serve's health check and the engine-load autoscaling policy
read the engine's state from here, and the group exports its engine gauges through Ray's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray import serve

from serve_app.autoscaling import engine_load_metrics
from serve_app.config import AppConfig
from serve_app.engine.engine import EngineStats, build_engine
from serve_app.engine.sequence import EngineRequest, RequestOutput
from serve_app.metrics import ReplicaGaugeExport
from serve_app.replica.engine_host import ENGINE_TITLE, EngineProcess, EngineThread
from serve_app.replica.engine_loop import AdmissionLimits, EngineFailed, EngineLoop, StreamPacing

REPLICA_MAX_QUEUED_REQUESTS = 128
# Serve replaces a replica after three failed health checks in a row. At its default period (10 s) a group
# whose engine had died answered 503 for ~30 s, and with several groups the router kept sending it a share
# of the traffic all that time. `check_health` only reads local state, so checking every 2 s costs nothing.
REPLICA_HEALTH_CHECK_PERIOD_S = 2.0


@serve.deployment(name="LlamaReplica", max_queued_requests=REPLICA_MAX_QUEUED_REQUESTS,
                  health_check_period_s=REPLICA_HEALTH_CHECK_PERIOD_S)
class LlamaReplica:
    """Serve wrapper: one tensor-parallel engine per replica."""

    def __init__(self, config: AppConfig):
        logging.basicConfig(level=logging.INFO)
        model, engine, api = config.model, config.engine, config.api
        if engine.separate_process:
            replica = serve.get_replica_context()
            host = EngineProcess(model, engine, use_ray=True,
                                 title=f"{ENGINE_TITLE} {replica.app_name}#{replica.replica_tag}")
        else:
            host = EngineThread(lambda: build_engine(model, engine, use_ray=True), engine.heartbeat_interval_s)
        limits = AdmissionLimits(api.max_waiting_requests, api.max_waiting_tokens, api.retry_after_s)
        self.loop = EngineLoop(host, limits, StreamPacing.from_config(engine))
        self.gauges = ReplicaGaugeExport(lambda: (self.loop.stats, self.loop.alive))

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[list[RequestOutput]]:
        async for batch in self.loop.generate(requests):
            yield batch

    def stats(self) -> EngineStats:
        return self.loop.stats

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine's own load, for `serve_app.autoscaling.EngineLoadPolicy`."""
        return engine_load_metrics(self.loop.stats)

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        if not self.loop.alive:
            raise EngineFailed("the engine has stopped")
        if not self.loop.healthy():
            raise EngineFailed("a tensor-parallel rank has died")

    def __del__(self) -> None:
        if hasattr(self, "gauges"):
            self.gauges.stop()
        loop = getattr(self, "loop", None)
        if loop is not None and loop.alive:
            loop.stop()
