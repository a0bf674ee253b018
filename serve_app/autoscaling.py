"""Autoscaling of the replica group on the engine's own load, as a Ray Serve custom autoscaling policy.

In: Serve's `AutoscalingContext` once per control-loop tick, carrying each running replica's custom metrics
(`engine_load_metrics`, sent by `LlamaReplica.record_autoscaling_stats`) averaged over `look_back_period_s`.
Out: the number of replica groups wanted; Serve then applies the config's delays, scaling factors and
min/max bounds on top (it wraps every custom policy that way).

Why not Serve's default (ongoing requests per replica): a replica group's capacity is not a fixed number of
requests. With long prompts or long completions the KV cache fills before `max_num_seqs` sequences run,
requests wait inside the engine, and the ongoing-request count still looks "under target". The engine knows:
its running batch, its waiting queue and its KV-cache usage. One replica group's load is

    max(running + waiting over max_num_seqs,  KV usage over kv_cache_target,  1 + waiting over max_num_seqs
        when anything waits at all)

and the policy asks for `ceil(total load / target_utilization)` groups. Until the replicas report engine
metrics (an older replica, or the first tick after a start) it falls back to ongoing requests over
`max_num_seqs`, which is the default policy with a target derived from the engine's capacity.

Serve pickles this module by value into its controller, so it imports nothing from the rest of the project.
"""

from __future__ import annotations

import math
from typing import Any

ENGINE_RUNNING = "engine_running"
ENGINE_WAITING = "engine_waiting"
KV_CACHE_USAGE = "kv_cache_usage"


def engine_load_metrics(stats: Any) -> dict[str, float]:
    """What a replica reports to this policy: its `EngineStats` as Serve custom metrics (plain floats)."""
    return {ENGINE_RUNNING: float(stats.num_sequences_running),
            ENGINE_WAITING: float(stats.num_sequences_waiting),
            KV_CACHE_USAGE: float(stats.kv_cache_usage)}


def replica_load(running: float, waiting: float, kv_usage: float, max_num_seqs: int,
                 kv_cache_target: float) -> float:
    """One replica group's load, in replica groups: 1.0 is a full batch (or KV cache at its target)."""
    load = max((running + waiting) / max_num_seqs, kv_usage / kv_cache_target)
    if waiting > 0:  # anything queued inside the engine means this group is saturated, whatever the cause
        load = max(load, 1.0 + waiting / max_num_seqs)
    return load


class EngineLoadPolicy:
    """Serve custom autoscaling policy (class form: Serve builds it once with `policy_kwargs`)."""

    def __init__(self, max_num_seqs: int, target_utilization: float = 0.75, kv_cache_target: float = 0.85):
        if max_num_seqs < 1 or not 0 < target_utilization <= 1 or not 0 < kv_cache_target <= 1:
            raise ValueError("need max_num_seqs >= 1 and target_utilization, kv_cache_target in (0, 1]")
        self.max_num_seqs = max_num_seqs
        self.target_utilization = target_utilization
        self.kv_cache_target = kv_cache_target

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        load, source = self.total_load(ctx)
        desired = math.ceil(load / self.target_utilization - 1e-9)
        desired = min(max(desired, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
        state = dict(ctx.policy_state)
        state["engine_load"] = round(load, 3)
        state["load_source"] = source
        return desired, state

    def total_load(self, ctx: Any) -> tuple[float, str]:
        """Summed load of the running replica groups, and where it came from ("engine" or "requests")."""
        metrics = ctx.aggregated_metrics or {}
        running = metrics.get(ENGINE_RUNNING) or {}
        waiting = metrics.get(ENGINE_WAITING) or {}
        kv_usage = metrics.get(KV_CACHE_USAGE) or {}
        reporting = [replica for replica in ctx.running_replicas if replica in running]
        if not reporting:
            return ctx.total_num_requests / self.max_num_seqs, "requests"
        total = sum(replica_load(running[replica], waiting.get(replica, 0.0), kv_usage.get(replica, 0.0),
                                 self.max_num_seqs, self.kv_cache_target)
                    for replica in reporting)
        # Requests queued at the handles have not reached any engine yet: count them too.
        queued = ctx.total_queued_requests or 0.0
        return total + queued / self.max_num_seqs, "engine"


POLICY_IMPORT_PATH = "serve_app.autoscaling:EngineLoadPolicy"


def with_engine_capacity(options: dict[str, Any], max_num_seqs: int) -> dict[str, Any]:
    """The replica's Serve options with `EngineLoadPolicy` told the engine's `max_num_seqs`.

    The YAML names the policy; the capacity it scales against comes from `engine.max_num_seqs`, so the two
    cannot drift apart. Options that use another policy (or none) are returned unchanged.
    """
    autoscaling = options.get("autoscaling_config")
    if not isinstance(autoscaling, dict):
        return options
    policy = autoscaling.get("policy") or {}
    if policy.get("policy_function") != POLICY_IMPORT_PATH:
        return options
    kwargs = dict(policy.get("policy_kwargs") or {}) | {"max_num_seqs": max_num_seqs}
    return options | {"autoscaling_config": autoscaling | {"policy": policy | {"policy_kwargs": kwargs}}}
