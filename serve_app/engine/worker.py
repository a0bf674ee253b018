"""A rank's model, and the life of a follower rank (ranks 1..N-1) of a tensor-parallel group.

`load_rank_model` is what every rank runs once its process group exists: the checkpoint, this rank's shard
of it at tp > 1, on this rank's device. `run_worker` is a follower's whole life, the function its process
(a Ray actor or a local process, `parallel/group.py`) runs: join the group, load its shard, then follow rank
0's steps (`ModelRunner.follow`) until rank 0 broadcasts a shutdown.
"""

from __future__ import annotations

import torch

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.model_runner import ModelRunner
from serve_app.models.checkpoint import TORCH_DTYPES, load_checkpoint
from serve_app.parallel.group import GroupAddress, join_process_group, leave_process_group
from serve_app.parallel.sharding import shard_model


def rank_device(engine: EngineConfig) -> torch.device:
    """The device this process's rank runs on (the current CUDA device, set when it joined its group)."""
    return torch.device("cuda", torch.cuda.current_device()) if engine.device == "cuda" else torch.device("cpu")


def load_rank_model(model: ModelConfig, engine: EngineConfig, world_size: int) -> torch.nn.Module:
    """This rank's model on its device: the whole checkpoint at tp=1, its DeepSpeed AutoTP shard above."""
    module = load_checkpoint(model, world_size)
    if world_size > 1:
        module = shard_model(module, world_size, TORCH_DTYPES[model.dtype], engine.device)
    return module.to(rank_device(engine))


def run_worker(address: GroupAddress, rank: int, device_index: int, model: ModelConfig,
               engine: EngineConfig) -> None:
    """The whole life of a follower rank: join, load its shard, follow rank 0's steps until shutdown."""
    join_process_group(address, rank, engine, device_index=device_index)
    runner = ModelRunner(load_rank_model(model, engine, address.world_size), model, engine, rank,
                         address.world_size)
    runner.follow()
    leave_process_group()
