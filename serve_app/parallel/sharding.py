"""A model split over the ranks of a tensor-parallel group, by DeepSpeed AutoTP.

The only module that imports deepspeed. In: the whole Hugging Face model on one rank, after the process group
exists. Out: this rank's shard — q/k/v/gate/up keep this rank's slice of their outputs, and o_proj,
down_proj and lm_head all-reduce their partial results — with the module tree (and so the model code that
calls it) unchanged.

The lm_head is split here, not by AutoTP: AutoTP first clones the whole head (for models whose head shares the
embedding's weight), which costs every rank a private copy of the largest matrix in the model (250 MiB for
Llama-2-7B in fp16, 500 MiB for 70B) at the moment its own shard is also being built. Slicing the
memory-mapped head directly makes the shard the only copy.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class ColumnParallelHead(torch.nn.Module):
    """A linear layer split along its input features: each rank multiplies its slice of the hidden state by its
    slice of the weight's columns, and the partial products are summed over the group."""

    def __init__(self, linear: torch.nn.Linear, rank: int, world_size: int, dtype: torch.dtype,
                 input_major: bool = False) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("a column-parallel head has no bias: it would be summed once per rank")
        bounds = [len(part) for part in torch.arange(linear.in_features).tensor_split(world_size)]
        self.start = sum(bounds[:rank])
        self.stop = self.start + bounds[rank]
        # .to(copy=True) makes the slice this rank's own tensor, so the full (memory-mapped) weight is dropped.
        # Input-major (CPU ranks, `models/llama.py` says why) is the same single copy, of the transpose.
        columns = linear.weight.detach()[:, self.start:self.stop]
        if input_major:
            weight = columns.t().to(dtype, copy=True).contiguous().t()
        else:
            weight = columns.to(dtype, copy=True).contiguous()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        from deepspeed.comm import inference_all_reduce

        self._all_reduce = inference_all_reduce

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        partial = torch.nn.functional.linear(hidden[..., self.start:self.stop], self.weight)
        # DeepSpeed's, as its own row-parallel layers do: shared memory between CPU ranks, NCCL on GPUs.
        self._all_reduce(partial)  # in place (it returns None on some paths)
        return partial


# DeepSpeed's shared-memory all-reduce keeps the workspace of the first group it joined for the life of the
# process (a C++ static): a later group in the same process must not use it.
_shared_memory_all_reduce_used = False
_SHARED_MEMORY_WORKSPACE_BYTES = 66 * 2**20  # per rank, in /dev/shm (DeepSpeed 0.19's allreduce_workspace)
# DeepSpeed's own builder of that kernel, kept while a group that must not use it replaces it with a no-op.
_deepspeed_build_shm_op = None


def _machine_id() -> str:
    """This machine (this boot of it): ranks with the same id share its memory."""
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}:{boot_id.read_text().strip() if boot_id.is_file() else ''}"


def _can_share_memory(world_size: int) -> bool:
    """Whether every rank of the group is on this machine, can use DeepSpeed's shared-memory all-reduce, and
    says so: all ranks must take the same path, or their collectives never meet."""
    machines: list[str | None] = [None] * world_size
    dist.all_gather_object(machines, _machine_id())
    room = Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free > 2 * world_size * \
        _SHARED_MEMORY_WORKSPACE_BYTES
    able = torch.tensor([int(len(set(machines)) == 1 and room and not _shared_memory_all_reduce_used)])
    dist.all_reduce(able, op=dist.ReduceOp.MIN)
    return bool(able.item())


def _join_deepspeed(device_type: str, world_size: int) -> None:
    """Let DeepSpeed's comm layer wrap the torch.distributed group that `group.py` created.

    On CPU, with every rank on one machine, the partial sums of o_proj, down_proj and the lm_head go through
    DeepSpeed's shared-memory all-reduce: ~10 us for a decode step's activations on this project's machines,
    where gloo's TCP round trip between two processes takes 1.2-1.5 ms (the wake-up of a sleeping process on
    these VMs), and a decode step makes 2 per layer (`scripts/bench_all_reduce.py`). It needs LOCAL_SIZE to say that all ranks are
    local: without it the kernel runs on a workspace it never mapped, which is the segfault this project saw
    before. Elsewhere the process group's all-reduce.
    """
    global _shared_memory_all_reduce_used, _deepspeed_build_shm_op
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device_type == "cpu" else "cuda")
    import deepspeed

    # importlib, because `import deepspeed.comm.torch as m` binds the `torch` package that
    # deepspeed.comm re-exports under that name, not DeepSpeed's module.
    comm = importlib.import_module("deepspeed.comm.torch")
    _deepspeed_build_shm_op = _deepspeed_build_shm_op or comm.build_shm_op
    shared = device_type == "cpu" and _can_share_memory(world_size)
    if shared:
        os.environ["LOCAL_SIZE"] = str(world_size)
    comm.build_shm_op = _timed_build(_deepspeed_build_shm_op, dist.get_rank() == 0) if shared else (lambda: None)
    deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl", verbose=False)
    if not shared:
        return
    _shared_memory_all_reduce_used = True
    backend = importlib.import_module("deepspeed.comm.comm").cdb
    built = torch.tensor([int(backend.shm_comm_op is not None)])
    dist.all_reduce(built, op=dist.ReduceOp.MIN)
    if backend.shm_comm_op is not None and not built.item():
        raise RuntimeError("DeepSpeed's shared-memory all-reduce was built on some ranks of the group and not on "
                           "others: their all-reduces would never meet")
    # Every rank has mapped every other's workspace once all are past init: the names can go, so that the
    # memory is freed with the processes instead of staying in /dev/shm.
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_"
            f"{dist.get_rank()}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)
    logger.info("tensor-parallel all-reduce: %s", all_reduce_path())


def _timed_build(build, announce: bool):
    """DeepSpeed's kernel builder, saying (where `announce`: on one rank) what it does: the first start on a
    machine compiles the kernel (58 s on 2 cores, during which the service answers "not ready"); later starts
    load it from torch's extension cache (0.3 s)."""
    def build_and_say():
        if announce:
            logger.info("loading DeepSpeed's shared-memory all-reduce kernel (the first start on a machine compiles "
                        "it with the C++ compiler: about a minute on 2 cores; later starts load it from the cache)")
        started = time.monotonic()
        module = build()
        if announce:
            logger.info("DeepSpeed's shared-memory all-reduce kernel: %s in %.1f s",
                        "ready" if module is not None else "not available here", time.monotonic() - started)
        return module
    return build_and_say


def all_reduce_path() -> str:
    """How this rank's group sums its partial products: `deepspeed_shared_memory` or `process_group`."""
    backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
    return "deepspeed_shared_memory" if getattr(backend, "shm_comm_op", None) is not None else "process_group"


def shard_model(model: torch.nn.Module, world_size: int, dtype: torch.dtype, device_type: str) -> torch.nn.Module:
    """This rank's shard of `model` (the group must exist: `group.join_process_group`)."""
    _join_deepspeed(device_type, world_size)
    import deepspeed

    # init_inference casts the whole module to `dtype`, buffers included. The rotary frequencies must stay
    # float32: in fp16 their relative error (up to ~4e-4) is ~1 rad of phase by position 4,096, so long
    # sequences attend to the wrong places. transformers keeps them float32 whatever the weights' dtype.
    kept = {name: buffer for name, buffer in model.named_buffers() if buffer.dtype == torch.float32}
    # AutoTP leaves a head that is not an nn.Linear alone (its `set_lm_head` looks for one).
    model.lm_head = ColumnParallelHead(model.lm_head, dist.get_rank(), world_size, dtype,
                                       input_major=device_type == "cpu")
    sharded = deepspeed.init_inference(model, tensor_parallel={"tp_size": world_size}, dtype=dtype,
                                       replace_with_kernel_inject=False).module
    for name, buffer in kept.items():
        owner, _, attribute = name.rpartition(".")
        setattr(sharded.get_submodule(owner), attribute, buffer)  # a registered buffer's name: stays one
    return sharded


def detach_deepspeed() -> None:
    """Forget DeepSpeed's handle on a process group that is being destroyed.

    DeepSpeed keeps its comm backend and its tensor-parallel group in globals; left in place, a later group
    in the same process (a restarted engine, the next test) would be driven through the destroyed one.
    """
    if "deepspeed.comm.comm" in sys.modules:
        sys.modules["deepspeed.comm.comm"].cdb = None
    if "deepspeed.inference.engine" in sys.modules:
        sys.modules["deepspeed.inference.engine"].InferenceEngine.inference_mp_group = None
