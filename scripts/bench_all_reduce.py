"""Latency of one all-reduce between two CPU ranks on this machine: gloo (TCP) against DeepSpeed's shared-memory
all-reduce, for the tensors a decode step sums (one row of hidden state, and a row of vocabulary logits).

The engine's CPU ranks sum o_proj's, down_proj's and the lm_head's partial products every step, twice per
layer; what one such call costs bounds a small batch's step time.

    python scripts/bench_all_reduce.py
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def timed(call, repeats: int) -> dict[str, float]:
    for _ in range(min(100, repeats)):
        call()
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        call()
    return {"wall_us": (time.perf_counter() - wall) / repeats * 1e6,
            "cpu_us": (time.process_time() - cpu) / repeats * 1e6}


def rank_main(rank: int, address, listener, sizes: list[int], repeats: int, results) -> None:
    from serve_app.config import EngineConfig
    from serve_app.parallel.group import join_process_group

    os.environ["DS_ACCELERATOR"] = "cpu"
    if rank != 0:
        listener.close()  # every rank was given a copy; rank 0's store serves on it
        listener = None
    join_process_group(address, rank, EngineConfig(device="cpu", kv_cache_bytes=1, cpu_threads_per_rank=1),
                       device_index=rank, listener=listener)
    figures = {}
    for size in sizes:
        tensor = torch.randn(1, size)
        figures[f"gloo_{size}"] = timed(lambda tensor=tensor: dist.all_reduce(tensor), repeats)
    # The project's own path: sharding.py decides and sets DeepSpeed up as the engine does.
    from serve_app.parallel import sharding

    sharding._join_deepspeed("cpu", 2)
    import deepspeed.comm

    figures["path"] = sharding.all_reduce_path()
    for size in sizes:
        tensor = torch.full((1, size), float(rank + 1))
        deepspeed.comm.inference_all_reduce(tensor)
        assert torch.all(tensor == 3.0), "the shared-memory sum is wrong"
        figures[f"deepspeed_{size}"] = timed(lambda tensor=tensor: deepspeed.comm.inference_all_reduce(tensor),
                                             repeats)
    if rank == 0:
        results.update(figures)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 4096, 32000],
                        help="floats per all-reduce (256: the tiny model's hidden row; 32000: a logits row)")
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--out")
    args = parser.parse_args()
    from serve_app.parallel.group import reserve_address

    address, listener = reserve_address(2)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(address, listener, args.sizes, args.repeats, results), nprocs=2)
        figures = dict(results)
    print(json.dumps(figures, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
