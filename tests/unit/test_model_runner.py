"""The model runner's start: before any request it runs the largest steps the scheduler can make, an engine
that cannot run them refuses to start naming the settings to change, and on a GPU the KV budget leaves room
for their measured peak."""

from __future__ import annotations

import logging
import random
import weakref

import pytest
import torch

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine import model_runner
from serve_app.engine.engine import start_engine
from serve_app.engine.model_runner import ModelRunner, StepInput, largest_steps
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest
from serve_app.engine.worker import load_rank_model
from serve_app.layers.attention import group_decode_rows
from serve_app.models import llama


def _shape(step: StepInput) -> dict[str, int]:
    """What a step's memory grows with: its tokens, rows, decode rows and their gather, its chunks."""
    query_lens = [stop - start for start, stop in zip(step.query_starts, step.query_starts[1:])]
    contexts = step.context_lens
    decode = [context for query_len, context in zip(query_lens, contexts, strict=True)
              if query_len == 1 and context > 1]
    chunks = [query_len for query_len, context in zip(query_lens, contexts, strict=True)
              if query_len < context and query_len > 1]  # prefill chunks that read cached context
    return {"tokens": sum(query_lens), "rows": len(query_lens), "decode_rows": len(decode),
            "decode_gather": len(decode) * max(decode, default=0), "cache_read_chunk": max(chunks, default=0),
            "context": max(contexts)}


def _bounds(steps: list[StepInput]) -> dict[str, int]:
    shapes = [_shape(step) for step in steps]
    return {key: max(shape[key] for shape in shapes) for key in shapes[0]}


@pytest.mark.parametrize(("budget", "max_num_seqs", "max_model_len"), [
    (512, 32, 1024),  # the CPU default
    (2048, 64, 4096),  # the GPU configs
    (8192, 4, 1024),  # a budget larger than the context: several full chunks
    (16, 64, 4096),  # fewer tokens than sequences
])
def test_the_warm_up_steps_reach_every_limit(budget, max_num_seqs, max_model_len):
    steps = largest_steps(budget, max_num_seqs, max_model_len, block_size=16)
    bounds = _bounds(steps)
    rows = min(max_num_seqs, budget)
    assert bounds == {"tokens": min(budget, rows * max_model_len), "rows": rows, "decode_rows": rows,
                      "decode_gather": rows * max_model_len, "cache_read_chunk": min(budget, max_model_len - 1)
                      if min(budget, max_model_len - 1) > 1 else 0, "context": max_model_len}
    for step in steps:  # valid input: each row samples its last token, slots inside the shared blocks
        assert step.sample_rows == [start - 1 for start in step.query_starts[1:]]
        assert max(step.slots) < len(step.block_tables[0]) * 16 and max(step.positions) == max_model_len - 1


def test_no_step_the_scheduler_makes_is_larger_than_the_warm_up(tiny_checkpoint, monkeypatch):
    """Drive the real engine through a mixed load that fills its limits (long prompts chunked beside decodes,
    a full batch, sequences running to the context's end) and compare every step it runs with the warm-up's."""
    max_model_len, max_num_seqs, budget = 128, 6, 48
    model = ModelConfig(source=str(tiny_checkpoint), served_model_id="tiny", dtype="float32",
                        max_model_len=max_model_len)
    engine_config = EngineConfig(device="cpu", kv_cache_bytes=8 * 2**20, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=budget)
    engine = start_engine(model, engine_config)
    seen: list[dict[str, int]] = []
    execute = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda step: seen.append(_shape(step)) or execute(step))
    generator = random.Random(7)
    try:
        for index in range(24):
            prompt_len = generator.randint(2, max_model_len - 2)
            prompt = [generator.randrange(3, 32000) for _ in range(prompt_len)]
            params = SamplingParams(max_tokens=max_model_len - prompt_len, temperature=0.0, ignore_eos=True)
            engine.add_request(EngineRequest(ChoiceId(f"r{index}", 0), prompt, params))
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.shutdown()

    bounds = _bounds(largest_steps(budget, max_num_seqs, max_model_len, engine_config.block_size))
    worst = {key: max(shape[key] for shape in seen) for key in bounds}
    assert all(worst[key] <= bounds[key] for key in bounds), (worst, bounds)
    # The load did reach the limits the warm-up stands for.
    assert worst["rows"] == max_num_seqs and worst["tokens"] == budget and worst["cache_read_chunk"] > 1


def _configs(checkpoint, **engine) -> tuple[ModelConfig, EngineConfig]:
    model = ModelConfig(source=str(checkpoint), served_model_id="tiny", dtype="float32", max_model_len=1024)
    return model, EngineConfig(device="cpu", kv_cache_bytes=64 * 2**20, **engine)


def test_the_engine_warms_up_on_its_largest_steps_before_serving(tiny_checkpoint, caplog, monkeypatch):
    model, engine = _configs(tiny_checkpoint, max_num_seqs=32, max_num_batched_tokens=512)
    steps = []
    real_forward = llama.forward

    def counting_forward(model, kv_cache, input_ids, *args):
        steps.append(input_ids.numel())
        return real_forward(model, kv_cache, input_ids, *args)

    monkeypatch.setattr(llama, "forward", counting_forward)
    with caplog.at_level(logging.INFO, logger="serve_app.engine.model_runner"):
        ModelRunner(load_rank_model(model, engine, 1), model, engine, rank=0, world_size=1)
    assert steps == [32, 512, 512]  # on CPU the budget is explicit: each step once, on the real cache
    assert "warm-up: 512 tokens: 31 decode rows and 1 prefill chunk of up to 481 tokens, all at 1024 tokens " \
           "of context in" in caplog.text


def test_an_engine_that_cannot_run_its_largest_steps_refuses_to_start(tiny_checkpoint, monkeypatch):
    model, engine = _configs(tiny_checkpoint, max_num_seqs=8, max_num_batched_tokens=256)

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(llama, "forward", out_of_memory)
    with pytest.raises(RuntimeError, match="warm-up step") as refused:
        ModelRunner(load_rank_model(model, engine, 1), model, engine, rank=0, world_size=1)
    message = str(refused.value)
    assert "8 tokens: 8 decode rows" in message and "out of memory" in message
    for setting in ("engine.max_num_batched_tokens", "engine.max_num_seqs", "model.max_model_len"):
        assert setting in message


def test_on_a_gpu_the_kv_budget_leaves_room_for_the_measured_peak(tiny_checkpoint, monkeypatch):
    """`_gpu_kv_budget` with the device's figures simulated: 80 GiB, 14 GiB allocated (weights), the probe
    cache 2 GiB while it lives, the warm-up steps peaking 4 GiB over it and leaving 1 GiB of NCCL buffers
    outside torch's allocator. Only the right order (free read after the steps, with the probe gone) gives
    the budget below."""
    model, engine = _configs(tiny_checkpoint, max_num_seqs=8, max_num_batched_tokens=256)
    runner = ModelRunner(load_rank_model(model, engine, 1), model, engine, rank=0, world_size=1)
    gib = 2**30
    probes: list[weakref.ref] = []
    device = {"allocated": 14 * gib, "peak": 0, "nccl": 0, "ran": []}

    class Probe(model_runner.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            probes.append(weakref.ref(self))

    def probe_bytes() -> int:
        return 2 * gib if any(probe() is not None for probe in probes) else 0

    def run(step, kv_cache, hint):
        device["ran"].append(kv_cache.shape.num_blocks)
        device["peak"] = max(device["peak"], device["allocated"] + probe_bytes() + 4 * gib)
        device["nccl"] = 1 * gib
        return 0.0

    fakes = {"synchronize": lambda device=None: None,
             "reset_peak_memory_stats": lambda _=None: device.update(peak=device["allocated"] + probe_bytes()),
             "memory_allocated": lambda _=None: device["allocated"] + probe_bytes(),
             "memory_reserved": lambda _=None: device["allocated"] + probe_bytes(),
             "max_memory_allocated": lambda _=None: device["peak"],
             "max_memory_reserved": lambda _=None: device["peak"],
             "empty_cache": lambda: None,
             "mem_get_info": lambda _=None: (80 * gib - device["allocated"] - probe_bytes() - device["nccl"],
                                             80 * gib)}
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(model_runner, "KVCache", Probe)
    monkeypatch.setattr(runner, "_warm_up", run)
    runner.device = torch.device("cpu")  # the probe's tensors; the memory figures are the fakes above
    gpu = EngineConfig(device="cuda", gpu_memory_utilization=0.9, max_num_seqs=8, max_num_batched_tokens=256)
    steps = largest_steps(256, 8, 1024, 16)
    shape = model_runner.KVCacheShape(2, len(steps[0].block_tables[0]), 16, 1, 8)

    budget = runner._gpu_kv_budget(gpu, steps, shape, torch.float32)
    assert device["ran"] == [1024 // 16] * len(steps)  # every step, on a probe of one context's blocks
    free_after = 80 * gib - 14 * gib - 1 * gib  # the probe freed, NCCL's buffers counted
    assert budget == int(free_after - 0.1 * 80 * gib - 1.1 * 4 * gib - model_runner._SAMPLER_HEADROOM)


def test_on_cpu_small_steps_run_on_one_thread_and_larger_ones_on_all(tiny_checkpoint, monkeypatch):
    """`cpu_small_step_tokens`: a one-stream decode step on one torch thread, a prefill or a batch of decodes
    on every thread the rank has (`cpu_threads_per_rank`)."""
    model, engine = _configs(tiny_checkpoint, max_num_seqs=8, max_num_batched_tokens=256, cpu_small_step_tokens=8)
    threads_seen = []
    real_forward = llama.forward

    def recording_forward(*args):
        threads_seen.append(torch.get_num_threads())
        return real_forward(*args)

    given = torch.get_num_threads()
    torch.set_num_threads(2)  # what join_group sets from cpu_threads_per_rank
    try:
        runner = ModelRunner(load_rank_model(model, engine, 1), model, engine, rank=0, world_size=1)
        monkeypatch.setattr(llama, "forward", recording_forward)
        for query_lens in ([1], [1] * 8, [1], [40]):  # a lone decode, a batch of 8, a lone decode, a prefill
            runner._run(model_runner._step_of(query_lens, 64, engine.block_size).packed())
    finally:
        torch.set_num_threads(given)
    assert threads_seen == [1, 2, 1, 2]


def test_decode_rows_go_in_calls_by_length_within_the_gather_bound():
    context_lens = [300, 20, 1000, 40, 33, 17, 5000]
    rows = list(range(len(context_lens)))
    groups = group_decode_rows(rows, context_lens, block_size=16, max_tokens=256)
    # Shortest first; short rows share a call, each row too long to share one is alone (5,000 > 256 too).
    assert groups == [[5, 1, 4, 3], [0], [2], [6]]
    for group in groups:
        padded = len(group) * -(-context_lens[group[-1]] // 16) * 16
        assert padded <= 256 or len(group) == 1
    assert group_decode_rows(rows, context_lens, block_size=16, max_tokens=10**9) == [[5, 1, 4, 3, 0, 2, 6]]
    assert group_decode_rows([], context_lens, block_size=16, max_tokens=256) == []


def test_on_cpu_the_widening_weights_are_input_major_and_the_logits_unchanged(tiny_checkpoint):
    """A CPU rank stores q/k/v, gate/up and the vocabulary head `[in, out]` in memory (the layout its matmul
    runs fastest at small batches, `models/llama.py`); every logit is the same dot product as with the
    checkpoint's layout, up to the order of its additions."""
    model, engine = _configs(tiny_checkpoint, max_num_seqs=8, max_num_batched_tokens=256)
    runner = ModelRunner(load_rank_model(model, engine, 1), model, engine, rank=0, world_size=1)
    layer = runner.model.model.layers[0]
    for weight in (layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight, runner.model.lm_head.weight):
        assert llama.is_input_major(weight)
    step = model_runner._step_of([1, 1, 30], 64, engine.block_size)
    step.input_ids = random.Random(3).choices(range(32000), k=len(step.input_ids))
    input_major_logits = runner._run(step.packed())

    runner.model = llama.fuse_projections(load_rank_model(model, engine, 1), input_major=False)
    assert not llama.is_input_major(runner.model.lm_head.weight)
    checkpoint_layout_logits = runner._run(step.packed())
    torch.testing.assert_close(input_major_logits, checkpoint_layout_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(input_major_logits.argmax(-1), checkpoint_layout_logits.argmax(-1))
