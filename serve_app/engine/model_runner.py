"""Runs one engine step on every rank of a tensor-parallel group, in lock step.

Rank 0 packs the step — token ids, positions, cache slots, block tables, which rows sample — into one int64
tensor and broadcasts it (a header of five numbers, then the payload). Every rank, rank 0 included, runs the
same forward on that input; the all-reduces inside the sharded layers keep them in step. Nothing else
crosses between ranks: no activations, no logits. Followers (ranks > 0) loop in `follow()` until rank 0
broadcasts a shutdown. An idle rank 0 broadcasts heartbeats so a dead rank surfaces as a collective timeout
instead of a silent hang.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.kv_cache import KVCache, KVCacheShape, num_blocks_for_budget
from serve_app.models import llama
from serve_app.parallel.worker import DTYPES

logger = logging.getLogger(__name__)


class StepKind(enum.IntEnum):
    RUN = 0
    HEARTBEAT = 1
    SHUTDOWN = 2


HEADER_SIZE = 5  # kind, tokens, sequences, sampled rows, block-table width


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
        self.vocab_size = model.config.vocab_size
        num_layers, kv_heads, head_dim = llama.layout(model)
        dtype = DTYPES[model_config.dtype]
        budget = engine.kv_cache_bytes if engine.kv_cache_bytes is not None else self._gpu_kv_budget(engine)
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

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.shape.num_blocks

    def _gpu_kv_budget(self, engine: EngineConfig) -> int:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        # Keep room for activations of the largest step: a rough but safe margin of 1 GiB.
        return int(free - (1 - engine.gpu_memory_utilization) * total) - 2**30

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

    def _run(self, step: StepInput) -> torch.Tensor:
        batch = llama.AttentionBatch.build(step.query_starts.tolist(), step.context_lens.tolist(),
                                           step.block_tables.to(self.device), step.slots.to(self.device),
                                           self.block_size)
        return llama.forward(self.model, self.kv_cache, step.input_ids.to(self.device),
                             step.positions.to(self.device), batch, step.sample_rows.to(self.device))
