"""CPU time the serving path spends per streamed output token, process by process, read from /proc.

Against a running service on this machine (`serve run configs/tiny.yaml`): for each `--streams` count, run
that many concurrent streaming chat requests (exactly `--output-len` tokens each: EOS is suppressed), read
every process's user + system CPU time (`/proc/<pid>/stat`) before and after, and divide each process
kind's CPU by the output tokens the server reported (`usage`). It also counts the SSE chunks that
carry content: tokens per chunk times CPU per token is about a process's CPU per message (a message
whose tokens decode to no text yet, and the last one with the usage, are not counted). CPU time, not
wall time: it does not move when other work shares the cores, so two builds compare on a busy machine.

Every Ray process also burns CPU while idle (its core worker wakes every 10 ms; Serve's metrics and control
loops), about 12-20 ms/s each here, whatever the load. First, `--idle-s` seconds without requests measure that
per process kind; `serving_path_above_idle` is the serving path's CPU per token less it: the part that grows
with traffic, and all that remains per token once a GPU streams thousands of tokens a second.

Process kinds, by command line: the ingress, stage and replica actors (`ray::ServeReplica:<app>:<name>`),
the Serve controller, HAProxy and the proxy actor — the serving path, summed as `serving_path` — and, apart
from it, the engine (its process, `llama_serve::engine`, and follower ranks, `ray::RankActor`) and Ray's own
daemons (raylet, GCS, dashboard, agents).

    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5 serve run configs/tiny.yaml &
    python scripts/bench_serving_cpu.py --streams 1 32 --out cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import httpx

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVING_PATH = ("ingress", "stage", "replica", "controller", "haproxy", "proxy")


def kind_of(cmdline: str, app: str) -> str | None:
    if cmdline.startswith(f"ray::ServeReplica:{app}:Ingress"):
        return "ingress"
    if cmdline.startswith(f"ray::ServeReplica:{app}:ChatStage"):
        return "stage"
    if cmdline.startswith(f"ray::ServeReplica:{app}:LlamaReplica"):
        return "replica"
    if cmdline.startswith("ray::ServeController"):
        return "controller"
    if "haproxy" in cmdline.split(" ", 1)[0]:
        return "haproxy"
    if cmdline.startswith(("ray::ProxyActor", "ray::HAProxyManager")):
        return "proxy"
    if cmdline.startswith(("llama_serve::engine", "ray::RankActor")):
        return "engine"
    if any(name in cmdline for name in ("raylet", "gcs_server", "dashboard", "agent", "log_monitor", "monitor.py")):
        return "ray_daemons"
    return None


def cpu_by_kind(app: str) -> dict[str, float]:
    """CPU seconds used so far by every process of each kind on this machine."""
    totals: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = kind_of(cmdline, app)
        if kind is not None:
            totals[kind] = totals.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return totals


async def one_stream(client: httpx.AsyncClient, model: str, prompt: str, output_len: int) -> tuple[int, int]:
    """(output tokens, SSE chunks that carried content) of one streamed request."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": output_len,
            "temperature": 0, "logit_bias": {"2": -100}, "stream": True, "stream_options": {"include_usage": True}}
    tokens = chunks = 0
    async with client.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                usage = chunk.get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
                if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", ())):
                    chunks += 1
    return tokens, chunks


async def load(base_url: str, model: str, streams: int, requests_per_stream: int, output_len: int
               ) -> tuple[int, int]:
    """(output tokens, content chunks) over every request."""
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        async def stream_worker(worker: int) -> tuple[int, int]:
            tokens = chunks = 0
            for index in range(requests_per_stream):
                prompt = f"Request {worker}-{index}: tell me about the rivers and mountains of Europe."
                done = await one_stream(client, model, prompt, output_len)
                tokens, chunks = tokens + done[0], chunks + done[1]
            return tokens, chunks

        counts = await asyncio.gather(*(stream_worker(w) for w in range(streams)))
        return sum(tokens for tokens, _ in counts), sum(chunks for _, chunks in counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--app", default="llama", help="the Serve application's name (configs: llama)")
    parser.add_argument("--model", default="tiny-llama-2-chat")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle CPU measured over this long first")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()

    asyncio.run(load(args.base_url, args.model, 2, 1, 8))  # warm-up
    before = cpu_by_kind(args.app)
    time.sleep(args.idle_s)
    after = cpu_by_kind(args.app)
    idle_per_s = {kind: (after.get(kind, 0.0) - before.get(kind, 0.0)) / args.idle_s for kind in after}
    print("idle CPU ms/s: " + ", ".join(f"{kind} {value * 1e3:.1f}" for kind, value in sorted(idle_per_s.items())))
    results = {"idle_cpu_ms_per_s": {kind: round(value * 1e3, 2) for kind, value in sorted(idle_per_s.items())}}
    for streams in args.streams:
        before, started = cpu_by_kind(args.app), time.monotonic()
        tokens, chunks = asyncio.run(load(args.base_url, args.model, streams, args.requests_per_stream,
                                          args.output_len))
        after, elapsed = cpu_by_kind(args.app), time.monotonic() - started
        per_token = {kind: (after.get(kind, 0.0) - before.get(kind, 0.0)) / tokens * 1e6 for kind in after}
        per_token["serving_path"] = sum(per_token.get(kind, 0.0) for kind in SERVING_PATH)
        idle_per_token = sum(idle_per_s.get(kind, 0.0) for kind in SERVING_PATH) * elapsed / tokens * 1e6
        per_token["serving_path_above_idle"] = per_token["serving_path"] - idle_per_token
        results[f"streams_{streams}"] = {"output_tokens": tokens, "wall_s": round(elapsed, 2),
                                         "tok_s": round(tokens / elapsed, 1),
                                         "tokens_per_chunk": round(tokens / max(chunks, 1), 2),
                                         "cpu_us_per_token": {k: round(v, 1) for k, v in sorted(per_token.items())}}
        shown = ", ".join(f"{kind} {value:.0f}" for kind, value in sorted(per_token.items()))
        print(f"{streams:>3} streams: {tokens} tokens in {elapsed:.1f} s ({tokens / elapsed:.0f} tok/s); "
              f"{tokens / max(chunks, 1):.1f} tokens per SSE chunk; CPU us per output token: {shown}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
