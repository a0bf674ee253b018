"""The replica deployment's request router: each request to the group that most likely holds its KV cache.

Ray Serve builds one `CacheAffinityRouter` in every process that holds a handle to `LlamaReplica`, that is
in every stage replica (`app.py` sets it in the deployment's `request_router_config`). The stage passes each
request's `AffinityKey` as the `affinity` argument of `generate`; the policy is `affinity.choose_group`:
rendezvous order of the groups for the key, with the load guard. Each group is its own rank, so when the
preferred group is full (`max_ongoing_requests`) Serve tries the next in the key's order rather than any
group: a conversation that overflows keeps landing on the same second group too.

The load it reads is Serve's own count of the calls this router has in flight on each group (updated on
every send and completion, corrected by the group on every accept); a count Serve has let go stale (no
traffic from this router to that group for a while) reads as idle. The router itself sends no probe and
shares no state: choosing costs a few hashes in the stage's process (Serve then probes a group whose count
it lacks before sending there, as for any router).

Every routed request is counted in Ray's metrics as `llama_serve_routing_decisions` by `reason`
(`affinity`: the key's first group; `full`: that group had as many requests as its engine runs and lets
wait, so the key's next open group took it; `load_guard`: moved to the least loaded group; `overflow`: Serve
found the first choice full (`max_ongoing_requests`) and took a later one; `no_key`: a call without a key —
none from this application's stage — which goes to the least loaded group) and by the key's `source`.
Counts are per call (one client request, all its choices), not per sequence. A stage's channel
subscription (`serve_app.channel`) names its group and goes there, uncounted.
"""

from __future__ import annotations

from collections import OrderedDict

from ray.serve.metrics import Counter
from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from serve_app.affinity import AffinityKey, choose_group
from serve_app.channel import is_subscription, targeted_replica

# Decisions waiting for their request to be accepted; bounded because a request cancelled while it is being
# routed never reaches `on_request_routed`.
_MAX_PENDING_DECISIONS = 4096


class CacheAffinityRouter(RequestRouter):
    def initialize_state(self, max_imbalance: int = 32, capacity: int | None = None) -> None:
        self._max_imbalance, self._capacity = max_imbalance, capacity
        self._decisions: OrderedDict[str, tuple[ReplicaID | None, str, str]] = OrderedDict()
        self._counter = Counter("llama_serve_routing_decisions",
                                description="Requests routed to a replica group, by why that group.",
                                tag_keys=("reason", "source"))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Without this Serve retries a full set of groups in a busy loop instead of backing off.
            pending_request.routing_context.should_backoff = True
        target = targeted_replica(candidate_replicas, pending_request)
        if target is not None:  # a stage's channel subscription (serve_app/channel.py), not a request
            return [[target]]
        key = _affinity(pending_request)
        if key is None or len(candidate_replicas) < 2:
            self._remember(pending_request, None, "no_key" if key is None else "affinity", key)
            return [candidate_replicas]
        cache = self.replica_queue_len_cache
        choice = choose_group(key, candidate_replicas, lambda r: r.replica_id.unique_id,
                              lambda r: cache.get(r.replica_id) or 0, self._max_imbalance, self._capacity)
        self._remember(pending_request, choice.order[0].replica_id, choice.reason, key)
        return [[replica] for replica in choice.order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        if is_subscription(pending_request):
            return
        preferred, reason, source = self._decisions.pop(pending_request.metadata.internal_request_id,
                                                        (None, "no_key", "none"))
        if preferred is not None and replica_id != preferred:
            reason = "overflow"
        self._counter.inc(tags={"reason": reason, "source": source})

    def _remember(self, pending_request: PendingRequest | None, preferred: ReplicaID | None, reason: str,
                  key: AffinityKey | None) -> None:
        if pending_request is None:
            return
        self._decisions[pending_request.metadata.internal_request_id] = (
            preferred, reason, key.source if key is not None else "none")
        while len(self._decisions) > _MAX_PENDING_DECISIONS:
            self._decisions.popitem(last=False)


def _affinity(pending_request: PendingRequest | None) -> AffinityKey | None:
    if pending_request is None:
        return None
    key = pending_request.kwargs.get("affinity")
    return key if isinstance(key, AffinityKey) else None
