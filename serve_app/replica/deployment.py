"""The Llama 2 replica group's Serve deployment: one replica per tensor-parallel group.

A thin wrapper. The replica owns ranks 1..N-1 (actors in its placement-group bundles) and, by default,
runs rank 0's engine in a child process (`process_host.EngineProcess`), or on a thread of its own
(`thread_host.EngineThread`); `EngineClient` turns the engine's reports into one stream per `generate`
call, which reaches its caller through the replica's channel hub (`serve_app.channel`). Serve's health check and the engine-load autoscaling policy read the engine's state from here; the
group publishes its status on the application's status board (what the ingress's `/health` and `/metrics`
read) and exports its engine gauges through Ray's metrics (`metrics.ReplicaReporter`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray import serve
from transformers import PreTrainedTokenizerFast

from serve_app.affinity import AffinityKey
from serve_app.autoscaling import engine_load_metrics
from serve_app.channel import ChannelHub, ChannelTicket
from serve_app.config import AppConfig
from serve_app.engine.sequence import EngineRequest, RequestOutput
from serve_app.errors import EngineUnavailableError
from serve_app.metrics import ReplicaReporter
from serve_app.models.checkpoint import resolve_checkpoint
from serve_app.replica.engine_client import AdmissionLimits, EngineClient, StreamPacing
from serve_app.replica.process_host import ENGINE_TITLE, EngineProcess
from serve_app.replica.thread_host import EngineThread

REPLICA_MAX_QUEUED_REQUESTS = 64
# Serve replaces a replica after three failed health checks in a row; `check_health` only reads local state,
# so checking often costs nothing and takes a dead group out of the router's choices sooner.
REPLICA_HEALTH_CHECK_PERIOD_S = 2.0


@serve.deployment(name="LlamaReplica", max_queued_requests=REPLICA_MAX_QUEUED_REQUESTS,
                  health_check_period_s=REPLICA_HEALTH_CHECK_PERIOD_S)
class LlamaReplica:
    """Serve wrapper: one tensor-parallel engine per replica."""

    def __init__(self, config: AppConfig):
        logging.basicConfig(level=logging.INFO)
        model, engine, api = config.model, config.engine, config.api
        replica = serve.get_replica_context()
        if engine.separate_process:
            host = EngineProcess(model, engine, use_ray=True,
                                 title=f"{ENGINE_TITLE} {replica.app_name}#{replica.replica_tag}")
        else:
            host = EngineThread(model, engine, use_ray=True)
        # The stage's tokenizer, so that a stop string ends its choice in the engine where the stage cuts it.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(resolve_checkpoint(model.source))
        limits = AdmissionLimits(api.max_waiting_requests, api.max_waiting_tokens, api.retry_after_s)
        self.client = EngineClient(host, limits, StreamPacing.from_config(engine), tokenizer, engine.step_timeout_s)
        self.hub = ChannelHub(replica.replica_id.unique_id, self.client.pacing.interval)
        self.reporter = ReplicaReporter(replica.app_name, replica.replica_tag,
                                        lambda: (self.client.stats, self.client.healthy()))

    async def generate(self, requests: list[EngineRequest], affinity: AffinityKey | None = None,
                       channel: ChannelTicket | None = None) -> AsyncIterator[list[RequestOutput]]:
        """`affinity` chose this group (`router.CacheAffinityRouter`, in the caller); the engine needs no key.
        With a `channel` ticket, the stream after its first batch goes through the caller's subscription,
        paced there for all of the caller's streams together (`serve_app.channel`)."""
        async for batch in self.hub.serve(channel, self.client.generate(requests, paced=channel is None)):
            yield batch

    async def subscribe(self, subscriber: str, channel_target: str) -> AsyncIterator[list]:
        """The caller's channel: what its streams here produced, all together (`channel_target` is this
        replica, for the router)."""
        async for batch in self.hub.subscribe(subscriber, channel_target):
            yield batch

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine's own load, for `serve_app.autoscaling.EngineLoadPolicy`."""
        return engine_load_metrics(self.client.stats)

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        if not self.client.alive:
            raise EngineUnavailableError("the engine has stopped")
        if not self.client.healthy():
            raise EngineUnavailableError("a tensor-parallel rank has died")

    def __del__(self) -> None:
        if hasattr(self, "reporter"):
            self.reporter.stop()
        client = getattr(self, "client", None)
        if client is not None and client.alive:
            client.stop()
