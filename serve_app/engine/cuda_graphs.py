"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a 7B model at batch 1 launches ~1,300 kernels: launched from Python one by one, the step
takes as long as the launches, several times the ~4 ms the GPU needs to read the weights. A CUDA graph
records those launches once and replays them with one call. What a graph replays is fixed: the kernels,
their shapes and the addresses they read. So every decode step of up to `max_batch` rows runs on static
buffers — token ids, positions, cache slots, block tables and context lengths — padded to the smallest
bucket that holds it, and its attention is the paged decode (`layers/attention.paged_decode`), whose shapes
do not depend on the rows' lengths.

In: a decode-only step (every row one new token after earlier context, every row sampling) already on the
device. Out: its logits `[rows, vocab]`. Padding rows write their keys and values into a scratch block no
sequence owns, attend to it alone, and their logits are dropped. Prefill, mixed and larger steps are not
this module's (`covers` says which are): they run eagerly.

Without capture (on CPU) the same static path runs eagerly, which is how the tests check it gives the
tokens the eager path gives. At tp > 1 every rank captures the same graphs in the same order, all-reduces
inside; if capture fails (a NCCL build that cannot be captured), the runner logs it and runs eagerly.
"""

from __future__ import annotations

import logging

import torch

from serve_app.layers.attention import AttentionBatch, KVCache, PagedDecodeRows
from serve_app.models import llama

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, up to and including `max_batch`: a step pads at most 7 rows."""
    sizes = [size for size in (1, 2, 4) if size < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    """Static decode buffers on one rank, and a graph per bucket when `capture` (CUDA)."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, max_batch: int, max_width: int,
                 scratch_block: int, *, capture: bool):
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = batch_buckets(max_batch)
        self.max_width = max_width
        device = kv_cache.keys[0].device
        size = self.buckets[-1]
        self._scratch_block = scratch_block
        self._scratch_slot = scratch_block * kv_cache.shape.block_size
        self._input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self._positions = torch.zeros(size, dtype=torch.int64, device=device)
        self._slots = torch.full((size,), self._scratch_slot, dtype=torch.int64, device=device)
        self._block_tables = torch.full((size, max_width), scratch_block, dtype=torch.int64, device=device)
        self._context_lens = torch.ones(size, dtype=torch.int64, device=device)
        self._rows = torch.arange(size, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def covers(self, tokens: int, seqs: int, samples: int, width: int, context_lens: list[int]) -> bool:
        """Whether a step of these sizes is a decode step this runner replays (the same answer on every rank:
        it reads only the step's sizes and host lists)."""
        return (tokens == seqs == samples and 0 < seqs <= self.buckets[-1] and width <= self.max_width
                and min(context_lens) > 1)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """Logits `[rows, vocab]` of a covered step, from its device tensors (one row each)."""
        rows, width = block_tables.shape
        size = next(bucket for bucket in self.buckets if bucket >= rows)
        self._input_ids[:rows].copy_(input_ids)
        self._positions[:rows].copy_(positions)
        self._slots[:rows].copy_(slots)
        self._block_tables[:rows, :width].copy_(block_tables)
        self._context_lens[:rows].copy_(context_lens)
        if rows < size:  # padding rows: their own scratch slot and one token of context
            self._slots[rows:size].fill_(self._scratch_slot)
            self._block_tables[rows:size, 0].fill_(self._scratch_block)
            self._context_lens[rows:size].fill_(1)
        graph = self._graphs.get(size)
        if graph is None:
            return self._forward(size)[:rows]
        graph[0].replay()
        return graph[1][:rows]

    def _forward(self, size: int) -> torch.Tensor:
        decode = PagedDecodeRows(self._rows[:size], self._block_tables[:size], self._context_lens[:size])
        # The host lists only say that every row is a decode row: nothing in the call reads their values.
        batch = AttentionBatch(list(range(size + 1)), [2] * size, self._block_tables[:size], self._slots[:size],
                               frozenset(range(size)), [], decode)
        return llama.forward(self.model, self.kv_cache, self._input_ids[:size], self._positions[:size], batch,
                             self._rows[:size])

    def _capture(self) -> None:
        pool = None
        try:
            for size in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory pool
                self._forward(size)  # warm-up outside capture: kernels compile, cuBLAS picks, memory settles
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(size)
                pool = graph.pool()
                self._graphs[size] = (graph, logits)
        except Exception as error:  # noqa: BLE001 - reported, then the eager path serves
            self._graphs.clear()
            logger.warning("CUDA graph capture failed (%s): decode steps run eagerly", error)
