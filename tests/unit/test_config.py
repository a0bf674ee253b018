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
