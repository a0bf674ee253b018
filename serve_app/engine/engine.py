"""The engine: continuous batching over a paged KV cache, on one tensor-parallel group.

Plain Python — no Ray, no asyncio — so tests and benchmarks drive it directly:

    engine = start_engine(model_config, engine_config)
    engine.add_request(EngineRequest(ChoiceId("r", 0), prompt_token_ids, SamplingParams(max_tokens=16)))
    while engine.has_unfinished():
        for output in engine.step(): ...

Each `step()` is schedule → prepare → execute (all ranks) → sample (rank 0, on the device) → update. Whoever
owns the engine (the replica's engine loop) calls `step()` in a loop on one thread and `heartbeat()` while
idle, and after each step hands `pop_refused()` to the requests concerned.

A request with a grammar (structured outputs, tool calls) reaches the scheduler only once its grammar is
prepared: `GrammarCompiler` prepares it on a background thread (at once when it is cached) while the request
waits here, so neither a step nor the loop waits for a grammar.
"""

from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass

import torch

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.block_manager import BlockManager
from serve_app.engine.grammar import GrammarCompiler
from serve_app.engine.model_runner import ModelRunner, StepInput
from serve_app.engine.sampler import SampledTokens, Sampler
from serve_app.engine.scheduler import ScheduledChunk, Scheduler, SchedulerLimits
from serve_app.engine.sequence import ChoiceId, EngineRequest, RequestOutput, Sequence
from serve_app.engine.worker import load_rank_model, run_worker
from serve_app.errors import InternalError, InvalidRequestError, ServiceError
from serve_app.models.checkpoint import resolve_checkpoint
from serve_app.parallel.group import (
    GroupAddress,
    TensorParallelGroup,
    join_process_group,
    leave_process_group,
)

logger = logging.getLogger(__name__)

# With nothing to run but requests whose grammar is being prepared, a step waits this long for one, so that
# the loop neither spins nor stops reading its commands.
GRAMMAR_WAIT_S = 0.01


@dataclass(frozen=True)
class EngineStats:
    num_sequences_running: int
    num_sequences_waiting: int  # in the scheduler's queue, or waiting for their grammar
    kv_cache_usage: float  # share of blocks in use
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int
    prefix_cache_query_tokens: int = 0  # tokens looked up in the prefix cache at admission, since start
    prefix_cache_hit_tokens: int = 0  # ... found there, so not computed again
    generated_tokens: int = 0  # tokens sampled since start (aborted choices' included)


class Engine:
    def __init__(self, runner: ModelRunner, limits: SchedulerLimits, eos_token_ids: tuple[int, ...],
                 enable_prefix_caching: bool = True, group: TensorParallelGroup | None = None,
                 grammars: GrammarCompiler | None = None):
        """`group`: the follower ranks this engine owns (started for it by `start_engine`), which it checks
        and stops with itself; None when another process owns them (an engine in its own process).
        `grammars`: prepares the grammars of constrained requests; without it they are refused."""
        self.runner = runner
        self.limits = limits
        self.group = group
        self.block_manager = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(limits, self.block_manager, eos_token_ids)
        self.sampler = Sampler(limits.max_num_seqs, runner.vocab_size, runner.device)
        self.grammars = grammars
        self.num_preemptions = 0
        self.num_generated_tokens = 0
        self._sequences: dict[ChoiceId, Sequence] = {}
        # Requests whose grammar is being prepared, and the future of its template.
        self._grammar_waiting: dict[ChoiceId, tuple[Sequence, Future]] = {}
        self._refused: dict[ChoiceId, ServiceError] = {}  # failed after add_request returned; see pop_refused

    # -- requests ------------------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queue a choice; a request this engine cannot serve is refused here (`InvalidRequestError`), alone,
        before it can fail a step for everyone."""
        params = request.params
        if request.choice in self._sequences:
            raise InvalidRequestError(f"choice {request.choice} is already running")
        if not request.prompt_token_ids or len(request.prompt_token_ids) >= self.limits.max_model_len:
            raise InvalidRequestError(f"A prompt needs 1 to {self.limits.max_model_len - 1} tokens, got "
                                      f"{len(request.prompt_token_ids)}.")
        # Against the model's own vocabulary: an id past it would be a device-side assert on a GPU, taking
        # down every request of the step.
        outside = [token for token in params.logit_bias if not 0 <= token < self.runner.vocab_size]
        if outside:
            raise InvalidRequestError(f"Token id {outside[0]} in logit_bias is outside the vocabulary (size "
                                      f"{self.runner.vocab_size}).", param="logit_bias")
        if params.grammar is not None and self.grammars is None:
            raise InvalidRequestError("This engine cannot constrain its output (it has no tokenizer to match "
                                      "grammars with).")
        seq = Sequence(request.choice, list(request.prompt_token_ids), params)
        if params.seed is not None:
            seq.generator = torch.Generator(self.runner.device).manual_seed(params.seed)
        self._sequences[request.choice] = seq
        if params.grammar is None:
            self.scheduler.add(seq)
            return
        self._grammar_waiting[request.choice] = (seq, self.grammars.prepare(params.grammar))
        self._admit_prepared()  # a cached grammar's request joins the queue at once
        error = self._refused.pop(request.choice, None)
        if error is not None:  # known at once (a grammar that failed before): refused here, not later
            raise error

    def abort_request(self, choice: ChoiceId) -> bool:
        """Cancel a choice; its KV blocks are free when this returns. False if it was unknown or finished."""
        if self._sequences.pop(choice, None) is None:
            return False
        if self._grammar_waiting.pop(choice, None) is None:
            self.scheduler.abort(choice)
        self.sampler.release(choice)
        return True

    def pop_refused(self) -> dict[ChoiceId, ServiceError]:
        """Requests that failed after `add_request` took them (their grammar could not be prepared, or could
        not go on), with why; they are gone from the engine. Each is returned once."""
        refused, self._refused = self._refused, {}
        return refused

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._grammar_waiting)

    def stats(self) -> EngineStats:
        waiting = self.scheduler.num_waiting + len(self._grammar_waiting)
        return EngineStats(self.scheduler.num_running, waiting, self.block_manager.usage,
                           self.block_manager.num_free_blocks, self.block_manager.num_blocks,
                           self.num_preemptions, self.scheduler.prefix_query_tokens,
                           self.scheduler.prefix_hit_tokens, self.num_generated_tokens)

    # -- one step --------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self._grammar_waiting:
            self._admit_prepared()
        scheduled = self.scheduler.schedule()
        self.num_preemptions += len(scheduled.preempted)
        for seq in scheduled.preempted:
            self.sampler.preempt(seq.choice)
        if not scheduled.chunks:
            if self._grammar_waiting:
                wait_for_futures([future for _, future in self._grammar_waiting.values()], GRAMMAR_WAIT_S,
                                 FIRST_COMPLETED)
            return []
        step_input, sampling_seqs = prepare_step(scheduled.chunks, self.runner.block_size)
        logits = self.runner.execute(step_input)
        sampled = self.sampler(logits, sampling_seqs)
        self.num_generated_tokens += len(sampled.token_ids)
        finished = self.scheduler.update_from_output(
            scheduled, {seq.choice: token for seq, token in zip(sampling_seqs, sampled.token_ids)},
            sampled.grammar_completed)
        for choice in sampled.grammar_failed:
            self.abort_request(choice)
            self._refused[choice] = InternalError()
        return self._outputs(sampling_seqs, sampled, {seq.choice for seq in finished})

    def _admit_prepared(self) -> None:
        """Queue the requests whose grammar is prepared, each with its own matcher; refuse those whose grammar
        failed."""
        for choice, (seq, future) in list(self._grammar_waiting.items()):
            if not future.done():
                continue
            del self._grammar_waiting[choice]
            error = future.exception()
            if error is not None:
                del self._sequences[choice]
                self._refused[choice] = error if isinstance(error, ServiceError) else InternalError()
                if not isinstance(error, ServiceError):
                    logger.error("preparing a grammar failed", exc_info=error)
                continue
            self.sampler.start_grammar(choice, future.result())
            self.scheduler.add(seq)

    def _outputs(self, seqs: list[Sequence], sampled: SampledTokens, finished: set[ChoiceId]
                 ) -> list[RequestOutput]:
        outputs = []
        for seq, token, logprobs in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            if seq.choice in sampled.grammar_failed:
                continue  # refused (pop_refused): nothing it made is an answer
            done = seq.choice in finished
            # A preempted sequence keeps its tokens, so its first token is sampled (and reported) once.
            first = len(seq.output_token_ids) == 1
            outputs.append(RequestOutput(seq.choice, [token], seq.finish_reason if done else None,
                                         [logprobs] if logprobs is not None else None,
                                         seq.num_cached_prompt_tokens if first else None))
            if done:
                del self._sequences[seq.choice]
                self.sampler.release(seq.choice)
        return outputs

    # -- group life ------------------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        self.runner.heartbeat()

    def healthy(self) -> bool:
        """Every follower rank this engine owns still runs."""
        return self.group is None or self.group.healthy()

    def shutdown(self) -> None:
        """Stop the followers and leave the process group; safe to call after a rank has died."""
        try:
            self.runner.shutdown()
        finally:
            if self.group is not None:
                self.group.stop()
            if self.grammars is not None:
                self.grammars.shutdown()
            leave_process_group()


def prepare_step(chunks: list[ScheduledChunk], block_size: int) -> tuple[StepInput, list[Sequence]]:
    """The scheduled chunks as one step's input (flat token list, positions, cache slots, block tables, the
    rows that sample), and the sequences that sample, in the order of their logits."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_starts = [0]
    context_lens: list[int] = []
    sample_rows: list[int] = []
    sampling_seqs: list[Sequence] = []
    width = max(len(chunk.seq.block_table) for chunk in chunks)
    tables: list[list[int]] = []
    for chunk in chunks:
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
    step = StepInput(input_ids, positions, slots, query_starts, context_lens, tables, sample_rows)
    return step, sampling_seqs


def build_engine(model: ModelConfig, engine: EngineConfig, address: GroupAddress,
                 group: TensorParallelGroup | None = None, *, listener: socket.socket | None = None) -> Engine:
    """Rank 0 of the group at `address`, and its engine, in this process: join the followers, load this
    rank's model, warm up. `group`, when this process owns the followers, goes to the engine; `listener`
    holds the group's port (`TensorParallelGroup.take_listener`; None at tp=1)."""
    started = time.monotonic()
    join_process_group(address, 0, engine, listener=listener)
    hf_model = load_rank_model(model, engine, address.world_size)
    runner = ModelRunner(hf_model, model, engine, 0, address.world_size)
    eos = hf_model.generation_config.eos_token_id
    eos_token_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    limits = SchedulerLimits(engine.max_num_seqs, engine.max_num_batched_tokens, model.max_model_len)
    grammars = GrammarCompiler(resolve_checkpoint(model.source), runner.vocab_size, eos_token_ids,
                               engine.grammar_cache_size)
    logger.info("engine ready in %.1f s (tp=%d)", time.monotonic() - started, address.world_size)
    return Engine(runner, limits, eos_token_ids, engine.enable_prefix_caching, group, grammars)


def start_engine(model: ModelConfig, engine: EngineConfig, *, use_ray: bool = False) -> Engine:
    """A whole tensor-parallel group with rank 0's engine in this process: the followers are launched here
    (local processes, or Ray actors in the caller's placement group) and owned by the engine."""
    group = TensorParallelGroup.launch(model, engine, run_worker, use_ray=use_ray)
    try:
        return build_engine(model, engine, group.address, group, listener=group.take_listener())
    except BaseException:
        group.stop(timeout_s=0.0)
        raise
