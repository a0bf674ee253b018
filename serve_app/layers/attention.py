"""Attention over a paged KV cache: the cache's storage, one step's attention metadata, and the attention.

In: a layer's queries, keys and values for the step's flat token list (`[T, heads, head_dim]`), and the
step's `AttentionBatch` (where each sequence's tokens sit, its context length, its block table). Out: the
attention output for every token, with the step's keys and values written into the cache first.

`KVCache` is one rank's storage, one key and one value tensor per layer shaped
`[kv_heads_on_this_rank, num_blocks, block_size, head_dim]` (head-major), so a token's slot is
`block * block_size + offset` in every head. Head-major because attention reads one head's context at a
time: gathered, a row's keys come out `[heads, context, head_dim]` with each head's context contiguous, the
layout SDPA's CPU kernel reads fastest (on the token-major layout's strided view it took ~2x longer in a
decode step, ~4x in a microbenchmark); the Triton kernel reads either through strides. Which blocks belong to
whom is the engine's bookkeeping (`engine/block_manager.py`); this module only reads and writes the slots it
is given.

Steps are ragged, never padded: prefill chunks are attended one sequence at a time, causal (aligned to the
end of the context when the chunk reads cached context), through SDPA's fused kernels: 4-D inputs and a
causal flag or `causal_lower_right` bias, never a materialised mask, so a 4k-token chunk does not fall
back to the math kernel's fp32 `[H, T, T]` scores. Single-token decode rows go together, in calls grouped
by context length (`group_decode_rows`) over their blocks gathered from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from serve_app.layers.transfer import upload


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
    """Key/value storage for every layer on one rank, preallocated once."""

    def __init__(self, shape: KVCacheShape, dtype: torch.dtype, device: torch.device):
        self.shape = shape
        size = (shape.num_kv_heads, shape.num_blocks, shape.block_size, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store `[T, heads, head_dim]` keys and values at flat slot indices `[T]`."""
        flat = (self.shape.num_kv_heads, -1, self.shape.head_dim)
        self.keys[layer].view(flat).index_copy_(1, slots, keys.transpose(0, 1))
        self.values[layer].view(flat).index_copy_(1, slots, values.transpose(0, 1))

    def read(self, layer: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` keys and values of one sequence, `[heads, length, head_dim]` each."""
        keys, values = self.gather(layer, block_table, 1)
        return keys[0, :, :length], values[0, :, :length]

    def gather(self, layer: int, blocks: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `rows` rows whose block tables, all of one width, are `blocks` (flat):
        `[rows, heads, width * block_size, head_dim]` each, a copy."""
        return gather_blocks(self.keys[layer], blocks, rows), gather_blocks(self.values[layer], blocks, rows)

    def blocks_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values as `[num_blocks, block_size, heads, head_dim]` views (no copy), the
        layout the Triton kernel indexes by strides."""
        return self.keys[layer].permute(1, 2, 0, 3), self.values[layer].permute(1, 2, 0, 3)

    @property
    def capacity_tokens(self) -> int:
        return self.shape.num_blocks * self.shape.block_size


@dataclass
class DecodeGroup:
    """Decode rows attended in one call: every row's blocks are gathered up to the group's longest row."""

    tokens: torch.Tensor  # [R] each row's token index in the step
    blocks: torch.Tensor  # [R * W] their block tables, flat, W = blocks of the group's longest row
    valid: torch.Tensor | None  # [R, 1, 1, W * block_size] True where a row has context; None for one row
    length: int  # the group's longest context: a single row attends to exactly this many gathered tokens
    whole_step: bool  # the rows are the step's tokens 0..R-1, in order: no query gather, no output scatter


@dataclass
class PagedDecodeRows:
    """Every decode row of a step, attended in one call that reads the block tables in place."""

    tokens: torch.Tensor  # [R] each row's token index in the step
    block_tables: torch.Tensor  # [R, W]
    context_lens: torch.Tensor  # [R]


@dataclass
class AttentionBatch:
    """Where each sequence's tokens sit in the flat step, and how much context each one has.

    `query_starts[b]:query_starts[b+1]` are sequence b's tokens in this step; `context_lens[b]` is its cache
    length after this step (so its first new token is at position `context_lens[b] - query_len`). Built once
    per step, so no layer recomputes these or syncs with the device.
    """

    query_starts: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor  # [B, max_blocks], padded with 0
    slots: torch.Tensor  # [T] flat cache slot of every token in the step
    # Decode rows (one query token with earlier context) are attended in batched calls, a group per call.
    decode_rows: frozenset[int]
    decode_groups: list[DecodeGroup]  # the gather path's calls, or
    paged_decode: PagedDecodeRows | None = None  # ... the paged path's one call

    @classmethod
    def build(cls, query_starts: list[int], context_lens: list[int], block_tables: torch.Tensor,
              slots: torch.Tensor, block_size: int, decode_gather_tokens: int, *, paged: bool = False
              ) -> AttentionBatch:
        """From the step's host lists and its device tensors; the decode rows' indices reach the device in
        one non-blocking copy, so building the batch never waits for the device. `paged`: the decode rows
        go in one `PagedDecodeRows` call instead of gather groups."""
        device = block_tables.device
        rows = [b for b in range(len(context_lens))
                if query_starts[b + 1] - query_starts[b] == 1 and context_lens[b] > 1]
        if paged:
            decode = None
            if rows:
                members, tokens, lens = upload(
                    rows + [query_starts[b] for b in rows] + [context_lens[b] for b in rows], torch.int64,
                    device).view(3, len(rows))
                decode = PagedDecodeRows(tokens, block_tables.index_select(0, members), lens)
            return cls(query_starts, context_lens, block_tables, slots, frozenset(rows), [], decode)
        # Within a group the rows go in step order (each has its own mask), so that a decode-only step in one
        # group is the step's tokens in order: its queries and its output need no gather.
        grouped = [sorted(group) for group in group_decode_rows(rows, context_lens, block_size,
                                                                 decode_gather_tokens)]
        indices: list[int] = []
        for group in grouped:
            indices += group
            indices += [query_starts[b] for b in group]
            indices += [context_lens[b] for b in group]
        on_device = upload(indices, torch.int64, device) if grouped else None
        groups = []
        offset = 0
        for group in grouped:
            size = len(group)
            members, tokens, lens = on_device[offset:offset + 3 * size].view(3, size)
            offset += 3 * size
            length = max(context_lens[b] for b in group)
            width = -(-length // block_size)
            # A lone row needs no mask: its gathered keys are cut to its length instead (a view).
            valid = None if size == 1 else (
                torch.arange(width * block_size, device=device)[None, :] < lens[:, None])[:, None, None, :]
            groups.append(DecodeGroup(
                tokens=tokens,
                blocks=block_tables.index_select(0, members)[:, :width].flatten(),
                valid=valid, length=length,
                # Every token of the step is one of this group's rows, each one token, in step order.
                whole_step=size == query_starts[-1]))
        return cls(query_starts, context_lens, block_tables, slots, frozenset(rows), groups)


def gather_blocks(storage: torch.Tensor, blocks: torch.Tensor, rows: int) -> torch.Tensor:
    """`rows` rows' blocks (`blocks`, flat, the same number per row) of one head-major layer tensor
    `[heads, num_blocks, block_size, D]`, as `[rows, heads, blocks per row * block_size, D]`, a copy."""
    # index_select copies whole blocks of each head; advanced indexing is ~3x slower on CPU.
    heads, _, _, head_dim = storage.shape
    return storage.index_select(1, blocks).view(heads, rows, -1, head_dim).transpose(0, 1)


def group_decode_rows(rows: list[int], context_lens: list[int], block_size: int, max_tokens: int
                      ) -> list[list[int]]:
    """`rows`, shortest context first, cut into groups whose gather (rows x the longest row's blocks, in tokens)
    stays within `max_tokens`; a row longer than that alone is a group of its own.

    One call for every decode row would pad each row to the batch's longest: with one long conversation in a
    batch of short ones, nearly all of the gathered cache is padding, read and attended for nothing, and its
    transient memory grows with rows x the longest context. By length, short rows share a short call.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    for row in sorted(rows, key=lambda b: context_lens[b]):
        padded = -(-context_lens[row] // block_size) * block_size
        if current and (len(current) + 1) * padded > max_tokens:
            groups.append(current)
            current = []
        current.append(row)
    if current:
        groups.append(current)
    return groups


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, layer: int,
                    batch: AttentionBatch, scale: float) -> torch.Tensor:
    """Write the step's keys and values into the cache, then attend every query token over its context.

    `q` is `[T, q_heads, D]`, `k` and `v` `[T, kv_heads, D]` (grouped-query attention when the head counts
    differ). The result is `[T, q_heads, D]`, contiguous.
    """
    kv_cache.write(layer, batch.slots, k, v)
    gqa = q.shape[1] != k.shape[1]
    groups = batch.decode_groups
    if len(groups) == 1 and groups[0].whole_step:  # a decode-only step in one call: its result is the output
        # (`contiguous` is free on CPU, where SDPA's output already is; a kernel elsewhere may lay it out apart)
        return _decode_group(q, kv_cache, layer, groups[0], scale, gqa).contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for b, context_len in enumerate(batch.context_lens):
        if b in batch.decode_rows:
            continue
        start, stop = batch.query_starts[b], batch.query_starts[b + 1]
        query_len = stop - start
        if query_len == context_len:  # the whole context is in this step: no cache read needed
            keys, values = k[start:stop].transpose(0, 1), v[start:stop].transpose(0, 1)  # [heads, L, D]
            causal = {"is_causal": query_len > 1}
        else:
            keys, values = kv_cache.read(layer, batch.block_tables[b], context_len)
            causal = {"attn_mask": causal_lower_right(query_len, context_len)}
        out[start:stop] = F.scaled_dot_product_attention(
            q[start:stop].transpose(0, 1)[None], keys[None], values[None], scale=scale, enable_gqa=gqa,
            **causal)[0].transpose(0, 1)
    for group in groups:
        out.index_copy_(0, group.tokens, _decode_group(q, kv_cache, layer, group, scale, gqa))
    if batch.paged_decode is not None:
        rows = batch.paged_decode
        result = paged_decode(q.index_select(0, rows.tokens), *kv_cache.blocks_view(layer), rows.block_tables,
                              rows.context_lens, scale)
        out.index_copy_(0, rows.tokens, result)
    return out


def paged_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row `[R, Hq, D]` over its first `context_lens[r]` cached tokens, read through its block
    table; `[R, Hq, D]`. On CUDA the Triton kernel reads the blocks in place; elsewhere every row's whole
    table is gathered and masked past its length — the same shapes whatever the lengths, so it too could
    be captured in a graph, at the cost of reading the table's full width."""
    if q.device.type == "cuda":
        from serve_app.layers.triton_paged_attention import paged_decode_attention

        return paged_decode_attention(q, key_cache, value_cache, block_tables, context_lens, scale)
    rows, width = block_tables.shape
    block_size, kv_heads = key_cache.shape[1:3]
    # `permute` turns the `blocks_view` back into the cache's head-major storage (a view, no copy).
    keys, values = (gather_blocks(cache.permute(2, 0, 1, 3), block_tables.flatten(), rows)
                    for cache in (key_cache, value_cache))
    valid = torch.arange(width * block_size, device=q.device)[None, :] < context_lens[:, None]
    return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=valid[:, None, None, :],
                                          scale=scale, enable_gqa=q.shape[1] != kv_heads).squeeze(2)


def _decode_group(q: torch.Tensor, kv_cache: KVCache, layer: int, group: DecodeGroup, scale: float,
                  gqa: bool) -> torch.Tensor:
    """One attention call for a group of single-token rows, `[R, Hq, D]`: gather their blocks, mask each past
    its length (a lone row: cut to its length)."""
    rows = group.tokens.numel()
    keys, values = kv_cache.gather(layer, group.blocks, rows)  # [R, heads, W * block_size, D]
    if group.valid is None:
        keys, values = keys[:, :, :group.length], values[:, :, :group.length]
    queries = (q if group.whole_step else q.index_select(0, group.tokens)).unsqueeze(2)  # [R, Hq, 1, D]
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.valid, scale=scale,
                                          enable_gqa=gqa).squeeze(2)
