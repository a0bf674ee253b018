"""Multi-turn conversations against several replica groups, with the cache-affine router and with Serve's
default one, in the same run.

The reference API's own pattern: every turn resends the whole history. `--conversations` conversations of
`--turns` turns each share one system prompt; user turns and answers have ShareGPT-like (log-normal) lengths;
each conversation sends its next turn a short think time after the last answer. The script deploys the
application from `--config` (default `configs/tiny.yaml`) with exactly `--groups` replica groups, runs the
same seeded workload once per routing policy (each on fresh groups, so every run starts with cold caches),
and reports for turns 2 and later:

* **reuse**: of the tokens a turn can always find cached (the last turn's prompt, in whole blocks: whole-turn
  reuse, `docs/engine.md`), the share its `usage.prompt_tokens_details.cached_tokens` says it found; and
  cached tokens as a share of all prompt tokens (which also counts the answer's tokens where they survive
  the round trip through text, and the shared system prompt);
* **TTFT** p50 / p90 (streamed, to the first content chunk), and the routed-to-default ratio; and the p50
  split between turns that found all they could reuse and those that missed it, with the tokens each had
  left to prefill (what a miss costs), and TTFT p50 by tokens left to prefill (what every turn waits
  anyway).

    python scripts/bench_multiturn.py --max-model-len 4096  # tiny model, 2 groups at tp=1, on this machine
    python scripts/bench_multiturn.py --config configs/llama2-7b-chat.yaml --tensor-parallel-size 1 \\
        --groups 2 --user-median 120 --answer-median 200    # on a GPU node: any config, any tp
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import random
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_serving import text_of

POLICIES = ("cache_affinity", "power_of_two")


@dataclass
class Turn:
    conversation: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reusable_tokens: int
    ttft_s: float


@dataclass
class Conversation:
    user_turns: list[str]
    answer_lengths: list[int]


def workload(args: argparse.Namespace) -> tuple[str, list[Conversation]]:
    rng = random.Random(args.seed)
    system = "You are a helpful assistant. " + text_of(args.system_tokens, rng)

    def lognormal(median: int, sigma: float, cap: int) -> int:
        return int(min(max(rng.lognormvariate(math.log(median), sigma), 4), cap))

    conversations = [Conversation([text_of(lognormal(args.user_median, 1.0, 4 * args.user_median), rng)
                                   for _ in range(args.turns)],
                                  [lognormal(args.answer_median, 0.8, 3 * args.answer_median)
                                   for _ in range(args.turns)])
                     for _ in range(args.conversations)]
    return system, conversations


async def run_conversation(client: httpx.AsyncClient, model: str, index: int, system: str,
                           conversation: Conversation, max_model_len: int, block_size: int, think_s: float,
                           rng: random.Random) -> list[Turn]:
    await asyncio.sleep(rng.uniform(0, 2 * think_s))  # staggered starts, not one wave
    messages = [{"role": "system", "content": system}]
    turns: list[Turn] = []
    last_total = last_prompt = 0  # the last turn's prompt plus answer, and its prompt, in tokens
    for k, (user, answer_len) in enumerate(zip(conversation.user_turns, conversation.answer_lengths)):
        if last_total + 2 * len(user) // 5 + answer_len + 64 > max_model_len:
            break  # the next turn would not fit the context
        messages.append({"role": "user", "content": user})
        body = {"model": model, "messages": messages, "max_tokens": answer_len, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        started, ttft, text, usage = time.perf_counter(), None, [], None
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"turn {k} of conversation {index}: HTTP {response.status_code} "
                                   f"{(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"turn {k} of conversation {index}: {event['error']}")
                for choice in event.get("choices", []):
                    if choice["delta"].get("content"):
                        ttft = ttft if ttft is not None else time.perf_counter() - started
                        text.append(choice["delta"]["content"])
                usage = event.get("usage") or usage
        prompt = usage["prompt_tokens"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        # What the conversation's group always has for this turn: the last turn's prompt, in whole blocks.
        reusable = last_prompt // block_size * block_size if k else 0
        turns.append(Turn(index, k, prompt, cached, usage["completion_tokens"], max(reusable, 0),
                          ttft if ttft is not None else time.perf_counter() - started))
        last_total, last_prompt = prompt + usage["completion_tokens"], prompt
        messages.append({"role": "assistant", "content": "".join(text)})
        await asyncio.sleep(rng.uniform(0, 2 * think_s))
    return turns


def summarize(turns: list[Turn]) -> dict:
    later = [t for t in turns if t.turn >= 1]
    ttfts = sorted(t.ttft_s for t in later)
    reusable = sum(t.reusable_tokens for t in later)
    return {
        "turns": len(turns),
        "later_turns": len(later),
        "reuse_share": sum(min(t.cached_tokens, t.reusable_tokens) for t in later) / reusable if reusable else 0,
        "cached_share_of_prompt": sum(t.cached_tokens for t in later) / sum(t.prompt_tokens for t in later),
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p90_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "first_turn_ttft_p50_ms": 1000 * statistics.median(t.ttft_s for t in turns if t.turn == 0),
        # Where the p50 comes from: turns that found all they could reuse against those that did not, with
        # what each had left to prefill.
        **_split("found", [t for t in later if t.cached_tokens >= t.reusable_tokens]),
        **_split("missed", [t for t in later if t.cached_tokens < t.reusable_tokens]),
        # What a turn waits whatever it finds: TTFT p50 (and the turns) by tokens left to prefill.
        "ttft_p50_ms_by_tokens_to_prefill": {
            label: _p50_ms(bucket)
            for label, low, high in PREFILL_BUCKETS
            if (bucket := [t for t in later if low <= t.prompt_tokens - t.cached_tokens < high])},
    }


PREFILL_BUCKETS = (("0-99", 0, 100), ("100-199", 100, 200), ("200-399", 200, 400), ("400-799", 400, 800),
                   ("800+", 800, 1 << 30))


def _p50_ms(turns: list[Turn]) -> dict[str, float]:
    return {"turns": len(turns), "ttft_p50_ms": 1000 * statistics.median(t.ttft_s for t in turns)}


def _split(name: str, part: list[Turn]) -> dict[str, float | None]:
    """None where no turn is in `part` (strict JSON has no NaN)."""
    return {
        f"{name}_turns": len(part),
        f"{name}_ttft_p50_ms": 1000 * statistics.median(t.ttft_s for t in part) if part else None,
        f"{name}_uncached_tokens_p50": statistics.median(t.prompt_tokens - t.cached_tokens for t in part)
        if part else None,
    }


def _or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def application_args(args: argparse.Namespace, policy: str) -> dict:
    config = yaml.safe_load(Path(args.config).read_text())
    app_args = copy.deepcopy(config["applications"][0]["args"])
    if args.tensor_parallel_size is not None:
        app_args["model"]["tensor_parallel_size"] = args.tensor_parallel_size
    if args.max_model_len is not None:
        app_args["model"]["max_model_len"] = args.max_model_len
    if args.kv_cache_mib and app_args["engine"].get("device") == "cpu":
        app_args["engine"]["kv_cache_bytes"] = args.kv_cache_mib << 20
    app_args["routing"] = {"policy": policy}
    deployments = app_args.setdefault("deployments", {})
    for name, count in (("replica", args.groups), ("stage", args.stage_replicas), ("ingress", 1)):
        options = {k: v for k, v in (deployments.get(name) or {}).items() if k != "autoscaling_config"}
        deployments[name] = {**options, "num_replicas": count}
    return app_args


async def drive(base_url: str, args: argparse.Namespace, model: str, max_model_len: int,
                block_size: int) -> list[Turn]:
    system, conversations = workload(args)
    rngs = [random.Random(args.seed * 1000 + i) for i in range(len(conversations))]
    limits = httpx.Limits(max_connections=args.conversations + 8)
    async with httpx.AsyncClient(base_url=f"{base_url}/v1", timeout=600, limits=limits) as client:
        per_conversation = await asyncio.gather(*(
            run_conversation(client, model, i, system, c, max_model_len, block_size, args.think_s, rngs[i])
            for i, c in enumerate(conversations)))
    return [turn for turns in per_conversation for turn in turns]


def wait_for_groups(base_url: str, groups: int, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{base_url}/health", timeout=10)
            if health.status_code == 200 and health.json()["replica_groups"]["healthy"] == groups:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{groups} healthy replica groups did not come up in {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--stage-replicas", type=int, default=1)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=120)
    parser.add_argument("--user-median", type=int, default=60, help="median user-turn length, tokens")
    parser.add_argument("--answer-median", type=int, default=150, help="median answer length (max_tokens)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="override the config's context (the tiny model's positions reach 4096)")
    parser.add_argument("--think-s", type=float, default=2.0, help="mean pause before each turn")
    parser.add_argument("--kv-cache-mib", type=int, default=512,
                        help="KV cache per rank (CPU configs): room for every conversation's history, so that "
                        "what is measured is where turns go, not evictions; 0 keeps the config's")
    parser.add_argument("--rounds", type=int, default=1, help="policy pairs, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-address", default=None, help="a running cluster; default: start one here")
    parser.add_argument("--ray-cpus", type=float, default=None, help="logical CPUs of a local Ray")
    parser.add_argument("--out", default=None, help="write every turn and the summaries here (JSON)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import AppConfig

    ray.init(address=args.ray_address, num_cpus=args.ray_cpus if args.ray_address is None else None,
             include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base_url = f"http://127.0.0.1:{port}/multiturn"
    results: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    all_turns: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    try:
        for round_index in range(args.rounds):
            # Alternate which policy runs first, so the machine's drift over a run favours neither.
            for policy in POLICIES if round_index % 2 == 0 else POLICIES[::-1]:
                app_args = application_args(args, policy)
                config = AppConfig.model_validate(app_args)
                serve.run(build_app(app_args), name="multiturn", route_prefix="/multiturn", blocking=False)
                wait_for_groups(base_url, args.groups)
                turns = asyncio.run(drive(base_url, args, config.model.served_model_id, config.model.max_model_len,
                                          config.engine.block_size))
                summary = summarize(turns)
                results[policy].append(summary)
                all_turns[policy] += [asdict(t) | {"round": round_index} for t in turns]
                print(f"round {round_index + 1} {policy:>14}: reuse {summary['reuse_share']:.1%} of reusable, "
                      f"cached {summary['cached_share_of_prompt']:.1%} of prompt tokens, TTFT p50 "
                      f"{summary['ttft_p50_ms']:.1f} ms p90 {summary['ttft_p90_ms']:.1f} ms "
                      f"({summary['later_turns']} later turns; {summary['found_turns']} found their history: TTFT "
                      f"p50 {_or_dash(summary['found_ttft_p50_ms'], '.1f')} ms, "
                      f"{_or_dash(summary['found_uncached_tokens_p50'], '.0f')} tokens to prefill; "
                      f"{summary['missed_turns']} missed it: {_or_dash(summary['missed_ttft_p50_ms'], '.1f')} ms, "
                      f"{_or_dash(summary['missed_uncached_tokens_p50'], '.0f')} tokens)", flush=True)
                print("  TTFT p50 by tokens to prefill: " + ", ".join(
                    f"{bucket}: {cell['ttft_p50_ms']:.0f} ms ({cell['turns']})"
                    for bucket, cell in summary["ttft_p50_ms_by_tokens_to_prefill"].items()), flush=True)
                serve.delete("multiturn")
    finally:
        serve.shutdown()
        ray.shutdown()
    for index in range(args.rounds):
        affine, default = results["cache_affinity"][index], results["power_of_two"][index]
        print(f"round {index + 1}: TTFT p50 of turns >= 2, cache_affinity / power_of_two = "
              f"{affine['ttft_p50_ms'] / default['ttft_p50_ms']:.2f}; p90 "
              f"{affine['ttft_p90_ms'] / default['ttft_p90_ms']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "summaries": results, "turns": all_turns},
                                             indent=1))


if __name__ == "__main__":
    main()
