"""Engine-only throughput beside `transformers` `generate`, on the same checkpoint, in one run.

Measures output tokens/s of the engine (no Ray, no HTTP) with 1, 8 and 32 concurrent sequences, and of
`generate` one request at a time and as one static batch of 32. Every request has the same prompt length and
generates exactly `--output-len` tokens (EOS ignored), so the figures compare like with like.

    python scripts/bench_engine.py                      # CPU, the tiny default checkpoint
    python scripts/bench_engine.py --out bench.json     # also write the figures as JSON
    python scripts/bench_engine.py --tensor-parallel-size 2 --concurrency 1 32   # the tiny config's group
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM

from serve_app.config import TINY_MODEL_SOURCE, EngineConfig, ModelConfig
from serve_app.engine.engine import Engine, start_engine
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest
from serve_app.models.checkpoint import resolve_checkpoint


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 32000) for _ in range(length - 1)] for _ in range(count)]


GREEDY = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
# Every processor on, a seed per request: the sampler's most expensive path.
ALL_PROCESSORS = SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9, top_k=50, min_p=0.05,
                                presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2,
                                logprobs=True, top_logprobs=5, ignore_eos=True)


def run_engine(engine: Engine, batch: list[list[int]], output_len: int, params: SamplingParams = GREEDY) -> float:
    """Output tokens/s for `batch` submitted at once and run to completion."""
    for index, prompt in enumerate(batch):
        seed = index if params.temperature > 0 else None
        engine.add_request(EngineRequest(ChoiceId(f"bench-{time.monotonic_ns()}", index), prompt,
                                         replace(params, max_tokens=output_len, seed=seed)))
    produced = 0
    started = time.perf_counter()
    while engine.has_unfinished():
        produced += sum(len(output.new_token_ids) for output in engine.step())
    elapsed = time.perf_counter() - started
    assert produced == len(batch) * output_len
    return produced / elapsed


def run_generate(model, batch: list[list[int]], output_len: int) -> float:
    """Output tokens/s of one `generate` call over `batch` (equal lengths: no padding needed)."""
    inputs = torch.tensor(batch, device=model.device)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - started
    assert out.shape[1] - inputs.shape[1] == output_len
    return len(batch) * output_len / elapsed


def median_of(repeats: int, measure) -> float:
    return statistics.median(measure() for _ in range(repeats))


def variant_tok_s(model_config: ModelConfig, engine_config: EngineConfig, change: dict, batch, output_len: int,
                  repeats: int) -> float:
    """Output tokens/s of an engine built with `change` applied to `engine_config`, on `batch()` (called once
    per run), after one warm-up run."""
    engine = start_engine(model_config, engine_config.model_copy(update=change))
    try:
        run_engine(engine, batch(), 4)
        return median_of(repeats, lambda: run_engine(engine, batch(), output_len))
    finally:
        engine.shutdown()


def shared_prefix_figures(args, model_config: ModelConfig, engine_config: EngineConfig, results: dict) -> None:
    """The largest concurrency's requests = one shared system prompt + 16 tokens of their own, 32 output
    tokens each: output tokens/s with the prefix cache off and on. Fresh suffixes every run, so only the
    shared part can hit (when on, the warm-up run leaves the system prompt in the cache)."""
    top, rng = max(args.concurrency), random.Random(123)
    system = prompts(1, args.shared_prefix_len, seed=123)[0]

    def batch() -> list[list[int]]:
        return [system + [rng.randrange(3, 32000) for _ in range(16)] for _ in range(top)]

    for enabled in (False, True):
        name = f"engine_c{top}_shared_prefix_{args.shared_prefix_len}_cache_{'on' if enabled else 'off'}"
        results[name] = variant_tok_s(model_config, engine_config, {"enable_prefix_caching": enabled}, batch, 32,
                                      args.repeats)
        print(f"engine, {top} requests sharing a {args.shared_prefix_len}-token prefix, prefix cache "
              f"{'on' if enabled else 'off'}: {results[name]:9.1f} tok/s", flush=True)


def long_context_figures(args, model_config: ModelConfig, engine_config: EngineConfig, results: dict) -> None:
    """The largest concurrency's requests with one of them `--long-context-len` tokens long: output tokens/s
    with the decode attention in calls by context length (the default `decode_gather_tokens`) and in one call
    for every row, each padded to the long one's length (a bound no batch reaches)."""
    top = max(args.concurrency)
    batch = prompts(top - 1, args.prompt_len, seed=321) + prompts(1, args.long_context_len, seed=322)
    for label, bound in (("one_call", 2**40), ("by_length", engine_config.decode_gather_tokens)):
        name = f"engine_c{top}_one_{args.long_context_len}_token_prompt_decode_{label}"
        results[name] = variant_tok_s(model_config, engine_config, {"decode_gather_tokens": bound},
                                      lambda: batch, args.output_len, args.repeats)
        print(f"engine, {top} requests, one with a {args.long_context_len}-token prompt, decode attention "
              f"{'by length' if label == 'by_length' else 'in one call'}: {results[name]:9.1f} tok/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=TINY_MODEL_SOURCE, help="checkpoint folder or hub id")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks of the engine's group (on CPU: local processes, one torch thread each)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--one-at-a-time-requests", type=int, default=4, help="0: skip generate one at a time")
    parser.add_argument("--static-batch", type=int, default=32, help="0: skip generate's static batch")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs per figure")
    parser.add_argument("--kv-cache-bytes", type=int, default=256 * 2**20, help="CPU only")
    parser.add_argument("--shared-prefix-len", type=int, default=0,
                        help="also measure chat-like requests sharing a system prompt of this many tokens, "
                             "prefix cache on vs off")
    parser.add_argument("--long-context-len", type=int, default=0,
                        help="also measure the largest concurrency with one request this many tokens long among "
                             "the others: decode attention by context length vs one padded call")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()

    torch.manual_seed(0)
    model_config = ModelConfig(source=args.source, served_model_id="bench", dtype=args.dtype,
                               tensor_parallel_size=args.tensor_parallel_size, max_model_len=4096)
    # Repeats submit the same prompts again: without the prefix cache the engine computes every prompt, as
    # `generate` does. The shared-prefix figures below switch it on.
    engine_config = EngineConfig(
        device=args.device, max_num_seqs=max(args.concurrency), max_num_batched_tokens=4096,
        kv_cache_bytes=args.kv_cache_bytes if args.device == "cpu" else None, enable_prefix_caching=False,
        cpu_threads_per_rank=1 if args.device == "cpu" and args.tensor_parallel_size > 1 else None)
    engine = start_engine(model_config, engine_config)
    hf_model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(args.source),
                                                    dtype=getattr(torch, args.dtype)).to(args.device).eval()

    results: dict[str, float] = {}
    run_engine(engine, prompts(2, args.prompt_len, seed=99), 8)  # warm-up
    run_generate(hf_model, prompts(1, args.prompt_len, seed=99), 8)
    for concurrency in args.concurrency:
        batch = prompts(concurrency, args.prompt_len, seed=concurrency)
        results[f"engine_c{concurrency}"] = median_of(
            args.repeats, lambda batch=batch: run_engine(engine, batch, args.output_len))
        print(f"engine, {concurrency:>3} concurrent: {results[f'engine_c{concurrency}']:9.1f} tok/s", flush=True)
    top = max(args.concurrency)
    batch = prompts(top, args.prompt_len, seed=top)
    results[f"engine_c{top}_all_processors"] = median_of(
        args.repeats, lambda: run_engine(engine, batch, args.output_len, ALL_PROCESSORS))
    print(f"engine, {top:>3} concurrent, every sampling processor on: "
          f"{results[f'engine_c{top}_all_processors']:9.1f} tok/s", flush=True)

    if args.shared_prefix_len:
        engine.shutdown()
        shared_prefix_figures(args, model_config, engine_config, results)
        engine = start_engine(model_config, engine_config)
    if args.long_context_len:
        engine.shutdown()
        long_context_figures(args, model_config, engine_config, results)
        engine = start_engine(model_config, engine_config)

    if args.one_at_a_time_requests:
        singles = prompts(args.one_at_a_time_requests, args.prompt_len, seed=7)
        one_at_a_time = [run_generate(hf_model, [prompt], args.output_len) for prompt in singles]
        results["generate_one_at_a_time"] = statistics.median(one_at_a_time)
        print(f"generate, one at a time: {results['generate_one_at_a_time']:9.1f} tok/s", flush=True)
    if args.static_batch:
        static = prompts(args.static_batch, args.prompt_len, seed=args.static_batch)
        results[f"generate_static_batch_{args.static_batch}"] = median_of(
            args.repeats, lambda: run_generate(hf_model, static, args.output_len))
        print(f"generate, static batch of {args.static_batch}: "
              f"{results[f'generate_static_batch_{args.static_batch}']:9.1f} tok/s", flush=True)

    if top == args.static_batch and args.one_at_a_time_requests:
        results["ratio_vs_static_batch"] = results[f"engine_c{top}"] / results[f"generate_static_batch_{top}"]
        results["ratio_vs_one_at_a_time"] = results[f"engine_c{top}"] / results["generate_one_at_a_time"]
        print(f"engine at {top} / static batch: {results['ratio_vs_static_batch']:.2f}x (target >= 0.9)")
        print(f"engine at {top} / one at a time: {results['ratio_vs_one_at_a_time']:.1f}x (target >= 10)")
    environment = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
                   "threads": torch.get_num_threads(), "prompt_len": args.prompt_len,
                   "output_len": args.output_len, "source": args.source,
                   "tensor_parallel_size": args.tensor_parallel_size}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"results": results, "environment": environment}, handle, indent=2)
    engine.shutdown()


if __name__ == "__main__":
    main()
