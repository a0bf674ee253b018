"""A tiny, randomly initialised Llama 2 checkpoint, built locally, for the CPU default and the tests.

Why it exists: this service serves Llama-2-7b-chat, but neither CI nor a laptop can download it (no hub
access) or run it quickly. So we build a ~20M-parameter model with the *same* architecture class, the same
32k Llama 2 vocabulary and chat template, and the same on-disk layout (config.json, safetensors,
generation_config.json, tokenizer files). Everything downstream (`AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained`, the engine, the workers) then runs the very loading and serving code it
runs on the 7B model; only the text it generates is gibberish.

In: an output folder and a seed. Out: a Hugging Face Llama checkpoint folder. The weights are
transformers' own random init after seeding torch's CPU generator (what `torch.manual_seed` does on a CPU),
so a seed always gives identical tensors and identical safetensors bytes.

    python -m serve_app.tiny_llama [--out DIR]    # build if needed, print the folder
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# Bump when the recipe changes in a way the hash below cannot see (e.g. how the weights are initialised).
RECIPE_VERSION = 1
STAMP_FILE = "tiny-llama-recipe.json"
CACHE_ENV = "LLAMA_SERVE_CACHE"
CHECKPOINT_NAME = "tiny-llama-2-chat"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_SEED = 0

# Seeding and the default dtype are process-global; builds in two threads must not interleave.
_INIT_LOCK = threading.Lock()

# Llama-2-7b's shape scaled down: same vocabulary, context, norm eps, RoPE base, untied head, MHA (no GQA).
CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "tie_word_embeddings": False,
}


def cache_root() -> Path:
    """Where the project keeps what it builds on a node: `$LLAMA_SERVE_CACHE`, or `~/.cache/llama-serve`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llama-serve")


def default_checkpoint_dir() -> Path:
    """`$LLAMA_SERVE_CACHE/tiny-llama-2-chat`, or `~/.cache/llama-serve/tiny-llama-2-chat`."""
    return cache_root() / CHECKPOINT_NAME


def _tokenizer_assets() -> Traversable:
    return resources.files("serve_app") / "assets" / "llama2-tokenizer"


def recipe_hash(seed: int = DEFAULT_SEED) -> str:
    """Fingerprint of everything that decides the checkpoint's contents."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps({"version": RECIPE_VERSION, "seed": seed, "config": CONFIG}, sort_keys=True).encode()
    )
    for name in TOKENIZER_FILES:
        digest.update((_tokenizer_assets() / name).read_bytes())
    return digest.hexdigest()


def build_tiny_llama(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Write the tiny checkpoint into `out_dir` (created if needed; files in it are overwritten)."""
    out_dir = Path(out_dir)
    config = LlamaConfig(**CONFIG, dtype="float32")
    # Initialise on the CPU in float32 whatever the caller's default dtype, and leave the caller's RNG
    # untouched: `torch.manual_seed` restricted to the CPU generator, which is all the init draws from
    # (seeding CUDA too would initialise it, which a process about to fork workers must not do).
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            torch.default_generator.manual_seed(seed)
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous_dtype)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False)
    model.save_pretrained(out_dir)  # safetensors, the only format transformers 5 writes

    assets = _tokenizer_assets()
    for name in TOKENIZER_FILES:
        (out_dir / name).write_bytes((assets / name).read_bytes())
    (out_dir / STAMP_FILE).write_text(
        json.dumps({"recipe": recipe_hash(seed), "seed": seed}, indent=2) + "\n", encoding="utf-8"
    )
    return out_dir


def _is_current(path: Path) -> bool:
    try:
        stamp = json.loads((path / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == recipe_hash() and (path / "model.safetensors").is_file()


def _is_foreign(path: Path) -> bool:
    if not path.exists() or (path / STAMP_FILE).is_file():
        return False
    return not path.is_dir() or any(path.iterdir())


def ensure_tiny_llama(out_dir: Path | None = None) -> Path:
    """The tiny checkpoint's folder, building it first if it is missing or from an older recipe.

    The build goes to a temporary sibling folder that is renamed into place, so a reader never sees a
    half-written checkpoint and two processes racing both end up with one complete copy.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_checkpoint_dir()
    if _is_current(out_dir):
        return out_dir
    if _is_foreign(out_dir):  # an older recipe gets replaced; something we did not make never does
        raise FileExistsError(f"{out_dir} exists and is not a tiny-llama checkpoint; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        build_tiny_llama(staging)
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _move_into_place(staging: Path, out_dir: Path) -> None:
    try:
        staging.rename(out_dir)  # atomic; fails if out_dir exists and is not empty
        return
    except OSError:
        pass
    if _is_current(out_dir):
        return  # another process won the race
    # An older recipe: move it aside, then retry.
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.retired-", dir=out_dir.parent))
    try:
        with contextlib.suppress(FileNotFoundError):  # a racing process may have moved it already
            out_dir.rename(retired / "old")
        try:
            staging.rename(out_dir)
        except OSError:
            if not _is_current(out_dir):
                raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (if needed) the tiny Llama 2 checkpoint.")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {default_checkpoint_dir()}")
    args = parser.parse_args(argv)
    print(ensure_tiny_llama(args.out))


if __name__ == "__main__":
    main()
