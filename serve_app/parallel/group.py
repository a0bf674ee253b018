"""A tensor-parallel group: its processes and its torch.distributed process group.

Rank 0 lives in the process that owns the engine (the Serve replica, or a test/benchmark); ranks 1..N-1 are
started here, either as Ray actors in the replica's placement-group bundles or, without Ray, as local
processes. Every rank then joins one process group (`gloo` on CPU, `nccl` on GPU), loads its shard and —
for ranks > 0 — follows rank 0's steps until told to stop. The only module that creates the placement-group
actors and the process group.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from serve_app.config import EngineConfig, ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupAddress:
    master_addr: str
    master_port: int
    world_size: int


def free_address(world_size: int) -> GroupAddress:
    host = "127.0.0.1" if world_size == 1 else _node_ip()
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    return GroupAddress(host, port, world_size)


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def join_group(address: GroupAddress, rank: int, engine: EngineConfig) -> None:
    """Join the process group as `rank`; blocks until every rank has joined."""
    if engine.device == "cuda":
        torch.cuda.set_device(0)  # Ray (or the user) sets CUDA_VISIBLE_DEVICES to this rank's GPU
    elif engine.cpu_threads_per_rank is not None:
        # Ranks on one machine share its cores: unbounded torch threads would oversubscribe them.
        torch.set_num_threads(engine.cpu_threads_per_rank)
    # DeepSpeed reads these to find the group it should wrap.
    os.environ.update(MASTER_ADDR=address.master_addr, MASTER_PORT=str(address.master_port), RANK=str(rank),
                      WORLD_SIZE=str(address.world_size), LOCAL_RANK="0")
    if address.world_size == 1:
        return
    dist.init_process_group(
        backend="gloo" if engine.device == "cpu" else "nccl",
        init_method=f"tcp://{address.master_addr}:{address.master_port}",
        rank=rank, world_size=address.world_size,
        timeout=datetime.timedelta(seconds=engine.collective_timeout_s))


def leave_group() -> None:
    from serve_app.parallel.worker import detach_deepspeed

    if dist.is_initialized():
        detach_deepspeed()
        dist.destroy_process_group()


def run_follower(address: GroupAddress, rank: int, model: ModelConfig, engine: EngineConfig) -> None:
    """The whole life of a rank > 0: join, load its shard, follow rank 0's steps until shutdown."""
    # Imported here so that spawning a process does not pay for the engine's imports twice.
    from serve_app.engine.model_runner import ModelRunner
    from serve_app.parallel.worker import load_model

    join_group(address, rank, engine)
    runner = ModelRunner(load_model(model, engine, address.world_size), model, engine, rank,
                         address.world_size)
    runner.follow()
    leave_group()


def start_followers(model: ModelConfig, engine: EngineConfig, *, use_ray: bool
                    ) -> tuple[GroupAddress, LocalFollowers | RayFollowers | None]:
    """Start ranks 1..N-1 (Ray actors in the caller's placement group, or local processes) waiting for rank 0
    at the returned address; at tp=1 there are none."""
    address = free_address(model.tensor_parallel_size)
    if address.world_size == 1:
        return address, None
    return address, (RayFollowers if use_ray else LocalFollowers)(address, model, engine)


class LocalFollowers:
    """Ranks 1..N-1 as local processes: tensor parallelism without Ray (tests, benchmarks)."""

    def __init__(self, address: GroupAddress, model: ModelConfig, engine: EngineConfig):
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(target=run_follower, args=(address, rank, model, engine), daemon=True)
            for rank in range(1, address.world_size)
        ]
        for process in self.processes:
            process.start()

    def healthy(self) -> bool:
        return self.failure() is None

    def failure(self) -> str | None:
        """Which rank has ended, and how; None while all run (they only end on shutdown or failure)."""
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                return f"rank {rank} exited with code {process.exitcode}"
        return None

    def join(self, timeout: float = 30.0) -> None:
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(5)


class RayFollowers:
    """Ranks 1..N-1 as Ray actors, one per bundle 1..N-1 of the calling replica's placement group."""

    def __init__(self, address: GroupAddress, model: ModelConfig, engine: EngineConfig):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        placement_group = ray.util.get_current_placement_group()
        resources = ({"num_gpus": 1, "num_cpus": 0} if engine.device == "cuda"
                     else {"num_cpus": engine.cpus_per_rank})
        rank_actor = ray.remote(RankActor)
        self.actors = []
        self.runs = []
        for rank in range(1, address.world_size):
            strategy = (PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=rank)
                        if placement_group is not None else None)
            actor = rank_actor.options(scheduling_strategy=strategy, name=None, **resources).remote()
            self.actors.append(actor)
            self.runs.append(actor.run.remote(address, rank, model, engine))

    def healthy(self) -> bool:
        return self.failure() is None

    def failure(self) -> str | None:
        """Which rank has ended, and the last line of its error; None while all run (a follower's run() only
        returns on shutdown or failure)."""
        import ray

        finished, _ = ray.wait(self.runs, num_returns=1, timeout=0)
        if not finished:
            return None
        rank = self.runs.index(finished[0]) + 1
        try:
            ray.get(finished[0])
        except Exception as exc:  # noqa: BLE001 - described, not handled: the caller fails the group
            lines = [line for line in str(exc).splitlines() if line.strip()]
            return f"rank {rank} failed: {lines[-1].strip() if lines else type(exc).__name__}"
        return f"rank {rank} stopped"

    def join(self, timeout: float = 30.0) -> None:
        import ray

        ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout)
        for actor in self.actors:
            ray.kill(actor)


class RankActor:
    """A Ray actor that hosts one follower rank."""

    def run(self, address: GroupAddress, rank: int, model: ModelConfig, engine: EngineConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        run_follower(address, rank, model, engine)
