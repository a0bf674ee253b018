"""How much Python work on the replica's event loop slows the engine beside it, on a thread or in its own
process (no Ray).

The served replica's event loop (Serve's request handling, serialization, our stream code) runs Python for
every message it sends. With the engine on a thread of the same process, both need the GIL. This streams one
greedy request through `EngineClient`, spins the event-loop thread for `--work-us` after each message, and
reports the engine's time per output token for each amount of work and each engine host.

    python scripts/bench_loop_contention.py --work-us 0 300 600 --hosts thread process --streams 32
    python scripts/bench_loop_contention.py --device cuda --streams 64   # on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time

from serve_app.config import TINY_MODEL_SOURCE, EngineConfig, ModelConfig
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest
from serve_app.replica.engine_client import EngineClient
from serve_app.replica.process_host import EngineProcess
from serve_app.replica.thread_host import EngineThread

UNIQUE = itertools.count(2000)  # a token that makes each prompt differ from every earlier one


def hold_the_gil(microseconds: float) -> None:
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


async def time_per_token(client: EngineClient, prompt: list[int], output_len: int, work_us: float,
                         repeats: int) -> tuple[float, float]:
    """Median time to first token and time per later token, in ms."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    ttfts, tpots = [], []
    for index in range(repeats + 1):
        # A prompt of its own each time, so the prefix cache cannot skip the prefill being timed.
        request = EngineRequest(ChoiceId(f"w{work_us}-{index}", 0), [1, next(UNIQUE)] + prompt[2:], params)
        start, first, received = time.perf_counter(), None, 0
        async for batch in client.generate([request]):
            received += len(batch)
            if first is None:
                first = time.perf_counter()
            hold_the_gil(work_us)
        if index:  # the first run warms up
            ttfts.append((first - start) * 1000)
            tpots.append((time.perf_counter() - first) / (received - 1) * 1000)
    return statistics.median(ttfts), statistics.median(tpots)


async def throughput(client: EngineClient, prompt: list[int], output_len: int, streams: int, repeats: int) -> float:
    """Median output tokens/s of `streams` concurrent greedy requests."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)

    async def one() -> int:
        request = EngineRequest(ChoiceId(f"s{next(UNIQUE)}", 0), [1, next(UNIQUE)] + prompt[2:], params)
        return sum([len(batch) async for batch in client.generate([request])])

    rates = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one() for _ in range(streams))))
        if index:  # the first run warms up
            rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-us", type=float, nargs="+", default=[0, 300, 600])
    parser.add_argument("--hosts", nargs="+", choices=["thread", "process"], default=["thread", "process"],
                        help="where the engine runs: a thread of this process, or its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine (the replica's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the tiny model's step is then nearly all Python launching kernels, where "
                        "sharing the interpreter lock should cost the most")
    parser.add_argument("--prompt-len", type=int, default=110)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--streams", type=int, default=0,
                        help="also measure output tok/s with this many concurrent streams (no event-loop work)")
    args = parser.parse_args()

    model = ModelConfig(source=TINY_MODEL_SOURCE, served_model_id="bench", max_model_len=1024,
                        dtype="float32" if args.device == "cpu" else "float16")
    engine = EngineConfig(device=args.device, kv_cache_bytes=64 * 2**20, cpu_threads_per_rank=args.threads,
                          heartbeat_interval_s=1.0, max_num_seqs=max(32, args.streams), max_num_batched_tokens=512)
    prompt = [1] + list(range(1000, 1000 + args.prompt_len - 1))
    async def measure(host_kind: str) -> None:
        host = EngineProcess(model, engine, use_ray=False) if host_kind == "process" else EngineThread(model, engine)
        client = EngineClient(host)
        try:
            for work_us in args.work_us:
                ttft, tpot = await time_per_token(client, prompt, args.output_len, work_us, args.repeats)
                print(f"engine on a {host_kind:7s} | {work_us:4.0f} us of event-loop Python per message: "
                      f"first token {ttft:.2f} ms, {tpot:.3f} ms per later token", flush=True)
            if args.streams:
                rate = await throughput(client, prompt, args.output_len, args.streams, args.repeats)
                print(f"engine on a {host_kind:7s} | {args.streams} concurrent streams: {rate:.0f} output tok/s",
                      flush=True)
        finally:
            client.stop()

    for host_kind in args.hosts:
        asyncio.run(measure(host_kind))


if __name__ == "__main__":
    main()
