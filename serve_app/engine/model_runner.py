"""Runs one engine step on every rank of a tensor-parallel group, in lock step.

Rank 0 packs the step — token ids, positions, cache slots, block tables, which rows sample — into one int64
host tensor and broadcasts it over the group's host channel (`parallel/group.step_channel`: gloo, so it
never touches a device on the way), with its header, in one fixed-size message (`STEP_MESSAGE_SIZE`).
Every rank, rank 0 included, copies it to its device in one non-blocking copy and runs the same forward
on it; the all-reduces inside the sharded layers keep them in step. Nothing else crosses between ranks:
no activations, no logits. So a step costs a follower no device→host copy at all, and rank 0 one (its
sampled token ids, `engine/sampler.py`). Followers (ranks > 0) loop in `follow()` until rank 0 broadcasts a
shutdown. An idle rank 0 broadcasts heartbeats so a dead rank surfaces as a collective timeout instead of a
silent hang.

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
from serve_app.engine.cuda_graphs import DecodeGraphs
from serve_app.layers.attention import AttentionBatch, KVCache, KVCacheShape, num_blocks_for_budget
from serve_app.layers.transfer import to_device
from serve_app.models import llama
from serve_app.models.checkpoint import TORCH_DTYPES
from serve_app.parallel.group import step_channel

logger = logging.getLogger(__name__)


class StepKind(enum.IntEnum):
    RUN = 0
    HEARTBEAT = 1
    SHUTDOWN = 2


HEADER_SIZE = 5  # kind, tokens, sequences, sampled rows, block-table width
# Every broadcast on the step channel is this many int64s: the header, then as much of the payload as fits
# (the rest, when a step is larger, follows in a second broadcast). One fixed-size message per step costs a
# follower one wake-up instead of two (header, then payload); 64 KiB holds a decode step of 64 sequences
# of up to ~1,900 tokens of context, and copying it is cheap next to the round trip.
STEP_MESSAGE_SIZE = 8192

_STEP_SETTINGS = "engine.max_num_batched_tokens, engine.max_num_seqs or model.max_model_len"
_PROBE_HINT = f"The model and these steps do not fit the device even without a KV cache: lower {_STEP_SETTINGS}."
_REAL_CACHE_HINT = (f"Lower {_STEP_SETTINGS}, or leave more memory outside the KV cache "
                    "(engine.gpu_memory_utilization, engine.kv_cache_bytes).")
_SAMPLER_HEADROOM = 256 * 2**20


@dataclass
class StepInput:
    """One step's input as rank 0's scheduler made it, in host lists; every rank runs exactly this."""

    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slots: list[int]  # [T]
    query_starts: list[int]  # [B + 1]
    context_lens: list[int]  # [B]
    block_tables: list[list[int]]  # [B][W], padded with 0
    sample_rows: list[int]  # [S]

    def packed(self) -> RankStep:
        width = len(self.block_tables[0])
        sizes = StepSizes(len(self.input_ids), len(self.context_lens), len(self.sample_rows), width)
        flat = [*self.input_ids, *self.positions, *self.slots, *self.query_starts, *self.context_lens,
                *(block for table in self.block_tables for block in table), *self.sample_rows]
        return RankStep(sizes, torch.tensor(flat, dtype=torch.int64), self.query_starts, self.context_lens)


@dataclass(frozen=True)
class StepSizes:
    tokens: int
    seqs: int
    samples: int
    width: int  # block-table width

    @property
    def payload(self) -> int:
        return 3 * self.tokens + 2 * self.seqs + 1 + self.seqs * self.width + self.samples

    def split(self, payload: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ids, positions, slots, query_starts, context_lens, block_tables [B, W], sample_rows."""
        ids, positions, slots, starts, lens, tables, rows = torch.split(payload, [
            self.tokens, self.tokens, self.tokens, self.seqs + 1, self.seqs, self.seqs * self.width, self.samples])
        return ids, positions, slots, starts, lens, tables.view(self.seqs, self.width), rows


@dataclass
class RankStep:
    """A step as each rank runs it: its packed payload (host int64, the layout of `StepSizes.split`) and the
    two lists the attention's Python control flow needs, on the host."""

    sizes: StepSizes
    payload: torch.Tensor
    query_starts: list[int]
    context_lens: list[int]


class ModelRunner:
    """One rank's model and KV cache, and the step protocol between ranks."""

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, engine: EngineConfig, rank: int,
                 world_size: int):
        self.device = next(model.parameters()).device
        # This rank's shard, in the layout `llama.forward` runs (input-major where the CPU's matmul wants it).
        self.model = llama.fuse_projections(model, input_major=self.device.type == "cpu")
        self.rank = rank
        self.world_size = world_size
        # Rank 0 sends every step message from it, a follower receives each into it (gloo's broadcast returns
        # once the message has left or arrived, so one buffer serves every step).
        self._step_message = torch.empty(STEP_MESSAGE_SIZE, dtype=torch.int64) if world_size > 1 else None
        self.block_size = engine.block_size
        self._decode_gather_tokens = engine.decode_gather_tokens
        self.vocab_size = model.config.vocab_size
        self._threads = torch.get_num_threads()  # what the rank was given (`cpu_threads_per_rank`)
        self._small_step_tokens = engine.cpu_small_step_tokens if self.device.type == "cpu" else None
        self._paged_decode = _paged_decode_attention(engine.decode_attention, self.device)
        use_graphs = self._paged_decode and engine.cuda_graphs
        num_layers, kv_heads, head_dim = llama.layout(model)
        dtype = TORCH_DTYPES[model_config.dtype]
        warm_up = largest_steps(engine.max_num_batched_tokens, engine.max_num_seqs, model_config.max_model_len,
                                engine.block_size)
        if engine.kv_cache_bytes is not None:
            budget = engine.kv_cache_bytes
        else:
            probe = KVCacheShape(num_layers, len(warm_up[0].block_tables[0]), engine.block_size, kv_heads,
                                 head_dim)
            budget = self._gpu_kv_budget(engine, warm_up, probe, dtype)
        num_blocks = num_blocks_for_budget(budget, num_layers=num_layers, block_size=engine.block_size,
                                           num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
        num_blocks = self._agree_on(num_blocks)
        if num_blocks * engine.block_size < model_config.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * engine.block_size} tokens, fewer than one sequence of "
                f"max_model_len={model_config.max_model_len}: raise the KV budget or lower max_model_len")
        self._usable_blocks = num_blocks
        # With graphs, one more block past those the engine hands out: the padding rows' scratch space.
        self.kv_cache = KVCache(KVCacheShape(num_layers, num_blocks + int(use_graphs), engine.block_size, kv_heads,
                                             head_dim), dtype, self.device)
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
        self._graphs: DecodeGraphs | None = None
        if use_graphs:
            started = time.perf_counter()
            self._graphs = DecodeGraphs(self.model, self.kv_cache, min(engine.cuda_graph_max_batch, engine.max_num_seqs),
                                        blocks_needed(model_config.max_model_len, engine.block_size), num_blocks,
                                        capture=self.device.type == "cuda")
            if rank == 0:
                logger.info("decode steps of up to %d rows: %s (%.1f s)", self._graphs.buckets[-1],
                            f"CUDA graphs for batches {self._graphs.buckets}" if self._graphs.captured
                            else "static buffers, eager (no capture)", time.perf_counter() - started)
        if rank == 0:
            logger.info("decode attention: %s", self.decode_attention)

    @property
    def decode_attention(self) -> str:
        """How this rank's decode rows attend, in words (logged at start, reported by scripts/gpu_check.py)."""
        if not self._paged_decode:
            return "gather (decode rows in calls by length, their blocks gathered)"
        if self.device.type == "cuda":
            return "paged, Triton kernel reading the block tables in place"
        return "paged, full-width masked gather (the CUDA kernel's shapes, without the kernel)"

    @property
    def graphs_captured(self) -> bool:
        """Whether decode steps replay from CUDA graphs (False when off, off CUDA, or capture failed)."""
        return self._graphs is not None and self._graphs.captured

    @property
    def num_blocks(self) -> int:
        """Blocks the engine may hand out (the graphs' scratch block is not one of them)."""
        return self._usable_blocks

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
            self._run(step.packed(), kv_cache)
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
        rank_step = step.packed()
        if self.world_size > 1:
            sizes = rank_step.sizes
            self._send([StepKind.RUN, sizes.tokens, sizes.seqs, sizes.samples, sizes.width], rank_step.payload)
        return self._run(rank_step)

    def heartbeat(self) -> None:
        self._broadcast_control(StepKind.HEARTBEAT)

    def shutdown(self) -> None:
        self._broadcast_control(StepKind.SHUTDOWN)

    def _broadcast_control(self, kind: StepKind) -> None:
        if self.world_size > 1:
            self._send([kind, 0, 0, 0, 0], torch.empty(0, dtype=torch.int64))

    def _send(self, header: list[int], payload: torch.Tensor) -> None:
        """Rank 0's side of `_receive`: one fixed-size message, and the payload's rest if it is larger."""
        message, inline = self._step_message, min(payload.numel(), STEP_MESSAGE_SIZE - HEADER_SIZE)
        message[:HEADER_SIZE] = torch.tensor(header, dtype=torch.int64)
        message[HEADER_SIZE:HEADER_SIZE + inline] = payload[:inline]
        group = step_channel()
        dist.broadcast(message, src=0, group=group)
        if inline < payload.numel():
            dist.broadcast(payload[inline:].contiguous(), src=0, group=group)

    # -- ranks > 0 --------------------------------------------------------------------------------------------

    def follow(self) -> None:
        while True:
            step = self._receive(self._step_message)
            if step is StepKind.SHUTDOWN:
                return
            if step is not StepKind.HEARTBEAT:
                self._run(step)

    @staticmethod
    def _receive(message: torch.Tensor) -> RankStep | StepKind:
        """Rank 0's next broadcast, in host memory: a step, or a control message. Reading it costs no device
        sync (the step channel is gloo)."""
        group = step_channel()
        dist.broadcast(message, src=0, group=group)
        kind, tokens, seqs, samples, width = message[:HEADER_SIZE].tolist()
        if kind != StepKind.RUN:
            return StepKind(kind)
        sizes = StepSizes(tokens, seqs, samples, width)
        inline = min(sizes.payload, STEP_MESSAGE_SIZE - HEADER_SIZE)
        payload = torch.empty(sizes.payload, dtype=torch.int64)
        payload[:inline] = message[HEADER_SIZE:HEADER_SIZE + inline]  # a copy: `message` is the next step's
        if inline < sizes.payload:
            dist.broadcast(payload[inline:], src=0, group=group)
        starts = 3 * tokens
        host_lists = payload[starts:starts + 2 * seqs + 1].tolist()
        return RankStep(sizes, payload, host_lists[:seqs + 1], host_lists[seqs + 1:])

    # -- every rank -------------------------------------------------------------------------------------------

    def _run(self, step: RankStep, kv_cache: KVCache | None = None) -> torch.Tensor:
        if self._small_step_tokens is not None:
            threads = 1 if step.sizes.tokens < self._small_step_tokens else self._threads
            if threads != torch.get_num_threads():  # switching costs ~0.1 ms: only when the size class changes
                torch.set_num_threads(threads)
        # The step's one host-to-device copy, queued without waiting for the device.
        ids, positions, slots, _, lens, tables, rows = step.sizes.split(to_device(step.payload, self.device))
        sizes = step.sizes
        if kv_cache is None and self._graphs is not None and self._graphs.covers(
                sizes.tokens, sizes.seqs, sizes.samples, sizes.width, step.context_lens):
            return self._graphs.run(ids, positions, slots, tables, lens)
        batch = AttentionBatch.build(step.query_starts, step.context_lens, tables, slots, self.block_size,
                                     self._decode_gather_tokens, paged=self._paged_decode)
        return llama.forward(self.model, self.kv_cache if kv_cache is None else kv_cache, ids, positions, batch,
                             rows)


def _paged_decode_attention(setting: str, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda"
    return setting == "paged"


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
    return StepInput(
        input_ids=[0] * len(positions),
        positions=positions,
        slots=list(positions),
        query_starts=starts,
        context_lens=[context_len] * len(query_lens),
        block_tables=[list(range(width)) for _ in query_lens],
        sample_rows=[start - 1 for start in starts[1:]],
    )


def describe_step(step: StepInput) -> str:
    query_lens = [stop - start for start, stop in zip(step.query_starts, step.query_starts[1:])]
    decode_rows = sum(1 for query_len in query_lens if query_len == 1)
    chunks = [query_len for query_len in query_lens if query_len > 1]
    prefill = f"{len(chunks)} prefill chunk{'s' if len(chunks) != 1 else ''}" + (
        f" of up to {max(chunks)} tokens" if chunks else "")
    return (f"{len(step.input_ids)} tokens: {decode_rows} decode row{'s' if decode_rows != 1 else ''} and {prefill}, all at "
            f"{max(step.context_lens)} tokens of context")
