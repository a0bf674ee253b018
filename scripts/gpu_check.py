"""Does the engine work on this GPU, and how fast is it? One command on a new machine.

    python scripts/gpu_check.py                          # one H100/H200: a few minutes; writes gpu_check.json
    python scripts/gpu_check.py --quick                  # correctness only
    python scripts/gpu_check.py --device cpu --shape tiny --quick   # the script itself, without a GPU

Nothing is downloaded. Correctness runs on the project's tiny random Llama (built locally), speed on a model of
Llama-2-7B's shape with random fp16 weights (speed does not depend on the weights' values). It needs torch,
transformers and pydantic, not Ray or DeepSpeed, and checks tp=1 only.

Correctness (the script exits 1 if one fails):
  - greedy tokens equal `transformers`' greedy `generate` on the same device, for each decode path: the gather
    calls, the paged Triton kernel, and the kernel replayed from CUDA graphs. Where the two sides pick different
    tokens, the reference's logits at that point are compared: two tokens within `--tie-tolerance` of each
    other are a tie that kernel rounding may break either way, reported but not failed; anything else fails.
  - CUDA graphs on and off give the same tokens.
Speed (7B shape, fp16; figures only, no pass/fail):
  - batch-1 decode tokens/s with graphs and without, and its share of the HBM roofline (every step reads every
    weight once);
  - output tokens/s of 64 concurrent requests of 512 prompt / 256 output tokens, prefill included, against the
    KV-aware decode ceiling (each step reads the weights and every row's context);
  - how many 2k-token sequences the KV cache holds at `gpu_memory_utilization` 0.9.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

# Runnable from a plain checkout (a GPU machine with torch and transformers but without this package installed):
# the repository root, one folder up, is where `serve_app` is.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

try:
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from serve_app.config import EngineConfig, ModelConfig
    from serve_app.engine.engine import Engine, start_engine
    from serve_app.engine.model_runner import ModelRunner
    from serve_app.engine.sampling_params import SamplingParams
    from serve_app.engine.scheduler import SchedulerLimits
    from serve_app.engine.sequence import ChoiceId, EngineRequest
    from serve_app.tiny_llama import ensure_tiny_llama
except ImportError as missing:
    sys.exit(f"gpu_check needs torch, transformers and pydantic (`pip install -e .` installs them; on a machine "
             f"without a package index, carry pydantic's four wheels: docs/benchmarks.md, GPU): {missing}")

SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8},
}
# Peak memory bandwidth in TB/s, by the name torch reports; --hbm-tb-s overrides, and a copy is measured too.
HBM_TB_S = {"H200": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35, "A100-SXM4-80GB": 2.039,
            "A100 80GB PCIe": 1.935, "A100": 1.555, "L40S": 0.864, "A10": 0.6, "L4": 0.3}
TORCH_DTYPE = {"cuda": torch.float16, "cpu": torch.float32}  # the speed model's dtype
DECODE_PATHS = {"gather": {"decode_attention": "gather", "cuda_graphs": False},
                "paged": {"decode_attention": "paged", "cuda_graphs": False},
                "paged+graphs": {"decode_attention": "paged", "cuda_graphs": True}}


def _free(*engines: Engine) -> None:
    for engine in engines:
        engine.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _greedy(engine: Engine, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(ChoiceId(f"check-{time.monotonic_ns()}", index), prompt, params))
    tokens: dict[int, list[int]] = {index: [] for index in range(len(prompts))}
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.choice.index].extend(output.new_token_ids)
    return [tokens[index] for index in range(len(prompts))]


def check_correctness(device: str, max_new: int, tie_tolerance: float) -> dict:
    checkpoint = ensure_tiny_llama()
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 32000) for _ in range(length)] for length in (4, 17, 63, 200, 555)]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                     do_sample=False, pad_token_id=0)
            expected.append(out[0, len(prompt):].tolist())

    def compare(got: list[list[int]]) -> dict:
        """Exact, ties (the reference's own top logits within the tolerance where they part), or failures."""
        exact, ties, failures = 0, [], []
        for index, (prompt, want, have) in enumerate(zip(prompts, expected, got, strict=True)):
            if want == have:
                exact += 1
                continue
            at = next(i for i, (a, b) in enumerate(zip(want, have, strict=False)) if a != b)
            with torch.no_grad():
                logits = reference(torch.tensor([prompt + want[:at]], device=device)).logits[0, -1].float()
            gap = float(logits[want[at]] - logits[have[at]])
            (ties if abs(gap) <= tie_tolerance else failures).append(
                {"prompt": index, "position": at, "reference": want[at], "engine": have[at], "logit_gap": gap})
        return {"exact": exact, "of": len(prompts), "ties": ties, "failures": failures}

    model = ModelConfig(source=str(checkpoint), served_model_id="check", dtype="float32", max_model_len=1024)
    results, tokens = {}, {}
    for name, settings in DECODE_PATHS.items():
        engine = start_engine(model, EngineConfig(device=device, kv_cache_bytes=256 * 2**20, max_num_seqs=8,
                                                  max_num_batched_tokens=512, **settings))
        try:
            tokens[name] = _greedy(engine, prompts, max_new)
            results[name] = compare(tokens[name]) | {
                "decode_attention": engine.runner.decode_attention, "graphs_captured": engine.runner.graphs_captured}
        finally:
            _free(engine)
    results["graphs_on_equals_off"] = tokens["paged+graphs"] == tokens["paged"]
    return results


def _speed_engine(shape: str, device: str, cuda_graphs: bool, kv_cache_bytes: int | None) -> tuple[Engine, int]:
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, **SHAPES[shape])
    dtype = TORCH_DTYPE[device]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: a 7B model never exists in fp32
    try:
        with torch.device(device):
            hf_model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    model_config = ModelConfig(source="random", served_model_id="bench", dtype=str(dtype).split(".")[1],
                               max_model_len=4096)
    engine_config = EngineConfig(device=device, max_num_seqs=64, max_num_batched_tokens=8192,
                                 kv_cache_bytes=kv_cache_bytes, cuda_graphs=cuda_graphs)
    runner = ModelRunner(hf_model, model_config, engine_config, 0, 1)
    return Engine(runner, SchedulerLimits(64, 8192, 4096), eos_token_ids=(2,)), weight_bytes


def _output_tokens_per_s(engine: Engine, count: int, prompt_len: int, output_len: int) -> float:
    rng = random.Random(count)
    prompts = [[1] + [rng.randrange(3, 32000) for _ in range(prompt_len - 1)] for _ in range(count)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    produced = sum(len(tokens) for tokens in _greedy(engine, prompts, output_len))
    return produced / (time.perf_counter() - started)


def measured_copy_tb_s() -> float:
    """Device-to-device copy bandwidth (read + write) of 2 GiB, best of 5."""
    source = torch.empty(2**30, dtype=torch.float16, device="cuda")
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        started = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * source.element_size() / best / 1e12


def check_speed(shape: str, device: str, hbm_tb_s: float | None) -> dict:
    figures: dict = {}
    if device == "cuda":
        name = torch.cuda.get_device_name()
        figures["copy_tb_s"] = measured_copy_tb_s()
        spec = hbm_tb_s or next((value for key, value in HBM_TB_S.items() if key in name), None)
        figures["hbm_tb_s"] = spec or figures["copy_tb_s"]
        figures["hbm_tb_s_source"] = "--hbm-tb-s" if hbm_tb_s else ("spec sheet" if spec else "measured copy")
    else:
        figures["hbm_tb_s"] = hbm_tb_s or 0.05
        figures["hbm_tb_s_source"] = "assumed for a CPU smoke run"
    bandwidth = figures["hbm_tb_s"] * 1e12

    engine, weight_bytes = _speed_engine(shape, device, cuda_graphs=False,
                                         kv_cache_bytes=None if device == "cuda" else 256 * 2**20)
    try:
        _output_tokens_per_s(engine, 2, 32, 8)  # warm-up
        figures["batch1_decode_tok_s_eager"] = _output_tokens_per_s(engine, 1, 128, 256)
    finally:
        _free(engine)
    engine, _ = _speed_engine(shape, device, cuda_graphs=True,
                              kv_cache_bytes=None if device == "cuda" else 256 * 2**20)
    try:
        runner = engine.runner
        figures["decode_attention"] = runner.decode_attention
        figures["graphs_captured"] = runner.graphs_captured
        _output_tokens_per_s(engine, 2, 32, 8)
        batch1 = _output_tokens_per_s(engine, 1, 128, 256)
        roofline = bandwidth / weight_bytes
        concurrent = _output_tokens_per_s(engine, 64, 512, 256)
        shape_of = runner.kv_cache.shape
        kv_bytes_per_token = shape_of.bytes_per_block(TORCH_DTYPE[device]) / shape_of.block_size
        mean_context = 512 + 256 / 2
        ceiling = 64 / ((weight_bytes + 64 * mean_context * kv_bytes_per_token) / bandwidth)
        figures.update({
            "weight_gb": weight_bytes / 1e9,
            "batch1_decode_tok_s": batch1, "roofline_tok_s": roofline, "roofline_share": batch1 / roofline,
            "c64_512in_256out_tok_s": concurrent, "c64_kv_aware_ceiling_tok_s": ceiling,
            "c64_ceiling_share": concurrent / ceiling,
            "kv_2k_sequences": runner.kv_cache.capacity_tokens // 2048,
        })
    finally:
        _free(engine)
    return figures



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", choices=SHAPES, default="7b", help="the speed model's shape")
    parser.add_argument("--quick", action="store_true", help="correctness only")
    parser.add_argument("--max-new", type=int, default=48, help="greedy tokens per correctness prompt")
    parser.add_argument("--tie-tolerance", type=float, default=1e-3,
                        help="logit gap under which a differing greedy token counts as a tie")
    parser.add_argument("--hbm-tb-s", type=float, help="the GPU's memory bandwidth in TB/s (default: by name)")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device is visible to torch (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
              "python": platform.python_version()}
    started = time.perf_counter()
    report["correctness"] = check_correctness(args.device, args.max_new, args.tie_tolerance)
    _free()  # the reference model, before the 7B one
    paths = [report["correctness"][name] for name in DECODE_PATHS]
    report["passed"] = all(not path["failures"] for path in paths) and report["correctness"]["graphs_on_equals_off"]
    if not args.quick:
        report["speed"] = check_speed(args.shape, args.device, args.hbm_tb_s)
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"{'PASSED' if report['passed'] else 'FAILED'}: written to {args.out}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
