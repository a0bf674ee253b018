"""Autoscaling demo on CPU: the replica-group count goes 1 -> 2 under load and back to 1 after it, no failures.

Starts its own local Ray cluster (`--num-cpus` logical CPUs, so two tp=1 replica groups fit on a small
machine; torn down at exit), deploys `configs/tiny.yaml` at tensor_parallel_size=1 with the config's own
autoscaling settings (`EngineLoadPolicy` on the replica group), then sends a bounded load — `--concurrency`
streaming requests at a time for `--load-s` seconds, to 127.0.0.1 only — and keeps watching until the group
count is back at its minimum. Every second it records the running/starting/stopping replica groups, the
policy's view and the client's streams; writes the timeline as JSON and a PNG.

    python scripts/autoscale_demo.py --out docs/img/autoscaling.png

The replica reports its engine load to the policy through `LlamaReplica.record_autoscaling_stats`;
`--requests-only` drops the custom policy, so Serve scales on ongoing requests (at the config's
`target_ongoing_requests`) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
APP = "llama"


def deployment_replicas(serve) -> dict[str, int]:
    """Replica counts by state (RUNNING, STARTING, STOPPING, ...) of the replica-group deployment."""
    try:
        status = serve.status().applications[APP].deployments["LlamaReplica"]
    except (KeyError, AttributeError):
        return {}
    return {str(getattr(state, "value", state)): count for state, count in status.replica_states.items()}


class Watcher(threading.Thread):
    """Samples the deployment once a second into `timeline`."""

    def __init__(self, serve, load: dict, started: float):
        super().__init__(daemon=True)
        self.serve, self.load, self.started = serve, load, started
        self.timeline: list[dict] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            states = deployment_replicas(self.serve)
            self.timeline.append({"t": round(time.monotonic() - self.started, 2), **states,
                                  "active_streams": self.load["active"], "completed": self.load["completed"],
                                  "failed": self.load["failed"], "tokens": self.load["tokens"]})
            self.stopped.wait(1.0)


async def stream_one(client: httpx.AsyncClient, model: str, max_tokens: int, load: dict, index: int,
                     prompt_words: int = 0) -> None:
    context = " ".join(["scaling"] * prompt_words)  # long prompts make the load KV-bound
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "stream_options": {"include_usage": True},
            "messages": [{"role": "user",
                          "content": f"Request {index}: {context} tell me a long story about scaling."}]}
    load["active"] += 1
    ok = False
    started = time.monotonic()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code == 200:
                first = True
                async for line in response.aiter_lines():
                    if first and line.startswith("data: {") and '"content"' in line:
                        load["ttft_s"].append(time.monotonic() - started)
                        first = False
                    if line == "data: [DONE]":
                        ok = True
                    elif line.startswith("data: {\"error\""):
                        load["errors"].append(line[:200])
                    elif '"usage":{' in line.replace(" ", ""):
                        load["tokens"] += json.loads(line[6:])["usage"]["completion_tokens"]
            else:
                load["errors"].append(f"HTTP {response.status_code}")
    except httpx.HTTPError as exc:
        load["errors"].append(f"{type(exc).__name__}: {exc}"[:200])
    finally:
        load["active"] -= 1
        load["completed" if ok else "failed"] += 1


async def bounded_load(port: int, model: str, concurrency: int, load_s: float, max_tokens: int,
                       load: dict, prompt_words: int = 0) -> None:
    deadline = time.monotonic() + load_s
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        counter = iter(range(10**9))

        async def worker() -> None:
            while time.monotonic() < deadline:
                await stream_one(client, model, max_tokens, load, next(counter), prompt_words)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def plot(timeline: list[dict], load_window: tuple[float, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [row["t"] for row in timeline]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.step(t, [row.get("RUNNING", 0) for row in timeline], where="post", label="running replica groups", lw=2)
    top.step(t, [row.get("STARTING", 0) for row in timeline], where="post", label="starting", ls="--")
    top.step(t, [row.get("STOPPING", 0) for row in timeline], where="post", label="stopping (draining)", ls=":")
    top.set(ylabel="replica groups", title=title, ylim=(-0.1, 2.6), yticks=[0, 1, 2])
    bottom.plot(t, [row["active_streams"] for row in timeline], label="open streams (client)")
    # Tokens are counted when a request completes, so the rate is taken over a 10 s window to smooth it.
    tokens = [row["tokens"] for row in timeline]
    window = 10
    rate = [(tokens[i] - tokens[max(0, i - window)]) / max(1e-6, t[i] - t[max(0, i - window)])
            for i in range(len(t))]
    bottom.plot(t, rate, label="output tokens/s (completed requests, 10 s window)", alpha=0.8)
    bottom.set(xlabel="seconds since start of load", ylabel="streams / tokens per s")
    for ax in (top, bottom):
        ax.axvspan(*load_window, color="orange", alpha=0.12, label="load on")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8231)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the demo's own Ray cluster")
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--load-s", type=float, default=90.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=0,
                        help="words of filler in each prompt: long prompts make the load KV-bound")
    parser.add_argument("--settle-timeout-s", type=float, default=240.0,
                        help="after the load, wait at most this long for the count to return to the minimum")
    parser.add_argument("--requests-only", action="store_true",
                        help="scale on ongoing requests (Serve's default policy) instead of the engine's load")
    parser.add_argument("--out", default="docs/img/autoscaling.png")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from its saved JSON")
    args = parser.parse_args()
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    if args.replot:
        saved = json.loads(out.with_suffix(".json").read_text())
        summary = saved["summary"]
        plot(saved["timeline"], (0.0, summary["load_end_s"]), out,
             f"tiny tp=1 on CPU, {summary['concurrency']} streams for {summary['load_s']:.0f} s "
             f"({summary['policy']} policy)")
        return

    import ray
    from ray import serve

    import serve_app.app

    (application,) = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["applications"]
    app_args = copy.deepcopy(application["args"])
    app_args["model"]["tensor_parallel_size"] = 1
    if args.requests_only:
        app_args["deployments"]["replica"]["autoscaling_config"].pop("policy")

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(serve_app.app.build_app(app_args), name=APP, route_prefix="/", blocking=False)
        deadline = time.monotonic() + 300
        while httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the app did not become healthy"
            time.sleep(1)
        print("app healthy; replica groups:", deployment_replicas(serve), flush=True)

        load = {"active": 0, "completed": 0, "failed": 0, "tokens": 0, "errors": [], "ttft_s": []}
        started = time.monotonic()
        watcher = Watcher(serve, load, started)
        watcher.start()
        asyncio.run(bounded_load(args.port, app_args["model"]["served_model_id"], args.concurrency, args.load_s,
                                 args.max_tokens, load, args.prompt_words))
        load_end = time.monotonic() - started
        print(f"load stopped after {load_end:.0f} s: {load['completed']} completed, {load['failed']} failed",
              flush=True)
        settle = time.monotonic() + args.settle_timeout_s
        while time.monotonic() < settle:
            states = deployment_replicas(serve)
            if states.get("RUNNING") == 1 and len([s for s, n in states.items() if n]) == 1:
                break
            time.sleep(1)
        time.sleep(3)
        watcher.stopped.set()
        watcher.join()
    finally:
        serve.shutdown()
        ray.shutdown()

    timeline = watcher.timeline
    peak = max(row.get("RUNNING", 0) for row in timeline)
    final = timeline[-1].get("RUNNING", 0)
    up = next((row["t"] for row in timeline if row.get("RUNNING", 0) >= 2), None)
    down = next((row["t"] for row in timeline if row["t"] > load_end and row.get("RUNNING", 0) == 1
                 and not row.get("STOPPING")), None)
    summary = {"policy": "requests" if args.requests_only else "engine", "concurrency": args.concurrency,
               "load_s": args.load_s, "max_tokens": args.max_tokens, "load_end_s": round(load_end, 1),
               "peak_running_groups": peak, "final_running_groups": final, "second_group_running_at_s": up,
               "back_to_one_at_s": down, "completed": load["completed"], "failed": load["failed"],
               "output_tokens": load["tokens"], "output_tokens_per_s": round(load["tokens"] / load_end, 1),
               "prompt_words": args.prompt_words, "ttft_ms": ttft_percentiles(load["ttft_s"]),
               "errors": load["errors"][:5]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "timeline": timeline}, indent=1))
    plot(timeline, (0.0, load_end), out,
         f"tiny tp=1 on CPU, {args.concurrency} streams for {args.load_s:.0f} s ({summary['policy']} policy)")
    print(json.dumps(summary, indent=2))
    if peak < 2 or final != 1 or load["failed"]:
        raise SystemExit("autoscaling demo did not go 1 -> 2 -> 1 without failures")


def ttft_percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {}
    return {f"p{q}": round(1000 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 1)
            for q in (50, 90, 99)}


if __name__ == "__main__":
    main()
