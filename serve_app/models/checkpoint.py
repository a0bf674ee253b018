"""A configured model source as a Hugging Face module: where its checkpoint lives, and loading it.

In: `model.source` (a folder, a hub id, or the built-in tiny Llama) and `model.dtype`. Out: the checkpoint's
`LlamaForCausalLM`, whole and on the host, as `from_pretrained` builds it; sharding it over ranks is the
tensor-parallel group's business (`parallel/sharding.py`). For a rank of a group, the weights must stay
memory-mapped so that slicing its shard is its only private copy: a local checkpoint in another dtype than
the served one is read from its converted copy (`converted_checkpoint.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from serve_app.config import TINY_MODEL_SOURCE, ModelConfig

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_checkpoint(source: str) -> str:
    """A local folder or hub id for `from_pretrained`; builds the tiny default on first use."""
    if source == TINY_MODEL_SOURCE:
        from serve_app.tiny_llama import ensure_tiny_llama

        return str(ensure_tiny_llama())
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    return source


def load_checkpoint(model: ModelConfig, world_size: int = 1) -> torch.nn.Module:
    """The whole model in `model.dtype`, in eval mode, on the host; at `world_size` > 1 memory-mapped."""
    from transformers import AutoModelForCausalLM

    path = resolve_checkpoint(model.source)
    if world_size > 1 and Path(path).is_dir():
        from serve_app.models.converted_checkpoint import memory_mappable_checkpoint

        path = str(memory_mappable_checkpoint(path, TORCH_DTYPES[model.dtype]))
    logger.info("loading %s as %s", path, model.dtype)
    _progress_bars_without_named_semaphores()
    return AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[model.dtype]).eval()


def _progress_bars_without_named_semaphores() -> None:
    """`from_pretrained`'s progress bar (tqdm) guards its writes with a lock that tqdm makes from
    `multiprocessing`; in a process started by `spawn` (the engine process) that is a named POSIX semaphore,
    which only the process's clean exit removes. An engine process that Ray or the replica stops does not exit
    cleanly, so every start left a `/dev/shm/sem.mp-*` behind. A thread lock serves tqdm as well here: this
    process writes its bars from its own threads only."""
    import threading

    from tqdm import tqdm

    if getattr(tqdm, "_lock", None) is None:
        tqdm.set_lock(threading.RLock())
