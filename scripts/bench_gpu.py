"""The engine on a GPU against the hardware's limits, with a Llama-2-7B-shaped model of random fp16 weights.

Nothing can be downloaded on the benchmark machines, so the model is built in memory from Llama-2-7B's
shape (32 layers, hidden 4096, 32 heads, FFN 11008, vocab 32000); speed does not depend on the weights'
values. Three figures:
  1. batch-1 decode tokens/s, and its share of the HBM roofline (every step reads all weights once);
  2. output tokens/s with 64 concurrent requests of 512 prompt / 256 output tokens;
  3. how many 2k-token sequences the KV cache holds at tp=1.

    python scripts/bench_gpu.py --hbm-tb-s 3.35            # H100 SXM
    python scripts/bench_gpu.py --shape tiny --device cpu  # a smoke run of the script itself
    python scripts/bench_gpu.py --decode-gather-tokens 1099511627776  # decode attention in one call, as before
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.engine import Engine
from serve_app.engine.model_runner import ModelRunner
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.scheduler import SchedulerLimits
from serve_app.engine.sequence import ChoiceId, EngineRequest

SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8},
}


def build(shape: str, device: str, dtype: torch.dtype, max_num_seqs: int, kv_cache_bytes: int | None,
          decode_gather_tokens: int):
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model_config = ModelConfig(source="random", served_model_id="bench", dtype=str(dtype).split(".")[1],
                               max_model_len=4096)
    engine_config = EngineConfig(device=device, max_num_seqs=max_num_seqs, max_num_batched_tokens=8192,
                                 kv_cache_bytes=kv_cache_bytes, decode_gather_tokens=decode_gather_tokens)
    runner = ModelRunner(model, model_config, engine_config, 0, 1)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    limits = SchedulerLimits(max_num_seqs, 8192, 4096)
    return Engine(runner, limits, eos_token_ids=(2,)), weight_bytes


def throughput(engine: Engine, count: int, prompt_len: int, output_len: int) -> float:
    rng = random.Random(count)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i in range(count):
        prompt = [1] + [rng.randrange(3, 32000) for _ in range(prompt_len - 1)]
        engine.add_request(EngineRequest(ChoiceId(f"{time.monotonic_ns()}", i), prompt, params))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started, produced = time.perf_counter(), 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--hbm-tb-s", type=float, default=3.35,
                        help="the GPU's memory bandwidth in TB/s (H100 SXM: 3.35)")
    parser.add_argument("--decode-gather-tokens", type=int, default=EngineConfig().decode_gather_tokens,
                        help="engine.decode_gather_tokens; 1099511627776 attends every decode row in one call, "
                             "as before session 5, to compare KV capacity and speed")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    engine, weight_bytes = build(args.shape, args.device, dtype, 64,
                                 None if args.device == "cuda" else 256 * 2**20, args.decode_gather_tokens)
    throughput(engine, 2, 32, 8)  # warm-up
    batch1 = throughput(engine, 1, 128, 256)
    roofline = args.hbm_tb_s * 1e12 / weight_bytes
    concurrent = throughput(engine, 64, 512, 256)
    capacity = engine.runner.kv_cache.capacity_tokens // 2048
    figures = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "weight_gb": weight_bytes / 1e9,
        "batch1_decode_tok_s": batch1, "roofline_tok_s": roofline, "roofline_share": batch1 / roofline,
        "c64_512in_256out_tok_s": concurrent, "kv_2k_sequences": capacity,
        "decode_gather_tokens": args.decode_gather_tokens,
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
