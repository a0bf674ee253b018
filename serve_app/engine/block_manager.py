"""The paged KV cache's bookkeeping (rank 0 only): which blocks are free, which belong to whom.

The cache is fixed-size blocks preallocated once on every rank (`layers/attention.py`'s `KVCache`, each
rank its own heads); `BlockManager` hands them out to sequences as they grow, and shares the full blocks of
identical prefixes. Preallocating everything at start is what makes admission cheap and memory use flat: a
request is admitted when enough blocks are free, and the worst case is known before the first request.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from serve_app.engine.sequence import Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The identity of a full block: its tokens and, through `parent`, every token before it (and so their
    positions). Cryptographic, so that no prompt can be crafted to collide with another user's block and
    read its keys and values."""
    return hashlib.blake2b(parent + array("i", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    """Allocates cache blocks to sequences, and shares full blocks between sequences with the same prefix.

    Automatic prefix caching: a block whose tokens are all computed is registered under `chain_hash` of its
    tokens and everything before them. A new (or resumed) sequence first takes the registered blocks its
    own prefix hashes to, so those tokens are not computed again; Llama 2 chat requests that share a system
    prompt, or the earlier turns of one conversation, share those blocks. Shared blocks are full, so no
    sequence ever writes to them. When no sequence holds a registered block any more it stays cached, and is
    evicted (least recently released first) only when the free list is empty.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # A stack: recently freed blocks are reused first, which keeps the touched memory warm.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._holders = [0] * num_blocks  # sequences whose block table holds each block
        self._cached: dict[bytes, int] = {}  # chain hash -> registered block
        self._hash_of: dict[int, bytes] = {}  # registered block -> its chain hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unheld; oldest release first

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence could get now: never-registered free blocks plus cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences, for metrics and autoscaling (unheld cached blocks are free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def extra_blocks_for(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain so its cache can hold `num_tokens` tokens."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.extra_blocks_for(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        extra = self.extra_blocks_for(seq, num_tokens)
        if extra > self.num_free_blocks:
            raise RuntimeError("grow() called without can_grow(): the scheduler must check first")
        for _ in range(extra):
            block = self._free.pop() if self._free else self._evict()
            self._holders[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        # Released last-block-first, so a prefix's tail is evicted before its head.
        for block in reversed(seq.block_table):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def reuse_cached_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks yet the cached blocks of its longest cached prefix; returns how many
        of its tokens they hold (set as computed). The last token is always left to compute: its logits are
        what the next token is sampled from."""
        if not self.enable_prefix_caching or seq.block_table or seq.num_computed_tokens:
            return 0
        hashes = self._block_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        for block_hash in hashes:
            block = self._cached.get(block_hash)
            if block is None:
                break
            if self._holders[block] == 0:
                del self._evictable[block]
            self._holders[block] += 1
            seq.block_table.append(block)
        seq.num_registered_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that its computed tokens have filled since the last call."""
        full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or full <= seq.num_registered_blocks:
            return  # most decode steps fill no block: nothing to hash on the step's path
        hashes = self._block_hashes(seq, full)
        for index in range(seq.num_registered_blocks, full):
            block = seq.block_table[index]
            # Another sequence may have computed the same block first: keep its copy, this one stays private.
            if hashes[index] not in self._cached and block not in self._hash_of:
                self._cached[hashes[index]] = block
                self._hash_of[block] = hashes[index]
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def _block_hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The chain hashes of the first `count` full blocks of `seq`'s tokens, extending its memo."""
        memo = seq.block_hashes
        if len(memo) < count:
            tokens = seq.token_ids_slice(len(memo) * self.block_size, count * self.block_size)
            parent = memo[-1] if memo else b""
            for offset in range(0, len(tokens), self.block_size):
                parent = chain_hash(parent, tokens[offset:offset + self.block_size])
                memo.append(parent)
        return memo[:count]

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._hash_of.pop(block)]
        return block
