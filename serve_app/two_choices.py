"""Serve's power-of-two-choices routing, plus channel subscriptions to the replica they name.

The stage deployment's request router (Ray Serve builds one in every ingress replica), and the replica
deployment's under `routing.policy: power_of_two`. A request goes to the less loaded of two replicas
picked at random (Serve compares their queue lengths within a rank), as with Serve's default router; a
channel subscription (`serve_app.channel`) goes to the replica whose streams it reads, which Serve's default
router cannot do. A router set in a config's `deployments` must do the same (`channel.targeted_replica`).
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from serve_app.channel import targeted_replica


class TwoChoicesRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:  # without it Serve retries full replicas in a busy loop
            pending_request.routing_context.should_backoff = True
        target = targeted_replica(candidate_replicas, pending_request)
        if target is not None:
            return [[target]]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
