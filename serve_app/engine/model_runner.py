"""Runs one engine step on every rank of a tensor-parallel group, in lock step.

Rank 0 packs the step — token ids, positions, cache slots, block tables, which rows sample — into one int64
tensor and broadcasts it (a header of five numbers, then the payload). Every rank, rank 0 included, runs the
same forward on that input; the all-reduces inside the sharded layers keep them in step. Nothing else
crosses between ranks: no activations, no logits. Followers (ranks > 0) loop in `follow()` until rank 0
broadcasts a shutdown. An idle rank 0 broadcasts heartbeats so a dead rank surfaces as a collective timeout
instead of a silent hang.

Before the first request, every rank runs the largest steps the scheduler can make (`largest_steps`): a
step that would run out of device memory fails the group at start, with the settings to lower, instead of
killing it under load. On a GPU without an explicit `kv_cache_bytes`, those steps first run on a small probe
cache, and their peak activation memory is what the KV budget leaves room for.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.block_manager import blocks_needed
from serve_app.layers.attention import AttentionBatch, KVCache, KVCacheShape, num_blocks_for_budget
from serve_app.models import llama
from serve_app.models.checkpoint import TORCH_DTYPES

logger = logging.getLogger(__name__)


class StepKind(enum.IntEnum):
    RUN = 0
    HEARTBEAT = 1
    SHUTDOWN = 2


HEADER_SIZE = 5  # kind, tokens, sequences, sampled rows, block-table width

_STEP_SETTINGS = "engine.max_num_batched_tokens, engine.max_num_seqs or model.max_model_len"
_PROBE_HINT = f"The model and these steps do not fit the device even without a KV cache: lower {_STEP_SETTINGS}."
_REAL_CACHE_HINT = (f"Lower {_STEP_SETTINGS}, or leave more memory outside the KV cache "
                    "(engine.gpu_memory_utilization, engine.kv_cache_bytes).")
_SAMPLER_HEADROOM = 256 * 2**20


@dataclass
class StepInput:
    """One step's input, identical on every rank. All tensors are int64 on the runner's device."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T]
    query_starts: torch.Tensor  # [B + 1]
    context_lens: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, W]
    sample_rows: torch.Tensor  # [S]

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        header = torch.tensor([StepKind.RUN, self.input_ids.numel(), self.context_lens.numel(),
                               self.sample_rows.numel(), self.block_tables.shape[1]], dtype=torch.int64)
        payload = torch.cat([self.input_ids, self.positions, self.slots, self.query_starts, self.context_lens,
                             self.block_tables.flatten(), self.sample_rows])
        return header, payload

    @classmethod
    def unpack(cls, header: torch.Tensor, payload: torch.Tensor) -> StepInput:
        _, tokens, seqs, samples, width = (int(x) for x in header.tolist())
        sizes = [tokens, tokens, tokens, seqs + 1, seqs, seqs * width, samples]
        ids, positions, slots, starts, lens, tables, rows = torch.split(payload, sizes)
        return cls(ids, positions, slots, starts, lens, tables.view(seqs, width), rows)


class ModelRunner:
    """One rank's model and KV cache, and the step protocol between ranks."""

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, engine: EngineConfig, rank: int,
                 world_size: int):
        self.model = model
        self.rank = rank
        self.world_size = world_size
        self.device = next(model.parameters()).device
        self.block_size = engine.block_size
        self._decode_gather_tokens = engine.decode_gather_tokens
        self.vocab_size = model.config.vocab_size
        self._threads = torch.get_num_threads()  # what the rank was given (`cpu_threads_per_rank`)
        self._small_step_tokens = engine.cpu_small_step_tokens if self.device.type == "cpu" else None
        num_layers, kv_heads, head_dim = llama.layout(model)
        dtype = TORCH_DTYPES[model_config.dtype]
        warm_up = largest_steps(engine.max_num_batched_tokens, engine.max_num_seqs, model_config.max_model_len,
                                engine.block_size)
        if engine.kv_cache_bytes is not None:
            budget = engine.kv_cache_bytes
        else:
            probe = KVCacheShape(num_layers, warm_up[0].block_tables.shape[1], engine.block_size, kv_heads,
                                 head_dim)
            budget = self._gpu_kv_budget(engine, warm_up, probe, dtype)
        num_blocks = num_blocks_for_budget(budget, num_layers=num_layers, block_size=engine.block_size,
                                           num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
        num_blocks = self._agree_on(num_blocks)
        if num_blocks * engine.block_size < model_config.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * engine.block_size} tokens, fewer than one sequence of "
                f"max_model_len={model_config.max_model_len}: raise the KV budget or lower max_model_len")
        self.kv_cache = KVCache(KVCacheShape(num_layers, num_blocks, engine.block_size, kv_heads, head_dim),
                                dtype, self.device)
        if rank == 0:
            tokens = self.kv_cache.capacity_tokens
            logger.info("KV cache: %d blocks of %d tokens = %d tokens (%d sequences of 2k tokens), %.1f MiB/rank",
                        num_blocks, engine.block_size, tokens, tokens // 2048,
                        num_blocks * self.kv_cache.shape.bytes_per_block(dtype) / 2**20)
        # With the real cache in place (and on a GPU, everything else allocated): the steps that must fit.
        for step in warm_up:
            seconds = self._warm_up(step, self.kv_cache, _REAL_CACHE_HINT)
            if rank == 0:
                logger.info("warm-up: %s in %.0f ms", describe_step(step), seconds * 1e3)

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.shape.num_blocks

    def _gpu_kv_budget(self, engine: EngineConfig, warm_up: list[StepInput], probe_shape: KVCacheShape,
                       dtype: torch.dtype) -> int:
        """What the KV cache may take: up to `gpu_memory_utilization` of the device, less what the largest
        steps need at their peak, measured by running them on a probe cache of just their own blocks."""
        probe = KVCache(probe_shape, dtype, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        allocated, reserved = torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)
        for step in warm_up:
            self._warm_up(step, probe, _PROBE_HINT)
        # Whichever is larger: what the steps allocated at their peak, or how far the allocator's pool grew
        # (its rounding and fragmentation; it may also have served part of the peak from blocks it held).
        activations = max(torch.cuda.max_memory_allocated(self.device) - allocated,
                          torch.cuda.max_memory_reserved(self.device) - reserved)
        del probe  # the only reference: its memory goes back to the pool, and empty_cache returns it
        torch.cuda.empty_cache()
        # Read after the steps, so that what they allocated outside torch's allocator (NCCL's buffers) counts.
        free, total = torch.cuda.mem_get_info(self.device)
        if self.rank == 0:
            logger.info("warm-up on a probe cache: the largest steps peak at %.0f MiB of activations",
                        activations / 2**20)
        # 10% over the measured peak (kernel choices vary a little between runs), and room for what rank 0
        # allocates after this: the sampler's work over [max_num_seqs, vocab] and the penalty table.
        return int(free - (1 - engine.gpu_memory_utilization) * total - 1.1 * activations - _SAMPLER_HEADROOM)

    def _warm_up(self, step: StepInput, kv_cache: KVCache, hint: str) -> float:
        """Run `step` on this rank (every rank runs it, in lock step); its duration in seconds."""
        started = time.perf_counter()
        try:
            self._run(step, kv_cache)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as error:
            raise RuntimeError(
                f"a warm-up step, one of the largest this engine can schedule ({describe_step(step)}), failed "
                f"on rank {self.rank}: {error}. {hint}") from error
        return time.perf_counter() - started

    def _agree_on(self, num_blocks: int) -> int:
        """Every rank must allocate the same number of blocks: take the smallest."""
        if self.world_size == 1:
            return num_blocks
        value = torch.tensor([num_blocks], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return int(value.item())

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # -- rank 0 -----------------------------------------------------------------------------------------------

    def execute(self, step: StepInput) -> torch.Tensor:
        """Broadcast the step, run it here too, return logits `[S, vocab]` (meaningful on rank 0)."""
        if self.world_size > 1:
            header, payload = step.pack()
            payload = payload.to(self._comm_device)
            dist.broadcast(header.to(self._comm_device), src=0)
            dist.broadcast(payload, src=0)
            # Run from the copy already on the device, as the followers do, instead of copying again.
            step = StepInput.unpack(header, payload.to(self.device))
        return self._run(step)

    def heartbeat(self) -> None:
        self._broadcast_control(StepKind.HEARTBEAT)

    def shutdown(self) -> None:
        self._broadcast_control(StepKind.SHUTDOWN)

    def _broadcast_control(self, kind: StepKind) -> None:
        if self.world_size > 1:
            header = torch.tensor([kind, 0, 0, 0, 0], dtype=torch.int64, device=self._comm_device)
            dist.broadcast(header, src=0)

    # -- ranks > 0 --------------------------------------------------------------------------------------------

    def follow(self) -> None:
        header = torch.empty(HEADER_SIZE, dtype=torch.int64, device=self._comm_device)
        while True:
            dist.broadcast(header, src=0)
            kind = StepKind(int(header[0]))
            if kind is StepKind.SHUTDOWN:
                return
            if kind is StepKind.HEARTBEAT:
                continue
            _, tokens, seqs, samples, width = (int(x) for x in header.tolist())
            payload = torch.empty(3 * tokens + 2 * seqs + 1 + seqs * width + samples, dtype=torch.int64,
                                  device=self._comm_device)
            dist.broadcast(payload, src=0)
            self._run(StepInput.unpack(header.cpu(), payload.to(self.device)))

    # -- every rank -------------------------------------------------------------------------------------------

    def _run(self, step: StepInput, kv_cache: KVCache | None = None) -> torch.Tensor:
        if self._small_step_tokens is not None:
            threads = 1 if step.input_ids.numel() < self._small_step_tokens else self._threads
            if threads != torch.get_num_threads():  # switching costs ~0.1 ms: only when the size class changes
                torch.set_num_threads(threads)
        batch = AttentionBatch.build(step.query_starts.tolist(), step.context_lens.tolist(),
                                           step.block_tables.to(self.device), step.slots.to(self.device),
                                           self.block_size, self._decode_gather_tokens)
        return llama.forward(self.model, self.kv_cache if kv_cache is None else kv_cache,
                             step.input_ids.to(self.device), step.positions.to(self.device), batch,
                             step.sample_rows.to(self.device))


def largest_steps(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                  block_size: int) -> list[StepInput]:
    """The steps that need the most memory, one for each way a step can be large, every row at the longest
    context (`max_model_len`):

    - the most decode rows the batch allows: the batched decode attention gathers every decode row's blocks
      up to the longest row of its call, so its memory grows with rows x context (up to
      `decode_gather_tokens` a call);
    - the longest prefill chunk that reads cached context (`min(budget, max_model_len - 1)` tokens after one
      cached token): it attends over its whole context through the cache-read path;
    - the full token budget, as decode rows beside prefill chunk(s): the MLP's activations grow with tokens.

    Every row's block table is the same `ceil(max_model_len / block_size)` blocks, so a cache of that many is
    enough. What the steps write there is never read: a sequence writes each slot before it reads it.
    """
    num_rows = max(1, min(max_num_seqs, max_num_batched_tokens))
    longest_chunk = max(1, min(max_num_batched_tokens, max_model_len - 1))
    num_tokens = min(max_num_batched_tokens, num_rows * max_model_len)
    prefill_rows = 1
    while (num_rows - prefill_rows) + prefill_rows * max_model_len < num_tokens:
        prefill_rows += 1
    prefill_tokens = num_tokens - (num_rows - prefill_rows)
    chunks = [max_model_len] * (prefill_rows - 1) + [prefill_tokens - max_model_len * (prefill_rows - 1)]
    shapes = [[1] * num_rows, [longest_chunk], [1] * (num_rows - prefill_rows) + chunks]
    distinct = list(dict.fromkeys(tuple(shape) for shape in shapes))  # a small budget can make two alike
    return [_step_of(list(query_lens), max_model_len, block_size) for query_lens in distinct]


def _step_of(query_lens: list[int], context_len: int, block_size: int) -> StepInput:
    """A step whose rows each end at `context_len`, with these many new tokens; all rows share blocks
    0..ceil(context_len / block_size)-1, so a token's slot is its position."""
    positions: list[int] = []
    starts = [0]
    for query_len in query_lens:
        positions += range(context_len - query_len, context_len)
        starts.append(starts[-1] + query_len)
    width = blocks_needed(context_len, block_size)

    def as_tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64)

    return StepInput(
        input_ids=torch.zeros(len(positions), dtype=torch.int64),
        positions=as_tensor(positions),
        slots=as_tensor(positions),
        query_starts=as_tensor(starts),
        context_lens=as_tensor([context_len] * len(query_lens)),
        block_tables=torch.arange(width, dtype=torch.int64).repeat(len(query_lens), 1),
        sample_rows=as_tensor([start - 1 for start in starts[1:]]),
    )


def describe_step(step: StepInput) -> str:
    query_lens = (step.query_starts[1:] - step.query_starts[:-1]).tolist()
    decode_rows = sum(1 for query_len in query_lens if query_len == 1)
    chunks = [query_len for query_len in query_lens if query_len > 1]
    prefill = f"{len(chunks)} prefill chunk{'s' if len(chunks) != 1 else ''}" + (
        f" of up to {max(chunks)} tokens" if chunks else "")
    return (f"{step.input_ids.numel()} tokens: {decode_rows} decode row{'s' if decode_rows != 1 else ''} and {prefill}, all at "
            f"{int(step.context_lens.max())} tokens of context")
