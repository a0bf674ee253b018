"""`cluster.yaml` is a valid Ray cluster-launcher config (Ray's own schema) sized for the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(CLUSTER, schema)


def test_head_is_cpu_only_and_workers_fit_every_configs_replica_group():
    types = CLUSTER["available_node_types"]
    head = types[CLUSTER["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu_counts = [t["resources"]["GPU"] for name, t in types.items() if name != CLUSTER["head_node_type"]]
    for path in sorted((ROOT / "configs").glob("llama2-*.yaml")):
        (application,) = yaml.safe_load(path.read_text())["applications"]
        tp = application["args"]["model"]["tensor_parallel_size"]
        assert any(count >= tp for count in gpu_counts), f"{path.name}: no node type holds tp={tp}"
    assert CLUSTER["max_workers"] >= sum(t["max_workers"] for t in types.values())
    assert all(t["min_workers"] <= t["max_workers"] for t in types.values())


def test_nodes_install_this_project_and_the_head_deploys_the_app():
    assert any("pip install" in command and "-e ." in command for command in CLUSTER["setup_commands"])
    deploy = " ".join(CLUSTER["head_start_ray_commands"])
    assert "serve deploy" in deploy and "configs/" in deploy


def test_rayservice_serves_the_7b_config_on_the_pod_network():
    manifest = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((ROOT / "configs" / "llama2-7b-chat.yaml").read_text())
    assert served["http_options"]["host"] == "0.0.0.0"
    (application,) = served["applications"]
    # Exposed on the pod network, it refuses to start without the keys of its Secret; otherwise the 7b config.
    assert application["args"]["api"].pop("require_api_keys") is True
    assert served["applications"] == shipped["applications"]
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"


def _containers(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]]
    specs += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    return [(spec, container) for spec in specs for container in spec["containers"]]


def test_rayservice_needs_rays_token_and_gives_every_pod_the_api_keys_secret():
    manifest = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    assert manifest["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    for spec, container in _containers(manifest):  # an ingress replica may land on any pod
        env = {item["name"]: item.get("value") for item in container["env"]}
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        assert env["LLAMA_SERVE_API_KEYS_FILE"].startswith(mounts["api-keys"] + "/")
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert volumes["api-keys"]["secret"]["secretName"] == "llama-serve-api-keys"


def test_the_cluster_runs_with_token_auth_and_a_private_dashboard():
    starts = [" ".join(CLUSTER["head_start_ray_commands"]), " ".join(CLUSTER["worker_start_ray_commands"])]
    for start in starts:
        assert "RAY_AUTH_MODE=token" in start and "LLAMA_SERVE_API_KEYS_FILE=" in start
    assert "--dashboard-host=127.0.0.1" in starts[0]
    assert any(target.endswith(".ray/auth_token") for target in CLUSTER["file_mounts"])
