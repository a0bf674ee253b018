"""What the ingress's drain gate (`serve_app/ingress/drain.py`) adds to each request: a trivial POST route
called in-process over ASGI, bare and behind the gate, in alternating rounds (median µs per request).

    python scripts/bench_drain_gate.py --requests 2000 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve_app.ingress.drain import DrainGate, DrainState

SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "", "headers": [],
         "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("bench", 80)}


async def _ok(request):
    return JSONResponse({"ok": 1})


async def _receive():
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message):
    pass


async def _per_request_us(app, requests: int) -> float:
    start = time.perf_counter()
    for _ in range(requests):
        await app(dict(SCOPE), _receive, _send)
    return (time.perf_counter() - start) / requests * 1e6


async def _main(requests: int, rounds: int) -> None:
    bare = Starlette(routes=[Route("/v1/chat/completions", _ok, methods=["POST"])])
    gated = DrainGate(bare, DrainState())
    results: dict[str, list[float]] = {"bare": [], "gated": []}
    for _ in range(rounds):
        results["bare"].append(await _per_request_us(bare, requests))
        results["gated"].append(await _per_request_us(gated, requests))
    for name, values in results.items():
        print(f"{name}: median {statistics.median(values):.1f} µs/request, rounds {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(_main(args.requests, args.rounds))
