"""How often a step makes the host wait for the device, counted on CPU.

On a GPU the host waits for the device whenever it reads a tensor's values (`tolist`, `item`, `int(t)`,
`bool(t)`, ...) and whenever it copies host data to the device from pageable memory without
`non_blocking=True` (PyTorch drains the stream first). Each such wait stalls the step's preparation behind the
device's queue. There is no device here, but the code that would wait is the same code: these tests run real
engine steps with those calls counted and hold them to the bound — rank 0 reads one thing per step (its
sampled token ids) and blocks on no copy; a follower rank does neither.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from typing_extensions import Self

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.engine import Engine, build_engine, start_engine
from serve_app.engine.model_runner import ModelRunner
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest
from serve_app.engine.worker import load_rank_model
from serve_app.parallel.group import TensorParallelGroup, join_process_group, leave_process_group

SERVE_APP = str(Path(__import__("serve_app").__file__).parent)
READS = ("tolist", "item", "numpy", "__int__", "__float__", "__bool__", "__index__")
COUNTS_FILE = "SERVE_APP_TEST_SYNC_COUNTS"


class SyncCounter:
    """While active: every read of a tensor's values into Python, and every copy or tensor creation aimed at a
    device by this project's code (`serve_app/`) that is not non-blocking.

    A follower reads the step rank 0 broadcast on the host channel (`ModelRunner._receive`); that tensor is
    host memory (gloo) on a GPU too, so those reads are not counted.
    """

    def __init__(self):
        self.reads: list[str] = []
        self.blocking_copies: list[str] = []
        self._originals: dict[tuple[object, str], object] = {}

    def __enter__(self) -> Self:
        for name in READS:
            self._wrap(torch.Tensor, name, self._on_read)
        for owner, name in ((torch.Tensor, "to"), (torch.Tensor, "cuda"), (torch.Tensor, "copy_"),
                            (torch, "tensor"), (torch, "as_tensor")):
            self._wrap(owner, name, self._on_copy)
        return self

    def __exit__(self, *_) -> None:
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)

    def _wrap(self, owner, name: str, check) -> None:
        original = getattr(owner, name)
        self._originals[(owner, name)] = original

        def counted(*args, **kwargs):
            check(name, sys._getframe(1), args, kwargs)
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    def _on_read(self, name, caller, args, kwargs) -> None:
        if caller.f_code is not ModelRunner._receive.__code__:
            self.reads.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")

    def _on_copy(self, name, caller, args, kwargs) -> None:
        if not caller.f_code.co_filename.startswith(SERVE_APP) or kwargs.get("non_blocking"):
            return
        targets_device = ("device" in kwargs or name == "cuda"
                          or any(isinstance(a, (torch.device, str)) for a in args[1:])
                          or (name == "copy_" and args[1].device != args[0].device))
        if targets_device:
            self.blocking_copies.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")


def _configs(checkpoint, tp: int, **settings) -> tuple[ModelConfig, EngineConfig]:
    model = ModelConfig(source=str(checkpoint), served_model_id="tiny", dtype="float32", tensor_parallel_size=tp,
                        max_model_len=512)
    engine = EngineConfig(device="cpu", kv_cache_bytes=16 * 2**20, max_num_seqs=8, max_num_batched_tokens=64,
                          collective_timeout_s=120, decode_gather_tokens=64, **settings)
    return model, engine


def _mixed_load(engine: Engine) -> list[tuple[list[str], list[str]]]:
    """Requests that use every sampling stage (but log-probs, which are a second copy by request), a long
    prompt chunked beside decodes, and a turn that reads a cached prefix; each step's counts."""
    prefix = [1] + [(7 * i) % 31000 + 3 for i in range(70)]
    kinds = [SamplingParams(max_tokens=12, temperature=0.0),
             SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, min_p=0.05),
             SamplingParams(max_tokens=12, temperature=1.0, seed=7),
             SamplingParams(max_tokens=12, temperature=0.7, repetition_penalty=1.2, frequency_penalty=0.5,
                            presence_penalty=0.3),
             SamplingParams(max_tokens=12, temperature=0.0, logit_bias={100: 5.0})]
    for index, params in enumerate(kinds):
        engine.add_request(EngineRequest(ChoiceId(f"r{index}", 0), prefix + [index + 3] * (index * 9), params))
    steps = []
    with SyncCounter() as counter:
        while engine.has_unfinished():
            reads, copies = len(counter.reads), len(counter.blocking_copies)
            engine.step()
            if len(steps) == 3:  # while the others decode: a turn on the first prompt's cached prefix
                engine.add_request(EngineRequest(ChoiceId("turn2", 0), prefix + [9, 9, 9], kinds[0]))
            steps.append((counter.reads[reads:], counter.blocking_copies[copies:]))
    return steps


def _assert_rank0_bound(steps: list[tuple[list[str], list[str]]]) -> None:
    assert len(steps) > 12
    for reads, copies in steps:
        assert len(reads) <= 1, reads
        assert copies == []
    assert sum(len(reads) for reads, _ in steps) >= len(steps) - 1  # the counter sees the sampled ids' copy


@pytest.mark.parametrize("settings", [{}, {"decode_attention": "paged", "cuda_graphs": True}],
                         ids=["gather", "paged-static-buffers"])
def test_a_step_on_rank_0_reads_only_its_sampled_tokens_from_the_device(tiny_checkpoint, settings):
    """Both decode paths: the CPU's gather calls, and the paged one on the buffers CUDA graphs replay."""
    engine = start_engine(*_configs(tiny_checkpoint, tp=1, **settings))
    try:
        _assert_rank0_bound(_mixed_load(engine))
    finally:
        engine.shutdown()


def counting_follower(address, rank, device_index, model, engine) -> None:
    """A follower rank (engine/worker.run_worker) whose steps are counted; writes its counts at shutdown."""
    join_process_group(address, rank, engine, device_index=device_index)
    runner = ModelRunner(load_rank_model(model, engine, address.world_size), model, engine, rank,
                         address.world_size)
    steps = 0
    run = runner._run

    def counted_run(step, kv_cache=None):
        nonlocal steps
        steps += 1
        return run(step, kv_cache)

    runner._run = counted_run
    with SyncCounter() as counter:
        runner.follow()
    Path(os.environ[COUNTS_FILE]).write_text(json.dumps(
        {"steps": steps, "reads": counter.reads, "blocking_copies": counter.blocking_copies}))
    leave_process_group()


def test_a_follower_rank_never_reads_from_its_device_and_rank_0_stays_in_bound(tiny_checkpoint, tmp_path,
                                                                                monkeypatch):
    counts = tmp_path / "follower.json"
    monkeypatch.setenv(COUNTS_FILE, str(counts))  # the spawned follower inherits it
    model, engine_config = _configs(tiny_checkpoint, tp=2)
    group = TensorParallelGroup.launch(model, engine_config, counting_follower, use_ray=False)
    try:
        engine = build_engine(model, engine_config, group.address, group, listener=group.take_listener())
    except BaseException:
        group.stop(timeout_s=0.0)
        raise
    try:
        steps = _mixed_load(engine)
    finally:
        engine.shutdown()
    _assert_rank0_bound(steps)
    follower = json.loads(counts.read_text())
    assert follower["steps"] == len(steps)  # it ran every step rank 0 ran
    assert follower["reads"] == [] and follower["blocking_copies"] == []
