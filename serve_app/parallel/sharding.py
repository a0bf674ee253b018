"""A model split over the ranks of a tensor-parallel group, by DeepSpeed AutoTP.

The only module that imports deepspeed. In: the whole Hugging Face model on one rank, after the process group
exists. Out: this rank's shard — q/k/v/gate/up keep this rank's slice of their outputs, and o_proj,
down_proj and lm_head all-reduce their partial results — with the module tree (and so the model code that
calls it) unchanged.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch


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
