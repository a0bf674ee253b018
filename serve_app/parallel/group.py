"""A tensor-parallel group: its follower ranks' processes and its torch.distributed process group.

`TensorParallelGroup.launch` starts ranks 1..N-1 — Ray actors in the calling replica's placement-group
bundles, or, without Ray, local processes — each running a given worker function (the engine's
`engine/worker.py`), and says where rank 0 must join them (`address`). The object is the group's owner: it
tells whether every follower still runs (`failure`), and stops them (`stop`). Rank 0 itself joins with
`join_process_group` wherever its engine runs: the owner's process, or a child process of the owner's, with
the listening socket that has held the group's port since it was chosen (`take_listener`).

Every rank joins one process group (`gloo` on CPU, `nccl` on GPU) with a collective timeout, and on GPU a
second, `gloo` one for the step descriptions rank 0 sends (`step_channel`). The only
module that creates the placement-group actors and the process group; it knows nothing of the engine.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from serve_app.config import EngineConfig, ModelConfig
from serve_app.parallel.sharding import detach_deepspeed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupAddress:
    """Where rank 0 of a group and its followers meet."""

    master_addr: str
    master_port: int
    world_size: int


_step_channel: dist.ProcessGroup | None = None

# A follower rank's whole life: `worker(address, rank, device_index, model, engine)` joins (on GPU
# `device_index` of those its process sees), loads its shard and follows rank 0 until told to stop.
# Importable by name: Ray and `spawn` pickle it by reference.
Worker = Callable[[GroupAddress, int, int, ModelConfig, EngineConfig], None]


def reserve_address(world_size: int) -> tuple[GroupAddress, socket.socket | None]:
    """Where a group will meet, and the listening socket that holds its port until rank 0's store takes it
    over (None at world size 1: nobody meets).

    The port stays bound from the moment it is chosen: a port found free and released would be free for any
    process on the machine (Ray's own connections among them) to take before rank 0 bound it again, and the
    group would fail to start with EADDRINUSE. Followers may connect before rank 0 runs: the kernel queues
    them on this socket. The socket travels to a spawned rank 0 as a process argument.
    """
    if world_size == 1:
        return GroupAddress("127.0.0.1", 0, 1), None
    listener = socket.create_server((_node_ip(), 0), backlog=max(16, 2 * world_size))
    return GroupAddress(listener.getsockname()[0], listener.getsockname()[1], world_size), listener


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def join_process_group(address: GroupAddress, rank: int, engine: EngineConfig, *, device_index: int = 0,
                       listener: socket.socket | None = None) -> None:
    """Join the process group as `rank`; blocks until every rank has joined.

    `device_index` is this rank's GPU among those its process sees: 0 under Ray, which shows each rank's
    process only its own GPU (CUDA_VISIBLE_DEVICES), and the rank itself in a local group on one machine.
    `listener`: rank 0's socket from `reserve_address` (required there when the group has followers; this
    call closes it).
    """
    if engine.device == "cuda":
        torch.cuda.set_device(device_index)
    elif engine.cpu_threads_per_rank is not None:
        # Ranks on one machine share its cores: unbounded torch threads would oversubscribe them.
        torch.set_num_threads(engine.cpu_threads_per_rank)
    # DeepSpeed reads these to find the group it should wrap.
    os.environ.update(MASTER_ADDR=address.master_addr, MASTER_PORT=str(address.master_port), RANK=str(rank),
                      WORLD_SIZE=str(address.world_size), LOCAL_RANK=str(device_index))
    if address.world_size == 1:
        return
    timeout = datetime.timedelta(seconds=engine.collective_timeout_s)
    store = _rendezvous_store(address, rank, timeout, listener)
    dist.init_process_group(backend="gloo" if engine.device == "cpu" else "nccl", store=store, rank=rank,
                            world_size=address.world_size, timeout=timeout)
    global _step_channel
    # Each step's description is host data that every rank needs on the host (its Python control flow) and
    # on its device. Over NCCL it would go to rank 0's device, then to each follower's device and back to
    # its host: a device sync per step on every follower. Over gloo it stays in host memory.
    _step_channel = dist.new_group(backend="gloo", timeout=timeout) if engine.device == "cuda" else None


def _rendezvous_store(address: GroupAddress, rank: int, timeout: datetime.timedelta,
                      listener: socket.socket | None) -> dist.TCPStore:
    """Rank 0 serves the group's key-value store on the reserved socket; followers connect to it."""
    if rank != 0:
        return dist.TCPStore(address.master_addr, address.master_port, address.world_size, is_master=False,
                             timeout=timeout)
    if listener is None:
        raise ValueError("rank 0 of a tensor-parallel group joins with the listening socket that "
                         "reserve_address returned (TensorParallelGroup.take_listener)")
    try:
        # The store owns what it is given and closes it when it ends: give it a copy of the socket.
        return dist.TCPStore(address.master_addr, address.master_port, address.world_size, is_master=True,
                             timeout=timeout, master_listen_fd=os.dup(listener.fileno()))
    finally:
        listener.close()


def step_channel() -> dist.ProcessGroup | None:
    """The host-memory group that rank 0's step descriptions travel on (None: the default group, gloo on
    CPU)."""
    return _step_channel


def leave_process_group() -> None:
    global _step_channel
    if dist.is_initialized():
        detach_deepspeed()
        dist.destroy_process_group()
    _step_channel = None


class TensorParallelGroup:
    """The follower ranks of one group, started and owned by one process; at tp=1 there are none."""

    def __init__(self, address: GroupAddress, ranks: _LocalRanks | _RayRanks | None,
                 listener: socket.socket | None = None):
        self.address = address
        self._ranks = ranks
        self._listener = listener

    @classmethod
    def launch(cls, model: ModelConfig, engine: EngineConfig, worker: Worker, *, use_ray: bool
               ) -> TensorParallelGroup:
        """Start ranks 1..N-1 running `worker`, waiting for rank 0 at the returned group's `address`."""
        address, listener = reserve_address(model.tensor_parallel_size)
        if listener is None:
            return cls(address, None)
        try:
            return cls(address, (_RayRanks if use_ray else _LocalRanks)(address, worker, model, engine), listener)
        except BaseException:
            listener.close()
            raise

    def take_listener(self) -> socket.socket | None:
        """The socket holding the group's port, for the process that joins as rank 0 (`join_process_group`);
        handed out once. None at tp=1."""
        listener, self._listener = self._listener, None
        return listener

    def failure(self) -> str | None:
        """Which follower has ended, and how; None while all run (they only end on shutdown or failure)."""
        return self._ranks.failure() if self._ranks is not None else None

    def healthy(self) -> bool:
        return self.failure() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Wait up to `timeout_s` for the followers to end (rank 0 has broadcast the shutdown, or died), then
        kill what is left. At once (`timeout_s=0`) for a group that failed to start."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._ranks is not None:
            self._ranks.stop(timeout_s)

    @property
    def local_processes(self) -> list[multiprocessing.Process]:
        """The followers' processes when they are local (tests kill them); empty under Ray."""
        return self._ranks.processes if isinstance(self._ranks, _LocalRanks) else []


class _LocalRanks:
    """Ranks 1..N-1 as local processes: tensor parallelism without Ray (tests, benchmarks, one machine)."""

    def __init__(self, address: GroupAddress, worker: Worker, model: ModelConfig, engine: EngineConfig):
        context = multiprocessing.get_context("spawn")
        # Every local process sees every GPU of the machine: rank r takes GPU r.
        self.processes = [
            context.Process(target=worker, args=(address, rank, rank, model, engine), daemon=True)
            for rank in range(1, address.world_size)
        ]
        for process in self.processes:
            process.start()

    def failure(self) -> str | None:
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                return f"rank {rank} exited with code {process.exitcode}"
        return None

    def stop(self, timeout_s: float) -> None:
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(5)


class _RayRanks:
    """Ranks 1..N-1 as Ray actors, one per bundle 1..N-1 of the calling replica's placement group."""

    def __init__(self, address: GroupAddress, worker: Worker, model: ModelConfig, engine: EngineConfig):
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
            self.runs.append(actor.run.remote(worker, address, rank, model, engine))

    def failure(self) -> str | None:
        """Which rank has ended, and the last line of its error (a follower's run() only returns on shutdown
        or failure)."""
        import ray

        finished, _ = ray.wait(self.runs, num_returns=1, timeout=0)
        if not finished:
            return None
        rank = self.runs.index(finished[0]) + 1
        try:
            ray.get(finished[0])
        except Exception as exc:  # noqa: BLE001 - described, not handled: the owner fails the group
            lines = [line for line in str(exc).splitlines() if line.strip()]
            return f"rank {rank} failed: {lines[-1].strip() if lines else type(exc).__name__}"
        return f"rank {rank} stopped"

    def stop(self, timeout_s: float) -> None:
        import ray

        ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        for actor in self.actors:
            ray.kill(actor)


class RankActor:
    """A Ray actor that hosts one follower rank."""

    def run(self, worker: Worker, address: GroupAddress, rank: int, model: ModelConfig,
            engine: EngineConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        worker(address, rank, 0, model, engine)  # Ray shows this process only its own GPU
