"""The application builder that `serve run configs/<name>.yaml` imports.

Ingress → ChatStage → LlamaReplica, each a Serve deployment with its own scaling; the stage reaches the
replica groups through `CacheAffinityRouter` (`replica/router.py`) unless the config asks for Serve's default.
Each hop streams through channels (`channel.py`): one message per interval for all of a caller's streams. The replica reserves one
placement-group bundle per tensor-parallel rank, so a whole group is scheduled (and scaled) as a unit.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.autoscaling import with_engine_capacity
from serve_app.config import AppConfig
from serve_app.ingress.deployment import Ingress
from serve_app.replica.deployment import LlamaReplica
from serve_app.replica.router import CacheAffinityRouter
from serve_app.stage.deployment import ChatStage
from serve_app.two_choices import TwoChoicesRouter


def replica_placement(config: AppConfig) -> dict[str, Any]:
    """Bundles for one tensor-parallel group: rank 0 shares bundle 0 with the replica itself."""
    tp = config.model.tensor_parallel_size
    if config.engine.device == "cuda":
        bundles = [{"CPU": 1, "GPU": 1}] + [{"GPU": 1}] * (tp - 1)
        actor = {"num_cpus": 1, "num_gpus": 1}
    else:
        cpus = config.engine.cpus_per_rank
        bundles = [{"CPU": cpus}] * tp
        actor = {"num_cpus": cpus}
    return {"placement_group_bundles": bundles, "placement_group_strategy": "STRICT_PACK",
            "ray_actor_options": actor}


def replica_routing(config: AppConfig) -> dict[str, Any]:
    """The replica deployment's request router: by cache affinity, or Serve's two choices (with channels)."""
    if config.routing.policy != "cache_affinity":
        return {"request_router_config": {"request_router_class": TwoChoicesRouter}}
    return {"request_router_config": {"request_router_class": CacheAffinityRouter,
                                      "request_router_kwargs": {"max_imbalance": config.max_imbalance,
                                                                "capacity": config.group_capacity}}}


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.model_validate(args)
    # A `request_router_config` under `deployments.replica` wins over the policy's.
    replica_options = with_engine_capacity(
        replica_routing(config) | replica_placement(config) | config.deployments.replica,
        config.engine.max_num_seqs)
    replica = LlamaReplica.options(**replica_options).bind(config)
    # The stage's router sends each ingress's channel subscription to its stage replica (serve_app/channel.py).
    stage_options = {"request_router_config": {"request_router_class": TwoChoicesRouter}} | config.deployments.stage
    stage = ChatStage.options(**stage_options).bind(config, replica)
    return Ingress.options(**config.deployments.ingress).bind(config, stage)
