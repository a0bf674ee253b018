"""Engine throughput with grammars (structured outputs) beside the same batch without; grammar preparation.

Measures output tokens/s of the engine (no Ray, no HTTP) for one batch of `--concurrency` sequences three
ways, interleaved in every round so that their ratios come from the same minutes of this machine: no
grammar; every row under one JSON schema; every row under a schema of its own, never seen before (so its
preparation, on the engine's grammar thread, happens during the run). Every request generates exactly
`--output-len` tokens: the schema's array needs more items than that many tokens can write, so no grammar
completes early, and the grammar-free rows ignore EOS. And the time to prepare a schema: the first one of
an engine (which loads the tokenizer), a new one (cold) and one seen before (cached, with the copy each
sequence gets).

    python scripts/bench_grammar.py                    # CPU, the tiny default checkpoint
    python scripts/bench_grammar.py --threads 1        # steadier where other work shares the cores
    python scripts/bench_grammar.py --profile 20       # also cProfile the every-row-one-schema run
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import statistics
import time
from dataclasses import dataclass, replace

import torch

from serve_app.config import TINY_MODEL_SOURCE, EngineConfig, ModelConfig
from serve_app.engine.engine import Engine, start_engine
from serve_app.engine.grammar import GrammarCompiler
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest
from serve_app.protocol import ChatCompletionRequest
from serve_app.stage.structured_output import request_grammar

ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["tool", "toy", "food"]},
        "price": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "name", "kind", "price", "tags", "ok"],
    "additionalProperties": False,
}
GREEDY = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


@dataclass(frozen=True)
class Throughput:
    wall: float  # output tokens per second
    # Output tokens per second of this process's CPU time (every thread's, llguidance's included): on a
    # machine other work shares, time spent waiting for a core does not count.
    cpu: float


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, 32000, (length - 1,), generator=generator).tolist()] for _ in range(count)]


def schema_grammar(variant: str) -> str:
    """The grammar the stage sends for a response_format of objects with `variant` as a const first field (so
    variants are different schemas) and at least 64 items (more than 128 tokens can write)."""
    schema = {"type": "object",
              "properties": {"variant": {"const": variant},
                             "items": {"type": "array", "items": ITEM, "minItems": 64}},
              "required": ["variant", "items"], "additionalProperties": False}
    request = ChatCompletionRequest.model_validate({
        "model": "bench", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "items", "schema": schema}}})
    return request_grammar(request)


def run(engine: Engine, batch: list[list[int]], output_len: int, grammars: list[str | None]) -> Throughput:
    """Output tokens/s for `batch` submitted at once (row i under `grammars[i]`) and run to completion."""
    for index, (prompt, grammar) in enumerate(zip(batch, grammars, strict=True)):
        engine.add_request(EngineRequest(ChoiceId(f"bench-{time.monotonic_ns()}", index), prompt,
                                         replace(GREEDY, max_tokens=output_len, grammar=grammar)))
    produced = 0
    started, started_cpu = time.perf_counter(), time.process_time()
    while engine.has_unfinished():
        produced += sum(len(output.new_token_ids) for output in engine.step())
        assert not engine.pop_refused()
    elapsed, elapsed_cpu = time.perf_counter() - started, time.process_time() - started_cpu
    assert produced == len(batch) * output_len, "a grammar completed early: the figures would not compare"
    return Throughput(produced / elapsed, produced / elapsed_cpu)


def preparation_ms(engine: Engine, samples: int) -> dict[str, float]:
    """Milliseconds to prepare a grammar: the first of a fresh compiler (tokenizer included), new ones, and
    cached ones (the lookup and the copy a sequence gets)."""
    source = engine.grammars
    compiler = GrammarCompiler(source.tokenizer_path, source.vocab_size, source.eos_token_ids, cache_size=256)
    try:
        started = time.perf_counter()
        compiler.prepare(schema_grammar("first")).result()
        first = (time.perf_counter() - started) * 1e3
        cold, cached = [], []
        for i in range(samples):
            grammar = schema_grammar(f"cold-{i}")
            started = time.perf_counter()
            compiler.prepare(grammar).result()
            cold.append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            compiler.prepare(grammar).result().deep_copy()
            cached.append((time.perf_counter() - started) * 1e3)
    finally:
        compiler.shutdown()
    return {"first_grammar_ms_with_tokenizer": first, "cold_ms_median": statistics.median(cold),
            "cold_ms_max": max(cold), "cached_ms_median": statistics.median(cached),
            "cached_ms_max": max(cached)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=TINY_MODEL_SOURCE, help="checkpoint folder or hub id")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="median of this many interleaved rounds")
    parser.add_argument("--preparation-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice). 1 keeps the figures steady on a "
                        "machine where another torch process runs: two processes' thread pools on the same "
                        "cores slow each other's steps many times over")
    parser.add_argument("--kv-cache-bytes", type=int, default=256 * 2**20, help="CPU only")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="cProfile one every-row-one-schema run and print its N most costly functions")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_config = ModelConfig(source=args.source, served_model_id="bench", dtype=args.dtype,
                               tensor_parallel_size=1, max_model_len=4096)
    # Repeats send the same prompts again: without the prefix cache every run computes its prompts.
    engine_config = EngineConfig(
        device=args.device, max_num_seqs=args.concurrency, max_num_batched_tokens=8192,
        kv_cache_bytes=args.kv_cache_bytes if args.device == "cpu" else None, enable_prefix_caching=False)
    engine = start_engine(model_config, engine_config)
    batch = prompts(args.concurrency, args.prompt_len, seed=args.concurrency)
    one = schema_grammar("shared")
    ways = {"no_grammar": lambda _: [None] * args.concurrency,
            "one_schema": lambda _: [one] * args.concurrency,
            "distinct_schemas": lambda r: [schema_grammar(f"round-{r}-row-{i}")
                                           for i in range(args.concurrency)]}
    try:
        results: dict[str, float] = preparation_ms(engine, args.preparation_samples)
        for name, value in results.items():
            print(f"grammar preparation, {name}: {value:8.2f}", flush=True)
        # Warm-up at the batch's full size (a first step of a new shape costs many times a later one), and the
        # shared schema prepared once.
        for way in ways.values():
            run(engine, batch, 8, way(-1))
        rounds: dict[str, list[Throughput]] = {name: [] for name in ways}
        for r in range(args.repeats):
            # Every other round runs the ways in reverse order, so that a load on the machine that grows or
            # fades over a round does not favour one way.
            for name, way in (list(ways.items()) if r % 2 == 0 else list(ways.items())[::-1]):
                rounds[name].append(run(engine, batch, args.output_len, way(r)))
            figures = ", ".join(f"{name} {values[-1].wall:.1f} tok/s ({values[-1].cpu:.1f} per CPU-s)"
                                for name, values in rounds.items())
            print(f"round {r}: {figures}", flush=True)
        prefix = f"engine_c{args.concurrency}"
        for name, values in rounds.items():
            results[f"{prefix}_{name}_tok_s"] = statistics.median(v.wall for v in values)
            results[f"{prefix}_{name}_tok_per_cpu_s"] = statistics.median(v.cpu for v in values)
        for name in ("one_schema", "distinct_schemas"):
            pairs = list(zip(rounds[name], rounds["no_grammar"], strict=True))
            results[f"ratio_{name}_vs_no_grammar"] = statistics.median(g.wall / f.wall for g, f in pairs)
            results[f"ratio_{name}_vs_no_grammar_cpu"] = statistics.median(g.cpu / f.cpu for g, f in pairs)
        for name, value in results.items():
            if name.startswith(("engine_", "ratio_")):
                print(f"{name}: {value:.3f}" if name.startswith("ratio") else f"{name}: {value:.1f}",
                      flush=True)
        ratios = ", ".join(f"{name} {results[f'ratio_{name}_vs_no_grammar']:.3f}x wall, "
                           f"{results[f'ratio_{name}_vs_no_grammar_cpu']:.3f}x CPU"
                           for name in ("one_schema", "distinct_schemas"))
        print(f"target: every row under a grammar >= 0.8x the same batch without (median ratios: {ratios})")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run(engine, batch, args.output_len, ways["one_schema"](0))
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    finally:
        engine.shutdown()
    environment = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
                   "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
                   "threads": torch.get_num_threads(),
                   "prompt_len": args.prompt_len, "output_len": args.output_len,
                   "concurrency": args.concurrency, "source": args.source}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"results": results, "environment": environment}, handle, indent=2)


if __name__ == "__main__":
    main()
