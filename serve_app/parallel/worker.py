"""A tensor-parallel rank's model: load the Hugging Face checkpoint and shard it with DeepSpeed.

The only module that imports deepspeed. Every rank runs `load_model` after the process group exists:
`from_pretrained` reads the full checkpoint, then `deepspeed.init_inference` (AutoTP) keeps this rank's
slice of q/k/v/gate/up and inserts all-reduces after o_proj, down_proj and lm_head.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import torch

from serve_app.config import EngineConfig, ModelConfig
from serve_app.models.checkpoint import resolve_checkpoint

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _join_deepspeed(device: str) -> None:
    """Let DeepSpeed's comm layer wrap the torch.distributed group that `group.py` created."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    import deepspeed

    # DeepSpeed's CPU shared-memory all-reduce segfaults on its first call on some hosts (seen with 0.19.8
    # on this project's machines); the plain process-group all-reduce is correct and fast enough on CPU.
    # importlib, because `import deepspeed.comm.torch as m` binds the `torch` package that
    # deepspeed.comm re-exports under that name, not DeepSpeed's module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)


def load_model(model: ModelConfig, engine: EngineConfig, world_size: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = resolve_checkpoint(model.source)
    dtype = DTYPES[model.dtype]
    logger.info("loading %s as %s (tp=%d)", path, model.dtype, world_size)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    hf_model.eval()
    device = torch.device("cuda", torch.cuda.current_device()) if engine.device == "cuda" else torch.device("cpu")
    if world_size == 1:
        return hf_model.to(device)

    _join_deepspeed(engine.device)
    import deepspeed

    sharded = deepspeed.init_inference(hf_model, tensor_parallel={"tp_size": world_size}, dtype=dtype,
                                       replace_with_kernel_inject=False)
    return sharded.module.to(device)


def detach_deepspeed() -> None:
    """Forget DeepSpeed's handle on a process group that is being destroyed.

    DeepSpeed keeps its comm backend and its tensor-parallel group in globals; left in place, a later group
    in the same process (a restarted engine, the next test) would be driven through the destroyed one.
    """
    if "deepspeed.comm.comm" in sys.modules:
        sys.modules["deepspeed.comm.comm"].cdb = None
    if "deepspeed.inference.engine" in sys.modules:
        sys.modules["deepspeed.inference.engine"].InferenceEngine.inference_mp_group = None
