"""The engine: continuous batching over a paged KV cache, on one tensor-parallel group.

Plain Python — no Ray, no asyncio — so tests and benchmarks drive it directly:

    engine.add_request("a", prompt_token_ids, SamplingParams(max_tokens=16))
    while engine.has_unfinished():
        for output in engine.step(): ...

Each `step()` is schedule → run (all ranks) → sample (rank 0, on the device) → update. Whoever owns the
engine (the Serve replica) calls `step()` in a loop on one thread and `heartbeat()` while idle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.kv_cache import BlockManager
from serve_app.engine.model_runner import ModelRunner, StepInput
from serve_app.engine.sampler import PenaltyTable, SamplingBatch, sample, uses_penalties
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.scheduler import Scheduler, SchedulerLimits, SchedulerOutput
from serve_app.engine.sequence import RequestOutput, Sequence, TokenLogprob
from serve_app.parallel.group import GroupAddress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of blocks in use
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int
    prefix_cache_query_tokens: int = 0  # tokens looked up in the prefix cache at admission, since start
    prefix_cache_hit_tokens: int = 0  # ... found there, so not computed again


class Engine:
    def __init__(self, runner: ModelRunner, limits: SchedulerLimits, eos_token_ids: tuple[int, ...],
                 followers=None, enable_prefix_caching: bool = True):
        self.runner = runner
        self.limits = limits
        self.block_manager = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(limits, self.block_manager, eos_token_ids)
        self.followers = followers  # LocalFollowers / RayFollowers for ranks > 0, or None at tp=1
        self.num_preemptions = 0
        self._sequences: dict[str, Sequence] = {}
        self.penalties = PenaltyTable(limits.max_num_seqs, runner.vocab_size, runner.device)

    # -- requests ------------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._sequences:
            raise ValueError(f"request {request_id!r} is already running")
        if not prompt_token_ids or len(prompt_token_ids) >= self.limits.max_model_len:
            raise ValueError(f"a prompt needs 1 to {self.limits.max_model_len - 1} tokens, "
                             f"got {len(prompt_token_ids)}")
        # Checked here, against the model's own vocabulary, so one request cannot fail a step for all.
        if any(not 0 <= token < self.runner.vocab_size for token in params.logit_bias):
            raise ValueError(f"logit_bias names a token id outside the vocabulary of {self.runner.vocab_size}")
        seq = Sequence(request_id, list(prompt_token_ids), params)
        if params.seed is not None:
            seq.generator = torch.Generator(self.runner.device).manual_seed(params.seed)
        self._sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request; its KV blocks are free when this returns. False if it was unknown/finished."""
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(request_id)
        self.penalties.release(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, self.block_manager.usage,
                           self.block_manager.num_free_blocks, self.block_manager.num_blocks,
                           self.num_preemptions, self.scheduler.prefix_query_tokens,
                           self.scheduler.prefix_hit_tokens)

    # -- one step --------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        self.num_preemptions += len(scheduled.preempted)
        for seq in scheduled.preempted:
            self.penalties.release(seq.request_id)  # refilled from its token ids when it resumes
        if not scheduled.chunks:
            return []
        step_input, sampling_seqs = self._prepare(scheduled)
        logits = self.runner.execute(step_input)
        params = [seq.params for seq in sampling_seqs]
        prompts = [seq.prompt_token_ids for seq in sampling_seqs]
        outputs_so_far = [seq.output_token_ids for seq in sampling_seqs]
        penalty_slots = None
        if any(uses_penalties(p) for p in params):
            penalty_slots = self.penalties.slots([seq.request_id for seq in sampling_seqs], params, prompts,
                                                 outputs_so_far)
        batch = SamplingBatch.build(
            params, [seq.generator for seq in sampling_seqs], prompts, outputs_so_far,
            vocab_size=logits.shape[-1], device=logits.device,
            penalty_stats=self.penalties.stats(penalty_slots) if penalty_slots is not None else None)
        result = sample(logits, batch)
        if penalty_slots is not None:
            self.penalties.record(penalty_slots, result.token_ids)
        token_ids = result.token_ids.tolist()
        sampled = {seq.request_id: token for seq, token in zip(sampling_seqs, token_ids)}
        logprobs = self._logprobs(sampling_seqs, token_ids, result)

        finished = {seq.request_id for seq in self.scheduler.update_from_output(scheduled, sampled)}
        outputs = []
        for seq in sampling_seqs:
            done = seq.request_id in finished
            outputs.append(RequestOutput(
                seq.request_id, [sampled[seq.request_id]], finished=done,
                finish_reason=seq.finish_reason if done else None, logprobs=logprobs.get(seq.request_id)))
            if done:
                del self._sequences[seq.request_id]
                self.penalties.release(seq.request_id)
        return outputs

    def _prepare(self, scheduled: SchedulerOutput) -> tuple[StepInput, list[Sequence]]:
        block_size = self.runner.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_starts = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        sampling_seqs: list[Sequence] = []
        width = max(len(chunk.seq.block_table) for chunk in scheduled.chunks)
        tables: list[list[int]] = []
        for chunk in scheduled.chunks:
            seq, start, stop = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            input_ids.extend(seq.token_ids_slice(start, stop))
            positions.extend(range(start, stop))
            table = seq.block_table
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, stop))
            query_starts.append(len(input_ids))
            context_lens.append(stop)
            tables.append(table + [0] * (width - len(table)))
            if chunk.samples:
                sample_rows.append(len(input_ids) - 1)
                sampling_seqs.append(seq)

        def as_tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64)

        step = StepInput(as_tensor(input_ids), as_tensor(positions), as_tensor(slots), as_tensor(query_starts),
                         as_tensor(context_lens), as_tensor(tables), as_tensor(sample_rows))
        return step, sampling_seqs

    @staticmethod
    def _logprobs(seqs: list[Sequence], token_ids: list[int], result) -> dict[str, list[TokenLogprob]]:
        wanted = [i for i, seq in enumerate(seqs) if seq.params.logprobs]
        if not wanted or result.logprobs is None:
            return {}
        chosen = result.logprobs.tolist()
        top_ids = result.top_logprob_ids.tolist() if result.top_logprob_ids is not None else None
        top_values = result.top_logprob_values.tolist() if result.top_logprob_values is not None else None
        out = {}
        for i in wanted:
            k = seqs[i].params.top_logprobs
            top = list(zip(top_ids[i][:k], top_values[i][:k])) if top_ids is not None and k else []
            out[seqs[i].request_id] = [TokenLogprob(token_ids[i], chosen[i], top)]
        return out

    # -- group life ------------------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        self.runner.heartbeat()

    def healthy(self) -> bool:
        return self.followers is None or self.followers.healthy()

    def shutdown(self) -> None:
        """Stop the followers and leave the process group; safe to call after a rank has died."""
        from serve_app.parallel.group import leave_group

        try:
            self.runner.shutdown()
        finally:
            if self.followers is not None:
                self.followers.join()
            leave_group()


def build_engine(model: ModelConfig, engine: EngineConfig, *, use_ray: bool = False,
                 address: GroupAddress | None = None) -> Engine:
    """Start a whole tensor-parallel group with rank 0 in this process, and its engine.

    Given `address`, ranks 1..N-1 were started by another process (the replica, for an engine in its own
    process), which also keeps them; this process only joins them as rank 0."""
    from serve_app.parallel.group import join_group, start_followers
    from serve_app.parallel.worker import load_model

    started = time.monotonic()
    world_size = model.tensor_parallel_size
    followers = None
    if address is None:
        address, followers = start_followers(model, engine, use_ray=use_ray)
    join_group(address, 0, engine)
    hf_model = load_model(model, engine, world_size)
    runner = ModelRunner(hf_model, model, engine, 0, world_size)
    eos = hf_model.generation_config.eos_token_id
    eos_token_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    limits = SchedulerLimits(engine.max_num_seqs, engine.max_num_batched_tokens, model.max_model_len)
    logger.info("engine ready in %.1f s (tp=%d)", time.monotonic() - started, world_size)
    return Engine(runner, limits, eos_token_ids, followers, engine.enable_prefix_caching)
