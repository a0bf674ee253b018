"""Soak test: N concurrent chat streams for M minutes against a running service, then what went wrong and
what grew.

Each of `--streams` clients opens a stream, reads it to the end (or, with `--abandon-every k`, walks away
after its first chunk every k-th request, as impatient clients do), and opens the next, until `--minutes`
have passed. Output lengths are drawn from `--min-tokens`..`--max-tokens` (EOS suppressed, so the engine
really generates them). Reported at the end, and as JSON with `--out`:

- requests by outcome: `ok`, `abandoned`, and failures by kind (`http_<status>_<code>`, `sse_error_<code>`,
  `connect`, `read_timeout`, `protocol`, `bad_sse_event`: a data line that is not JSON): a healthy run has no failures but `http_429_overloaded` when the
  streams exceed what the engine admits (a refused client waits its Retry-After, as the openai client does);
- TTFT, time per output token (TPOT, from first to last chunk over the tokens after the first) and the
  longest gap between two chunks of one stream, p50 / p99 / max;
- resident memory (RSS) of every process kind of the serving path (ingress, stage, replica, engine, HAProxy,
  controller, Ray daemons; as `bench_serving_cpu.py` names them) at the start, after a warm-up minute and at
  the end: steady growth after the warm-up is a leak.

    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5 serve run configs/tiny.yaml &
    python scripts/soak.py --streams 100 --minutes 10 --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx
from bench_serving_cpu import kind_of

PAGE_KIB = 4


def rss_by_kind(app: str) -> dict[str, dict[str, float]]:
    """MiB resident in the processes of each kind on this machine, and how many there are (a replica that
    autoscaling added is not a leak)."""
    totals: dict[str, dict[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            resident_pages = int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kind = kind_of(cmdline, app)
        if kind is not None:
            total = totals.setdefault(kind, {"processes": 0, "mib": 0.0})
            total["processes"] += 1
            total["mib"] = round(total["mib"] + resident_pages * PAGE_KIB / 1024, 1)
    return dict(sorted(totals.items()))


class Soak:
    def __init__(self, args: argparse.Namespace, model: str):
        self.args, self.model = args, model
        self.outcomes: Counter[str] = Counter()
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self.max_gap: list[float] = []
        self.tokens = 0
        self.rng = random.Random(args.seed)

    async def client_loop(self, client: httpx.AsyncClient, index: int, until: float) -> None:
        request = 0
        while time.monotonic() < until:
            request += 1
            abandon = self.args.abandon_every > 0 and (index + request) % self.args.abandon_every == 0
            outcome, retry_after = await self.one(client, abandon)
            self.outcomes[outcome] += 1
            if retry_after is not None:  # as the openai client does: wait as told, then try again
                await asyncio.sleep(retry_after)

    async def one(self, client: httpx.AsyncClient, abandon: bool) -> tuple[str, float | None]:
        max_tokens = self.rng.randint(self.args.min_tokens, self.args.max_tokens)
        body = {"model": self.model, "max_tokens": max_tokens, "stream": True,
                "messages": [{"role": "user", "content": f"Tell me about the number {self.rng.randint(0, 10**6)}."}],
                "logit_bias": {"2": -100}, "stream_options": {"include_usage": True}}
        started = time.monotonic()
        chunk_times: list[float] = []
        completion_tokens = 0
        try:
            async with client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    try:
                        code = response.json()["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        code = "not_openai_shaped"
                    retry_after = response.headers.get("retry-after")
                    return f"http_{response.status_code}_{code}", float(retry_after) if retry_after else 1.0
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    try:
                        event = json.loads(line[len("data: "):])
                    except json.JSONDecodeError:
                        return "bad_sse_event", 1.0
                    if "error" in event:
                        return f"sse_error_{event['error'].get('code')}", 1.0
                    if event.get("choices"):
                        chunk_times.append(time.monotonic())
                        if abandon:
                            return "abandoned", None
                    if event.get("usage"):
                        completion_tokens = event["usage"]["completion_tokens"]
        except httpx.ConnectError:
            return "connect", 1.0
        except httpx.ReadTimeout:
            return "read_timeout", 1.0
        except (httpx.RemoteProtocolError, httpx.ReadError):
            return "protocol", 1.0
        if not chunk_times:
            return "no_chunks", 1.0
        self.tokens += completion_tokens
        self.ttft.append(chunk_times[0] - started)
        if completion_tokens > 1:
            self.tpot.append((chunk_times[-1] - chunk_times[0]) / (completion_tokens - 1))
        gaps = [later - earlier for earlier, later in itertools.pairwise(chunk_times)]
        self.max_gap.append(max(gaps, default=0.0))
        return "ok", None


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"p50_ms": round(statistics.median(ordered) * 1000, 1), "p99_ms": round(at(0.99) * 1000, 1),
            "max_ms": round(ordered[-1] * 1000, 1)}


async def main(args: argparse.Namespace) -> dict:
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/") + "/v1", timeout=httpx.Timeout(300, connect=30),
                                 limits=httpx.Limits(max_connections=args.streams + 8),
                                 headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}) as client:
        model = (await client.get("/models")).json()["data"][0]["id"]
        soak = Soak(args, model)
        memory = {"start": rss_by_kind(args.app)}
        started = time.monotonic()
        until = started + args.minutes * 60

        async def sample_memory() -> None:
            await asyncio.sleep(min(60.0, args.minutes * 30))
            memory["after_warmup"] = rss_by_kind(args.app)

        sampler = asyncio.create_task(sample_memory())
        await asyncio.gather(*(soak.client_loop(client, index, until) for index in range(args.streams)))
        sampler.cancel()
        elapsed = time.monotonic() - started
        memory["end"] = rss_by_kind(args.app)
    failures = {kind: count for kind, count in soak.outcomes.items() if kind not in ("ok", "abandoned")}
    return {"streams": args.streams, "minutes": args.minutes, "elapsed_s": round(elapsed, 1),
            "requests": dict(soak.outcomes), "failures": failures,
            "output_tokens_per_s": round(soak.tokens / elapsed, 1),
            "ttft": percentiles(soak.ttft), "tpot": percentiles(soak.tpot), "longest_chunk_gap": percentiles(soak.max_gap),
            "rss_mib": memory}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--app", default="llama", help="the Serve application's name (its replicas' process names)")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--abandon-every", type=int, default=10, help="every k-th request walks away after its "
                        "first chunk (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args()
    result = asyncio.run(main(arguments))
    print(json.dumps(result, indent=2))
    if arguments.out:
        arguments.out.write_text(json.dumps(result, indent=2) + "\n")
