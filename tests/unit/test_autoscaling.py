"""The replica group's engine-load autoscaling policy, and every config's autoscaling settings (no Ray cluster)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serve_app.autoscaling import (
    ENGINE_RUNNING,
    ENGINE_WAITING,
    KV_CACHE_USAGE,
    POLICY_IMPORT_PATH,
    EngineLoadPolicy,
    engine_load_metrics,
    with_engine_capacity,
)
from serve_app.config import AppConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def context(replicas: dict[str, tuple[float, float, float]] | None = None, ongoing: float = 0.0,
            queued: float = 0.0, lo: int = 1, hi: int = 4) -> SimpleNamespace:
    """A stand-in for Serve's AutoscalingContext: per replica (running, waiting, kv usage)."""
    replicas = replicas or {}
    metrics = {ENGINE_RUNNING: {r: v[0] for r, v in replicas.items()},
               ENGINE_WAITING: {r: v[1] for r, v in replicas.items()},
               KV_CACHE_USAGE: {r: v[2] for r, v in replicas.items()}} if replicas else {}
    return SimpleNamespace(aggregated_metrics=metrics, running_replicas=list(replicas), total_num_requests=ongoing,
                           total_queued_requests=queued, capacity_adjusted_min_replicas=lo,
                           capacity_adjusted_max_replicas=hi, policy_state={})


policy = EngineLoadPolicy(max_num_seqs=32, target_utilization=0.75, kv_cache_target=0.85)


@pytest.mark.parametrize("replicas, wanted", [
    ({"a": (0, 0, 0.0)}, 1),                     # idle: the minimum
    ({"a": (24, 0, 0.3)}, 1),                    # at the utilization target: stay
    ({"a": (32, 0, 0.5)}, 2),                    # full batch: one more group
    ({"a": (32, 32, 0.6)}, 3),                   # full batch and a batch waiting
    ({"a": (10, 5, 0.95)}, 2),                   # KV-bound: few sequences, but requests wait
    ({"a": (32, 20, 0.9), "b": (32, 20, 0.9)}, 4),  # capped at max_replicas
    ({"a": (4, 0, 0.1), "b": (2, 0, 0.05)}, 1),  # two nearly idle groups: back to one
])
def test_engine_load_decides_whole_replica_groups(replicas, wanted):
    desired, state = policy(context(replicas))
    assert desired == wanted
    assert state["load_source"] == "engine"


def test_without_engine_metrics_it_falls_back_to_ongoing_requests_over_capacity():
    assert policy(context(ongoing=20))[0] == 1
    desired, state = policy(context(ongoing=40))
    assert desired == math.ceil(40 / 32 / 0.75) == 2
    assert state["load_source"] == "requests"


def test_requests_queued_at_handles_count_as_load():
    assert policy(context({"a": (20, 0, 0.2)}))[0] == 1
    assert policy(context({"a": (20, 0, 0.2)}, queued=16))[0] == 2


def test_replica_metrics_are_plain_floats():
    stats = SimpleNamespace(num_sequences_running=3, num_sequences_waiting=1, kv_cache_usage=0.25)
    assert engine_load_metrics(stats) == {ENGINE_RUNNING: 3.0, ENGINE_WAITING: 1.0, KV_CACHE_USAGE: 0.25}


def test_policy_runs_inside_serves_own_wrapper():
    """Serve wraps custom policies with its delays and bounds; the wrapped policy still scales 1 -> 2 -> 1."""
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    config = AutoscalingConfig(min_replicas=1, max_replicas=2, upscale_delay_s=0, downscale_delay_s=0,
                               policy={"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": {"max_num_seqs": 32}})
    wrapped = _apply_autoscaling_config(EngineLoadPolicy(max_num_seqs=32))

    def decide(current: int, running: float) -> int:
        replicas = [f"r{i}" for i in range(current)]
        ctx = AutoscalingContext(
            deployment_id=None, deployment_name="LlamaReplica", app_name="llama", current_num_replicas=current,
            target_num_replicas=current, running_replicas=replicas, total_num_requests=running * current,
            total_queued_requests=0.0,
            aggregated_metrics={ENGINE_RUNNING: {r: running for r in replicas},
                                ENGINE_WAITING: {r: 0.0 for r in replicas},
                                KV_CACHE_USAGE: {r: 0.1 for r in replicas}},
            raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=2, policy_state={},
            last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=config)
        return wrapped(ctx)[0]

    assert decide(1, 32) == 2
    assert decide(2, 30) == 2
    assert decide(2, 1) == 1


def _args(path: Path) -> dict:
    (application,) = yaml.safe_load(path.read_text())["applications"]
    return application["args"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_deployment_autoscales_with_targets_from_engine_capacity(path):
    config = AppConfig.model_validate(_args(path))
    seqs = config.engine.max_num_seqs
    deployments = config.deployments
    for options in (deployments.ingress, deployments.stage, deployments.replica):
        autoscaling = AutoscalingConfig(**options["autoscaling_config"])
        assert "num_replicas" not in options
        assert autoscaling.min_replicas >= 1
        assert autoscaling.max_replicas >= 2, "a deployment that can never scale up"
        assert autoscaling.look_back_period_s > autoscaling.metrics_interval_s
        # A scaled-down replica drains its streams: the longest is max_model_len tokens at the slowest step
        # we plan for (0.25 s on the CPU default, 0.2 s on GPUs).
        slowest_step_s = 0.25 if config.engine.device == "cpu" else 0.2
        assert options["graceful_shutdown_timeout_s"] >= config.model.max_model_len * slowest_step_s
    assert deployments.ingress["autoscaling_config"]["target_ongoing_requests"] == 4 * seqs
    assert deployments.stage["autoscaling_config"]["target_ongoing_requests"] == 2 * seqs
    replica = deployments.replica
    assert replica["autoscaling_config"]["target_ongoing_requests"] <= seqs < replica["max_ongoing_requests"]
    assert replica["autoscaling_config"]["policy"]["policy_function"] == POLICY_IMPORT_PATH
    wired = with_engine_capacity(replica, seqs)["autoscaling_config"]
    assert wired["policy"]["policy_kwargs"]["max_num_seqs"] == seqs
    EngineLoadPolicy(**wired["policy"]["policy_kwargs"])  # the kwargs construct the policy
    assert replica == config.deployments.replica  # the config itself is left as written


def test_options_without_our_policy_pass_through_unchanged():
    options = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}
    assert with_engine_capacity(options, 64) is options
    assert with_engine_capacity({"num_replicas": 2}, 64) == {"num_replicas": 2}
