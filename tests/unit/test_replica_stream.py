"""The replica's stream without Ray: the first token is sent at once, later ones coalesce by interval."""

from __future__ import annotations

import asyncio

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.engine import build_engine
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import EngineRequest
from serve_app.replica import EngineLoop


def _batches(tiny_checkpoint, stream_interval_s: float) -> list[list]:
    engine = build_engine(
        ModelConfig(source=str(tiny_checkpoint), served_model_id="tiny", dtype="float32", max_model_len=512),
        EngineConfig(device="cpu", kv_cache_bytes=16 * 2**20))
    loop = EngineLoop(engine, heartbeat_interval_s=1.0, stream_interval_s=stream_interval_s)
    request = EngineRequest("r", [1, 15043, 29991], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))

    async def consume() -> list[list]:
        return [batch async for batch in loop.generate(request)]

    try:
        return asyncio.run(consume())
    finally:
        loop.stop()


def test_first_token_alone_then_tokens_coalesced_per_interval(tiny_checkpoint):
    batches = _batches(tiny_checkpoint, stream_interval_s=0.2)
    assert len(batches[0]) == 1  # time to first token pays no coalescing delay
    assert sum(len(batch) for batch in batches) == 20 and batches[-1][-1].finished
    assert len(batches) <= 11  # 19 later tokens in 0.2 s windows: at least two tokens a message
