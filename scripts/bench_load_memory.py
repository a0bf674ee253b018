"""What loading a checkpoint costs each rank in memory: its peak private memory against the model's size.

A tensor-parallel rank needs only its shard. Whether loading costs it that, or a whole private copy of the
model, depends on how the checkpoint is read: file-backed pages (safetensors memory-mapped, kept in their own
dtype) are shared by every rank of a node through the page cache; a cast tensor is the process's own. This
builds a random Llama checkpoint of the given shape (no download) in the given dtype and format, loads it with
the project's `load_rank_model` on every rank of a local CPU group (which converts a checkpoint in another
dtype once, into a cache folder this script makes and removes), and reports per rank: the private
(anonymous) memory before the load (the baseline, taken once transformers' and DeepSpeed's code is imported:
that is the process's, not the checkpoint's), its peak during the load (sampled every 2 ms), and what stays
after, in MiB and as a share of the model's size in the served dtype.

    python scripts/bench_load_memory.py --tp 2 --checkpoint-dtype float32 --dtype bfloat16   # issue 14's case
    python scripts/bench_load_memory.py --tp 2 --format bin
    python scripts/bench_load_memory.py                       # tp=1, bf16 checkpoint served as bf16

fp16 at tp > 1 runs only on CPUs that DeepSpeed's CPU accelerator accepts it on (it refuses it on this
project's machines); the sharding, and so the memory, is the same in bf16.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.worker import load_rank_model
from serve_app.parallel.group import join_process_group, leave_process_group, reserve_address

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def private_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def build_checkpoint(folder: Path, hidden: int, intermediate: int, layers: int, dtype: torch.dtype,
                     safetensors: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000)
    model = LlamaForCausalLM(config).to(dtype)
    if safetensors:
        model.save_pretrained(folder)  # as Meta's Llama 2 checkpoints on the hub
    else:  # a PyTorch pickle, as older and fine-tuned checkpoints often are
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")


def measure_rank(address, rank: int, listener, model: ModelConfig, engine: EngineConfig, results) -> None:
    join_process_group(address, rank, engine, listener=listener)
    import deepspeed  # noqa: F401  (code every rank imports whatever it loads)
    import transformers.models.llama.modeling_llama  # noqa: F401

    baseline = private_mib()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, private_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    loaded = load_rank_model(model, engine, address.world_size)
    with torch.no_grad():
        for parameter in loaded.parameters():  # touch every weight, as the first forward would
            parameter.sum()
    done.set()
    sampler.join()
    peak = max(peak, private_mib())
    shard_mib = sum(p.numel() * p.element_size() for p in loaded.parameters()) / 2**20
    results[rank] = {"baseline_mib": baseline, "peak_over_baseline_mib": peak - baseline,
                     "kept_over_baseline_mib": private_mib() - baseline, "shard_mib": shard_mib}
    leave_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the served dtype")
    parser.add_argument("--checkpoint-dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--intermediate-size", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", help="also write the figures here as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cache:
        os.environ["LLAMA_SERVE_CACHE"] = cache  # the ranks (spawned) inherit it: a converted copy goes here
        build_checkpoint(Path(folder), args.hidden_size, args.intermediate_size, args.layers,
                         DTYPES[args.checkpoint_dtype], args.format == "safetensors")
        from transformers import AutoConfig, LlamaForCausalLM

        with torch.device("meta"):
            shape = LlamaForCausalLM(AutoConfig.from_pretrained(folder))
        model_mib = sum(p.numel() for p in shape.parameters()) * DTYPES[args.dtype].itemsize / 2**20
        model = ModelConfig(source=folder, served_model_id="memory", dtype=args.dtype,
                            tensor_parallel_size=args.tp, max_model_len=256)
        engine = EngineConfig(device="cpu", kv_cache_bytes=1, cpu_threads_per_rank=1)
        address, listener = reserve_address(args.tp)
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            results = manager.dict()
            ranks = [context.Process(target=measure_rank, args=(address, rank, listener if rank == 0 else None,
                                                                model, engine, results))
                     for rank in range(args.tp)]
            for process in ranks:
                process.start()
            if listener is not None:
                listener.close()  # rank 0 has its own copy
            for process in ranks:
                process.join()
            per_rank = [dict(results[rank]) for rank in range(args.tp)]
    worst = max(rank["peak_over_baseline_mib"] for rank in per_rank)
    figures = {"tp": args.tp, "checkpoint": f"{args.checkpoint_dtype} {args.format}", "served": args.dtype,
               "model_mib": model_mib, "worst_peak_share_of_model": worst / model_mib, "ranks": per_rank}
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
