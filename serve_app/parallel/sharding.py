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
import os
import sys

import torch
import torch.distributed as dist


class ColumnParallelHead(torch.nn.Module):
    """A linear layer split along its input features: each rank multiplies its slice of the hidden state by its
    slice of the weight's columns, and the partial products are summed over the group."""

    def __init__(self, linear: torch.nn.Linear, rank: int, world_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("a column-parallel head has no bias: it would be summed once per rank")
        bounds = [len(part) for part in torch.arange(linear.in_features).tensor_split(world_size)]
        self.start = sum(bounds[:rank])
        self.stop = self.start + bounds[rank]
        # .to(copy=True) makes the slice this rank's own tensor, so the full (memory-mapped) weight is dropped.
        weight = linear.weight.detach()[:, self.start:self.stop].to(dtype, copy=True).contiguous()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        partial = torch.nn.functional.linear(hidden[..., self.start:self.stop], self.weight)
        dist.all_reduce(partial)
        return partial


def _join_deepspeed(device_type: str) -> None:
    """Let DeepSpeed's comm layer wrap the torch.distributed group that `group.py` created."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device_type == "cpu" else "cuda")
    import deepspeed

    # DeepSpeed's CPU shared-memory all-reduce segfaults on its first call on some hosts (seen with 0.19.8
    # on this project's machines); the plain process-group all-reduce is correct and fast enough on CPU.
    # importlib, because `import deepspeed.comm.torch as m` binds the `torch` package that
    # deepspeed.comm re-exports under that name, not DeepSpeed's module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl", verbose=False)


def shard_model(model: torch.nn.Module, world_size: int, dtype: torch.dtype, device_type: str) -> torch.nn.Module:
    """This rank's shard of `model` (the group must exist: `group.join_process_group`)."""
    _join_deepspeed(device_type)
    import deepspeed

    # init_inference casts the whole module to `dtype`, buffers included. The rotary frequencies must stay
    # float32: in fp16 their relative error (up to ~4e-4) is ~1 rad of phase by position 4,096, so long
    # sequences attend to the wrong places. transformers keeps them float32 whatever the weights' dtype.
    kept = {name: buffer for name, buffer in model.named_buffers() if buffer.dtype == torch.float32}
    # AutoTP leaves a head that is not an nn.Linear alone (its `set_lm_head` looks for one).
    model.lm_head = ColumnParallelHead(model.lm_head, dist.get_rank(), world_size, dtype)
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
