"""The paged KV cache: fixed-size blocks preallocated once, handed out to sequences as they grow.

`BlockManager` is the bookkeeping (rank 0 only): which blocks are free, which belong to whom.
`KVCache` is the storage (every rank, its own heads): one key and one value tensor per layer, shaped
`[num_blocks, block_size, kv_heads_on_this_rank, head_dim]`, so a token's slot is `block * block_size + offset`.

Preallocating everything at start is what makes admission cheap and memory use flat: a request is admitted
when enough blocks are free, and the worst case is known before the first request arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.engine.sequence import Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Allocates cache blocks to sequences. No sharing between sequences (no prefix caching yet)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: recently freed blocks are reused first, which keeps the touched memory warm.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, for metrics and autoscaling."""
        return 1.0 - len(self._free) / self.num_blocks

    def extra_blocks_for(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain so its cache can hold `num_tokens` tokens."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.extra_blocks_for(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        extra = self.extra_blocks_for(seq, num_tokens)
        if extra > len(self._free):
            raise RuntimeError("grow() called without can_grow(): the scheduler must check first")
        for _ in range(extra):
            seq.block_table.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int  # on this rank
    head_dim: int

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element


def num_blocks_for_budget(budget_bytes: int, *, num_layers: int, block_size: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype) -> int:
    per_block = KVCacheShape(num_layers, 1, block_size, num_kv_heads, head_dim).bytes_per_block(dtype)
    return budget_bytes // per_block


class KVCache:
    """Key/value storage for every layer on one rank."""

    def __init__(self, shape: KVCacheShape, dtype: torch.dtype, device: torch.device):
        self.shape = shape
        size = (shape.num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store `[T, heads, head_dim]` keys and values at flat slot indices `[T]`."""
        flat = (-1, self.shape.num_kv_heads, self.shape.head_dim)
        self.keys[layer].view(flat).index_copy_(0, slots, keys)
        self.values[layer].view(flat).index_copy_(0, slots, values)

    def read(self, layer: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` keys and values of one sequence, `[length, heads, head_dim]` each."""
        flat = (-1, self.shape.num_kv_heads, self.shape.head_dim)
        keys = self.keys[layer].index_select(0, block_table).view(flat)[:length]
        values = self.values[layer].index_select(0, block_table).view(flat)[:length]
        return keys, values

    @property
    def capacity_tokens(self) -> int:
        return self.shape.num_blocks * self.shape.block_size
