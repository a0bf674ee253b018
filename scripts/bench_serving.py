"""Serving benchmark for any OpenAI-compatible chat endpoint, beside `transformers` `generate` in the same run.

What it measures, against `--base-url` (this service, or any other server that speaks `/v1/chat/completions`
with SSE streaming):

* **fixed-length points** — every request has the same prompt and `--output-len` tokens, at 1 stream and at
  `--static-batch` streams. These are compared side by side with the baselines below.
* **a concurrency sweep** (`--concurrency`) and **Poisson request rates** (`--request-rate`), with prompt and
  output lengths drawn from a ShareGPT-like distribution generated locally (log-normal, no download).

Per point: time to first token (TTFT), time per output token (TPOT, after the first), inter-token latency
(ITL: the gaps between streamed chunks, spread over the tokens each chunk carries), end-to-end latency, each
at p50/p90/p99; output tokens/s, requests/s, goodput (requests/s that met `--ttft-slo-ms` and
`--tpot-slo-ms`) and failures. Output-token counts come from the server's `usage` (`stream_options`).

Baselines (`--baseline-source`, a checkpoint folder, hub id or `builtin:tiny-llama-2-chat`), run in this
process after the load so they never compete with the server: `generate` one request at a time and as one
static batch of `--static-batch`, and this project's engine in-process at one stream (no Ray, no HTTP) —
the serving path's added latency per token and to the first token is the served figure minus the engine's.

    serve run configs/tiny.yaml &   # or any OpenAI-compatible server
    python scripts/bench_serving.py --baseline-source builtin:tiny-llama-2-chat --out-dir bench-out

Writes `<out-dir>/bench_serving.json` and `<out-dir>/bench_serving.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

_WORD_LIST = ("the of and to in is was for that with as on by at from his her they this which be are have had "
              "not but one all were when there can an been has more if will who would their so about what time "
              "people year into just like other could them than then now only its over also after new most made "
              "way many some may first good well very even because any these know take day our back work life "
              "world city house water small large place right old great still long hand point number story "
              "system question government company school family night state part word fact group problem")
WORDS = _WORD_LIST.split()


@dataclass
class Sample:
    prompt: str
    max_tokens: int


@dataclass
class Result:
    ok: bool
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def text_of(tokens: int, rng: random.Random) -> str:
    """About `tokens` Llama tokens of plain English words (common words are ~1.25 tokens each)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, round(tokens / 1.25))))


def sharegpt_like(count: int, rng: random.Random, prompt_median: int, output_median: int,
                  max_total: int) -> list[Sample]:
    """Log-normal prompt/output lengths with ShareGPT's shape: long right tails, outputs shorter than prompts.

    ShareGPT's conversations have log-normal-ish lengths (sigma ~1 for prompts, ~0.8 for outputs); the
    medians are arguments so the same shape fits a tiny CPU model and a 4k-context GPU model.
    """
    samples = []
    for _ in range(count):
        prompt = int(min(max(rng.lognormvariate(math.log(prompt_median), 1.0), 4), max_total // 2))
        output = int(min(max(rng.lognormvariate(math.log(output_median), 0.8), 4), max_total - prompt - 64))
        samples.append(Sample(text_of(prompt, rng), max(output, 1)))
    return samples


async def send(client: httpx.AsyncClient, model: str, sample: Sample, extra: dict) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": sample.prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": sample.max_tokens, "temperature": 0.0,
            **extra}
    started = time.perf_counter()
    result = Result(ok=False)
    last = None
    chunk_gaps: list[float] = []
    try:
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    result.ok = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])[:200]
                    return result
                now = time.perf_counter()
                if any(choice.get("delta", {}).get("content") for choice in event.get("choices", [])):
                    if last is None:
                        result.ttft_s = now - started
                    else:
                        chunk_gaps.append(now - last)
                    last = now
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    result.e2e_s = time.perf_counter() - started
    if result.ok and chunk_gaps and result.output_tokens > 1:
        # Chunks coalesce tokens; spread each gap over the tokens that arrived in it (on average).
        per_chunk = (result.output_tokens - 1) / len(chunk_gaps)
        result.itl_s = [gap / per_chunk for gap in chunk_gaps for _ in range(max(1, round(per_chunk)))]
    return result


async def run_point(client, model: str, samples: list[Sample], extra: dict, *, concurrency: int | None = None,
                    rate: float | None = None, seed: int = 0, label: str = "") -> tuple[list[Result], float]:
    """All samples at a fixed concurrency, or with Poisson arrivals at `rate` requests/s; (results, wall s)."""
    results: list[Result] = []
    bar = tqdm(total=len(samples), desc=label, unit="req", file=sys.stdout, leave=True, mininterval=1.0)

    async def one(sample: Sample) -> None:
        results.append(await send(client, model, sample, extra))
        bar.update()

    started = time.perf_counter()
    if concurrency is not None:
        queue = list(reversed(samples))

        async def worker() -> None:
            while queue:
                await one(queue.pop())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        rng = random.Random(seed)
        tasks = []
        for sample in samples:
            tasks.append(asyncio.create_task(one(sample)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    bar.close()
    return results, wall


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale, 3)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": round(statistics.fmean(ordered) * scale, 3)}


def summarize(results: list[Result], wall: float, ttft_slo_ms: float, tpot_slo_ms: float) -> dict:
    ok = [r for r in results if r.ok]
    tpots = [r.tpot_s for r in ok if r.tpot_s is not None]
    good = [r for r in ok if r.ttft_s * 1000 <= ttft_slo_ms and (r.tpot_s or 0) * 1000 <= tpot_slo_ms]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "failures": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "wall_s": round(wall, 3), "output_tokens": output_tokens,
        "prompt_tokens_mean": round(statistics.fmean(r.prompt_tokens for r in ok), 1) if ok else None,
        "output_tokens_mean": round(output_tokens / len(ok), 1) if ok else None,
        "output_tokens_per_s": round(output_tokens / wall, 2), "requests_per_s": round(len(ok) / wall, 3),
        "goodput_requests_per_s": round(len(good) / wall, 3),
        "ttft_ms": percentiles([r.ttft_s for r in ok]), "tpot_ms": percentiles(tpots),
        "itl_ms": percentiles([gap for r in ok for gap in r.itl_s]), "e2e_ms": percentiles([r.e2e_s for r in ok]),
    }


# -- baselines, in this process -------------------------------------------------------------------------------

def run_baselines(args, prompt_len: int, output_len: int) -> dict[str, float]:
    """`generate` one at a time and as a static batch, and the engine at one stream, on the same checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_engine import prompts, run_generate

    from serve_app.config import EngineConfig, ModelConfig
    from serve_app.engine.engine import start_engine
    from serve_app.engine.sampling_params import SamplingParams
    from serve_app.engine.sequence import ChoiceId, EngineRequest
    from serve_app.models.checkpoint import resolve_checkpoint

    if args.baseline_threads:
        torch.set_num_threads(args.baseline_threads)
    torch.manual_seed(0)
    print(f"baselines: prompt {prompt_len} tokens, {output_len} output tokens, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    figures: dict[str, float] = {}
    hf_model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(args.baseline_source),
                                                    dtype=getattr(torch, args.dtype)).to(args.device).eval()
    run_generate(hf_model, prompts(1, prompt_len, seed=99), 4)  # warm-up
    singles = [run_generate(hf_model, [p], output_len) for p in prompts(args.one_at_a_time, prompt_len, seed=7)]
    figures["generate_one_at_a_time_tok_s"] = round(statistics.median(singles), 2)
    static = prompts(args.static_batch, prompt_len, seed=args.static_batch)
    figures["generate_static_batch_tok_s"] = round(statistics.median(
        run_generate(hf_model, static, output_len) for _ in range(args.repeats)), 2)
    del hf_model

    if args.engine_threads:
        torch.set_num_threads(args.engine_threads)
    engine = start_engine(
        ModelConfig(source=args.baseline_source, served_model_id="bench", dtype=args.dtype,
                    max_model_len=max(2048, prompt_len + output_len + 1)),
        EngineConfig(device=args.device, max_num_seqs=args.static_batch, max_num_batched_tokens=4096,
                     kv_cache_bytes=256 * 2**20 if args.device == "cpu" else None,
                     cpu_small_step_tokens=args.engine_small_step_tokens))
    ttfts, tpots = [], []
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate(prompts(args.single_stream_requests + 1, prompt_len, seed=11)):
        engine.add_request(EngineRequest(ChoiceId(f"single-{index}", 0), prompt, params))
        started = time.perf_counter()
        engine.step()
        first = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        if index:  # the first run warms up
            ttfts.append(first - started)
            tpots.append((time.perf_counter() - first) / (output_len - 1))
    engine.shutdown()
    figures["engine_threads"] = args.engine_threads or torch.get_num_threads()
    figures["engine_small_step_tokens"] = args.engine_small_step_tokens
    figures["engine_c1_ttft_ms"] = round(statistics.median(ttfts) * 1000, 3)
    figures["engine_c1_tpot_ms"] = round(statistics.median(tpots) * 1000, 3)
    for name, value in figures.items():
        print(f"  {name}: {value}", flush=True)
    return figures


# -- plots ------------------------------------------------------------------------------------------------------

def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    sweep = report["concurrency_sweep"]
    rates = report["rate_sweep"]
    base = report.get("baselines", {})
    fixed = report["fixed"].get(f"c{report['settings']['static_batch']}")
    if sweep:
        xs = [p["concurrency"] for p in sweep]
        axes[0, 0].plot(xs, [p["output_tokens_per_s"] for p in sweep], "o-", label="served (ShareGPT-like)")
    if fixed:
        axes[0, 0].plot([report["settings"]["static_batch"]], [fixed["output_tokens_per_s"]], "s",
                        label="served (fixed lengths)")
    for key, style in (("generate_static_batch_tok_s", "--"), ("generate_one_at_a_time_tok_s", ":")):
        if key in base:
            axes[0, 0].axhline(base[key], linestyle=style, color="gray", label=key.removesuffix("_tok_s"))
    axes[0, 0].set(xlabel="concurrent streams", ylabel="output tokens/s", title="Throughput")
    for metric, ax in (("ttft_ms", axes[0, 1]), ("tpot_ms", axes[1, 0])):
        if sweep:
            for q in ("p50", "p99"):
                ax.plot(xs, [p[metric][q] for p in sweep], "o-", label=f"{metric[:-3].upper()} {q}")
        ax.set(xlabel="concurrent streams", ylabel="ms", title=metric[:-3].upper())
    if rates:
        rs = [p["request_rate"] for p in rates]
        ax = axes[1, 1]
        ax.plot(rs, [p["requests_per_s"] for p in rates], "o-", label="requests/s")
        ax.plot(rs, [p["goodput_requests_per_s"] for p in rates], "s-", label="goodput (SLOs met)")
        ax.set(xlabel="offered Poisson rate (req/s)", ylabel="req/s", title="Poisson load")
    for ax in axes.flat:
        if ax.has_data():
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{report['settings']['model']} @ {report['settings']['base_url']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- main -------------------------------------------------------------------------------------------------------

async def serve_load(args) -> dict:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=httpx.Timeout(args.timeout_s),
                                 limits=limits, headers={"Authorization": f"Bearer {args.api_key}"}) as client:
        card = (await client.get("/models")).raise_for_status().json()["data"][0]
        model = args.model or card["id"]
        max_total = args.max_model_len or card.get("max_model_len") or 4096
        extra = json.loads(args.extra_body)
        rng = random.Random(args.seed)
        report: dict = {"settings": {**vars(args), "model": model, "max_model_len": max_total},
                        "fixed": {}, "concurrency_sweep": [], "rate_sweep": []}
        await run_point(client, model, [Sample(text_of(16, rng), 8)] * 2, extra, concurrency=2, label="warm-up")

        for streams in (1, args.static_batch):
            count = args.single_stream_requests if streams == 1 else streams * args.fixed_rounds
            # A prompt of its own per request, so a server's prefix cache cannot skip the prefill that the
            # in-process baselines compute.
            samples = [Sample(text_of(args.prompt_len, rng), args.output_len) for _ in range(count)]
            results, wall = await run_point(client, model, samples, extra, concurrency=streams,
                                            label=f"fixed c={streams}")
            report["fixed"][f"c{streams}"] = summarize(results, wall, args.ttft_slo_ms, args.tpot_slo_ms)
        for concurrency in args.concurrency:
            samples = sharegpt_like(args.num_requests, rng, args.prompt_median, args.output_median, max_total)
            results, wall = await run_point(client, model, samples, extra, concurrency=concurrency,
                                            label=f"sweep c={concurrency}")
            report["concurrency_sweep"].append(
                {"concurrency": concurrency, **summarize(results, wall, args.ttft_slo_ms, args.tpot_slo_ms)})
        for rate in args.request_rate:
            samples = sharegpt_like(args.num_requests, rng, args.prompt_median, args.output_median, max_total)
            results, wall = await run_point(client, model, samples, extra, rate=rate, seed=args.seed,
                                            label=f"rate {rate}/s")
            report["rate_sweep"].append(
                {"request_rate": rate, **summarize(results, wall, args.ttft_slo_ms, args.tpot_slo_ms)})
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--model", help="default: the first model /v1/models lists")
    parser.add_argument("--max-model-len", type=int, help="default: from /v1/models, else 4096")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16, 32])
    parser.add_argument("--request-rate", type=float, nargs="*", default=[1.0, 4.0])
    parser.add_argument("--num-requests", type=int, default=64, help="per sweep point")
    parser.add_argument("--prompt-median", type=int, default=128, help="ShareGPT-like prompt tokens, median")
    parser.add_argument("--output-median", type=int, default=96, help="ShareGPT-like output tokens, median")
    parser.add_argument("--prompt-len", type=int, default=128, help="fixed-length points: prompt tokens (about)")
    parser.add_argument("--output-len", type=int, default=128, help="fixed-length points: output tokens")
    parser.add_argument("--fixed-rounds", type=int, default=2,
                        help="the many-stream fixed point sends streams x this many requests")
    parser.add_argument("--single-stream-requests", type=int, default=16,
                        help="requests at the one-stream fixed point (and engine runs beside it): p50s of these")
    parser.add_argument("--static-batch", type=int, default=32)
    parser.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=100.0)
    parser.add_argument("--extra-body", default="{}", help="JSON merged into every request body")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-source", help="checkpoint for the in-process baselines; omit to skip them")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--baseline-threads", type=int, help="torch threads for the baselines (CPU)")
    parser.add_argument("--engine-threads", type=int,
                        help="torch threads for the in-process engine (CPU): match the served replica's, e.g. 1 "
                             "for a rank Ray gives one CPU; default: as --baseline-threads")
    parser.add_argument("--engine-small-step-tokens", type=int,
                        help="the in-process engine's engine.cpu_small_step_tokens: match the served config's "
                             "(configs/tiny-tp1.yaml: 8, with --engine-threads 2)")
    parser.add_argument("--one-at-a-time", type=int, default=3, help="generate calls of one request")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many baseline runs")
    parser.add_argument("--out-dir", default="bench-out")
    args = parser.parse_args()

    report = asyncio.run(serve_load(args))
    fixed_1, fixed_n = report["fixed"]["c1"], report["fixed"][f"c{args.static_batch}"]
    if args.baseline_source:
        # The baselines run on the prompt length the server actually saw (chat template included).
        prompt_len = round(fixed_1["prompt_tokens_mean"] or args.prompt_len)
        output_len = round(fixed_1["output_tokens_mean"] or args.output_len)
        base = report["baselines"] = run_baselines(args, prompt_len, output_len)
        report["ratios"] = {
            "served_cN_over_generate_static_batch": round(
                fixed_n["output_tokens_per_s"] / base["generate_static_batch_tok_s"], 3),
            "served_cN_over_generate_one_at_a_time": round(
                fixed_n["output_tokens_per_s"] / base["generate_one_at_a_time_tok_s"], 3),
            "serving_path_added_tpot_ms": round(fixed_1["tpot_ms"]["p50"] - base["engine_c1_tpot_ms"], 3),
            "serving_path_added_ttft_ms": round(fixed_1["ttft_ms"]["p50"] - base["engine_c1_ttft_ms"], 3),
        }
    report["environment"] = {"python": platform.python_version(), "platform": platform.platform()}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serving.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "bench_serving.png")
    print(f"\nfixed c=1: TTFT p50 {fixed_1['ttft_ms']['p50']} ms, TPOT p50 {fixed_1['tpot_ms']['p50']} ms")
    print(f"fixed c={args.static_batch}: {fixed_n['output_tokens_per_s']} output tok/s, "
          f"{fixed_n['failures']} failures")
    for name, value in report.get("ratios", {}).items():
        print(f"{name}: {value}")
    print(f"wrote {out / 'bench_serving.json'} and {out / 'bench_serving.png'}")


if __name__ == "__main__":
    main()
