"""What one rank's checkpoint load costs in memory: shared (file-backed) vs the process's own.

Every tensor-parallel rank reads the whole checkpoint before AutoTP keeps its slice. Whether that costs a node
one copy or one per rank depends on whether the loaded weights stay memory-mapped (file-backed pages are
shared through the page cache) or are copied into each process. This builds a random Llama checkpoint of the
given shape in fp16 (no download), loads it with the project's own `load_rank_model` in the given dtype, reads
every weight, and prints the process's file-backed and anonymous resident memory.

    python scripts/bench_load_memory.py                  # fp16 checkpoint loaded as fp16
    python scripts/bench_load_memory.py --dtype bfloat16 # ... converted on load
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.worker import load_rank_model


def resident_mib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) // 1024
    return fields


def build_checkpoint(folder: Path, hidden: int, intermediate: int, layers: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(folder)  # safetensors, as Meta's Llama 2 checkpoints on the hub
    return sum(parameter.numel() * 2 for parameter in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--intermediate-size", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        checkpoint_bytes = build_checkpoint(Path(folder), args.hidden_size, args.intermediate_size, args.layers)
        model = ModelConfig(source=folder, served_model_id="memory", dtype=args.dtype)
        engine = EngineConfig(device="cpu", kv_cache_bytes=1)
        before = resident_mib()
        loaded = load_rank_model(model, engine, world_size=1)
        with torch.no_grad():
            for parameter in loaded.parameters():  # read every weight, as sharding and `.to(device)` do
                parameter.float().sum()
        after = resident_mib()
    report = {"checkpoint_mib": checkpoint_bytes // 2**20, "dtype": args.dtype,
              "file_backed_mib": after["RssFile"] - before["RssFile"],
              "own_mib": after["RssAnon"] - before["RssAnon"]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
