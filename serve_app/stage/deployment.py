"""The sampling/postprocessing stage's Serve deployment: CPU-only, scaled apart from the GPU replicas.

A thin wrapper over `processor.ChatProcessor`, which reaches the replica groups through a channel client
(`serve_app.channel`), and whose streams reach the ingress through this replica's channel hub. `max_queued_requests` is bounded by default (a config's `deployments.stage` may override it), so a
flood of requests is refused by Serve at once (`BackPressureError`, mapped to 503 + Retry-After by the
ingress) instead of queueing without end.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import PreTrainedTokenizerFast

from serve_app.affinity import AffinityKey
from serve_app.channel import ChannelClient, ChannelHub, ChannelTicket
from serve_app.config import AppConfig
from serve_app.engine.sequence import EngineRequest
from serve_app.models.checkpoint import resolve_checkpoint
from serve_app.protocol import ChatCompletionRequest, CompletionRequest
from serve_app.stage.processor import ChatProcessor, StageEvent

STAGE_MAX_QUEUED_REQUESTS = 64


@serve.deployment(name="ChatStage", max_queued_requests=STAGE_MAX_QUEUED_REQUESTS)
class ChatStage:
    def __init__(self, config: AppConfig, replica: DeploymentHandle):
        logging.basicConfig(level=logging.INFO)
        # Not AutoTokenizer: transformers 5 maps Llama checkpoints to a tokenizer class that replaces the
        # tokenizer.json normalizer with its own and mis-encodes leading spaces (31/46 reference vectors).
        tokenizer = PreTrainedTokenizerFast.from_pretrained(resolve_checkpoint(config.model.source))
        self.replica = ChannelClient(replica)
        # Nothing to pace here: the replica groups' channels already coalesce steps into messages.
        self.hub = ChannelHub(serve.get_replica_context().replica_id.unique_id)
        self.processor = ChatProcessor(tokenizer, config.model, config.pricing, self._generate, config.api)

    def _generate(self, requests: list[EngineRequest], affinity: AffinityKey):
        # `affinity` is for the replica deployment's router (replica/router.py), which reads it in this process.
        return self.replica.stream("generate", requests, affinity=affinity)

    async def chat(self, request: ChatCompletionRequest, channel: ChannelTicket | None = None,
                   ) -> AsyncIterator[list[StageEvent]]:
        async for events in self.hub.serve(channel, self.processor.chat(request)):
            yield events

    async def complete(self, request: CompletionRequest, channel: ChannelTicket | None = None,
                       ) -> AsyncIterator[list[StageEvent]]:
        async for events in self.hub.serve(channel, self.processor.complete(request)):
            yield events

    async def subscribe(self, subscriber: str, channel_target: str) -> AsyncIterator[list]:
        """The caller's channel (`serve_app.channel`); `channel_target` is this replica, for the router."""
        async for batch in self.hub.subscribe(subscriber, channel_target):
            yield batch
