"""Benchmark of the sampler: how long one step's `SamplingBatch.build` and `sample()` take.

A benchmark, not a test: it prints a table of medians and asserts nothing. The default shape is a decode step
of 32 sequences over Llama 2's 32,000-token vocabulary, each with a 512-token prompt and 128 tokens
generated so far (what the penalties count).

Usage (from the repository root; `-m` puts the root on the import path):

    python -m scripts.bench_sampler [--runs 50] [--batch 32] [--vocab 32000] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from serve_app.engine.sampler import SamplingBatch, sample
from serve_app.engine.sampling_params import SamplingParams

CONFIGS = {
    "greedy": SamplingParams(max_tokens=1, temperature=0.0),
    "temperature": SamplingParams(max_tokens=1, temperature=0.8),
    "top_k": SamplingParams(max_tokens=1, temperature=0.8, top_k=50),
    "all processors": SamplingParams(
        max_tokens=1, temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
        frequency_penalty=0.5, presence_penalty=0.3, logit_bias={13: 2.0, 29871: -100.0, 450: 5.0},
        logprobs=True, top_logprobs=5),
}


def median_ms(fn: Callable[[], object], runs: int, device: torch.device) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up: first-call allocations and kernel selection are not what a serving step pays
    times = []
    for _ in range(runs):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, device=device) * 3
    prompts = torch.randint(args.vocab, (args.batch, args.prompt_len)).tolist()
    outputs = torch.randint(args.vocab, (args.batch, args.output_len)).tolist()

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, "
          f"batch {args.batch} x vocab {args.vocab}, median of {args.runs} runs")
    print(f"{'config':<16} {'build ms':>9} {'sample ms':>10} {'total ms':>9}")
    for name, params in CONFIGS.items():
        # Half the rows seeded, as the "all processors" worst case; greedy rows never touch a generator.
        rows = [params] * args.batch
        generators = [torch.Generator(device).manual_seed(i) if name == "all processors" and i % 2 else None
                      for i in range(args.batch)]

        def build(rows: list[SamplingParams] = rows,
                  generators: list[torch.Generator | None] = generators) -> SamplingBatch:
            return SamplingBatch.build(rows, generators, prompts, outputs, args.vocab, device)

        batch = build()
        build_ms = median_ms(build, args.runs, device)
        sample_ms = median_ms(lambda batch=batch: sample(logits, batch), args.runs, device)
        print(f"{name:<16} {build_ms:>9.2f} {sample_ms:>10.2f} {build_ms + sample_ms:>9.2f}")


if __name__ == "__main__":
    main()
