"""Every shipped config validates; typos and impossible settings fail at start, not at the first request."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.app import replica_placement
from serve_app.config import AppConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def _args(path: Path) -> dict:
    (application,) = yaml.safe_load(path.read_text())["applications"]
    assert application["import_path"] == "serve_app.app:build_app"
    return application["args"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate_and_bind_localhost(path):
    config = AppConfig.model_validate(_args(path))
    assert yaml.safe_load(path.read_text())["http_options"]["host"] == "127.0.0.1"
    assert config.model.max_model_len <= 4096


def test_gpu_configs_have_the_documented_tensor_parallelism():
    sizes = {p.stem: AppConfig.model_validate(_args(p)).model.tensor_parallel_size for p in CONFIGS}
    assert sizes == {"llama2-7b-chat": 2, "llama2-13b-chat": 2, "llama2-70b-chat": 8, "tiny": 2, "tiny-tp1": 1}


def test_unknown_keys_are_rejected():
    args = _args(next(p for p in CONFIGS if p.stem == "tiny"))
    args["engine"]["max_num_seq"] = 8  # typo of max_num_seqs
    with pytest.raises(ValidationError, match="max_num_seq"):
        AppConfig.model_validate(args)


def test_cpu_engine_needs_a_kv_budget():
    with pytest.raises(ValidationError, match="kv_cache_bytes"):
        AppConfig.model_validate({"model": {"source": "x", "served_model_id": "x"}, "engine": {"device": "cpu"}})


def test_replica_reserves_one_bundle_per_rank():
    gpu = AppConfig.model_validate(_args(next(p for p in CONFIGS if p.stem == "llama2-70b-chat")))
    placement = replica_placement(gpu)
    assert placement["placement_group_bundles"] == [{"CPU": 1, "GPU": 1}] + [{"GPU": 1}] * 7
    assert placement["placement_group_strategy"] == "STRICT_PACK"
    cpu = AppConfig.model_validate(_args(next(p for p in CONFIGS if p.stem == "tiny")))
    assert replica_placement(cpu)["placement_group_bundles"] == [{"CPU": 0.5}, {"CPU": 0.5}]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_bounds_refuse_overload_at_the_engine_and_keep_health_out_of_the_queue(path):
    """The documented overload behaviour is the real one: a replica group's engine refuses (429) before
    Serve would queue a call in front of it; the stage admits every stream its share of groups can hold; the
    ingress holds more connections than the stage admits, so /health and /metrics never wait behind streams;
    a request waiting for its first token is bounded in time."""
    config = AppConfig.model_validate(_args(path))
    deployments = config.deployments
    replica_calls = deployments.replica["max_ongoing_requests"]
    assert replica_calls > config.engine.max_num_seqs + config.api.max_waiting_requests
    groups_per_stage = -(-deployments.replica["autoscaling_config"]["max_replicas"]
                         // deployments.stage["autoscaling_config"]["max_replicas"])
    stage_calls = deployments.stage["max_ongoing_requests"]
    assert stage_calls >= groups_per_stage * (config.engine.max_num_seqs + config.api.max_waiting_requests)
    assert deployments.ingress["max_ongoing_requests"] > stage_calls * deployments.stage["autoscaling_config"][
        "max_replicas"] // deployments.ingress["autoscaling_config"]["max_replicas"]
    assert config.api.first_token_timeout_s is not None
