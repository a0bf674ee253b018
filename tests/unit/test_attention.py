"""Paged attention (`layers/attention.py`) against plain causal attention, and on SDPA's fused kernels."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from serve_app.layers.attention import AttentionBatch, KVCache, KVCacheShape, paged_attention

BLOCK = 4
HEAD_DIM = 16


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_len: int) -> torch.Tensor:
    """Causal attention of the last `query_len` positions over the whole sequence, one head at a time."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    context = k.shape[1]
    scores = (q[:, -query_len:] @ k.transpose(1, 2)) * HEAD_DIM**-0.5
    allowed = torch.arange(context)[None, :] <= torch.arange(context - query_len, context)[:, None]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("cached", [0, 7], ids=["whole-prompt", "after-cached-prefix"])
def test_a_prefill_chunk_attends_causally_on_the_fused_kernel(kv_heads, cached):
    """A chunk of 9 new tokens, after `cached` tokens already in the cache: its output equals causal attention
    over the whole sequence, and no call falls back to SDPA's math kernel (which upcasts to fp32 and
    materialises the [heads, T, T] scores: gigabytes for a 4k-token chunk on a GPU)."""
    torch.manual_seed(0)
    total, new = cached + 9, 9
    q = torch.randn(4, total, HEAD_DIM)
    k, v = torch.randn(kv_heads, total, HEAD_DIM), torch.randn(kv_heads, total, HEAD_DIM)
    blocks = -(-total // BLOCK)
    cache = KVCache(KVCacheShape(1, blocks + 1, BLOCK, kv_heads, HEAD_DIM), torch.float32, torch.device("cpu"))
    table = torch.arange(1, blocks + 1)  # block 0 left unused, so a wrong table reads zeros
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(total)])
    if cached:
        cache.write(0, slots[:cached], k[:, :cached].transpose(0, 1), v[:, :cached].transpose(0, 1))
    batch = AttentionBatch.build([0, new], [total], table[None], slots[cached:], BLOCK, 1 << 20)
    with profile() as prof:
        out = paged_attention(*(x[:, cached:].transpose(0, 1) for x in (q, k, v)), cache, 0, batch,
                              HEAD_DIM**-0.5)
    kernels = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in kernels
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels
    torch.testing.assert_close(out.transpose(0, 1), _reference(q, k, v, new), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("lengths, gather_tokens, calls", [
    ([3, 9, 17], 2 * 12, 2),  # a call of two masked rows, then the longest alone
    ([17, 3, 9], 1 << 20, 1),  # one call for the whole step, its rows not in length order
    ([9], 1 << 20, 1),  # a lone stream's step
], ids=["two-calls", "one-call-for-the-step", "one-row"])
def test_decode_rows_of_different_lengths_each_attend_over_their_own_context(kv_heads, lengths, gather_tokens,
                                                                          calls):
    """Single-token rows with these many tokens of context, in gather calls of up to `gather_tokens`: each
    row's output, in its place in the step, equals attention over exactly its own context, read through its
    own block table."""
    torch.manual_seed(1)
    cache = KVCache(KVCacheShape(1, 16, BLOCK, kv_heads, HEAD_DIM), torch.float32, torch.device("cpu"))
    tables, slots, expected, queries, keys, values = [], [], [], [], [], []
    next_block = 1
    for length in lengths:
        blocks = -(-length // BLOCK)
        table = list(range(next_block, next_block + blocks))
        next_block += blocks
        q = torch.randn(4, length, HEAD_DIM)
        k, v = torch.randn(kv_heads, length, HEAD_DIM), torch.randn(kv_heads, length, HEAD_DIM)
        row_slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)])
        cache.write(0, row_slots[:-1], k[:, :-1].transpose(0, 1), v[:, :-1].transpose(0, 1))
        tables.append(table + [0] * (5 - blocks))
        slots.append(row_slots[-1])
        queries.append(q[:, -1:])
        keys.append(k[:, -1:])
        values.append(v[:, -1:])
        expected.append(_reference(q, k, v, 1))
    batch = AttentionBatch.build(list(range(len(lengths) + 1)), lengths, torch.tensor(tables), torch.stack(slots),
                                 BLOCK, decode_gather_tokens=gather_tokens)
    assert len(batch.decode_groups) == calls
    out = paged_attention(*(torch.cat(x, dim=1).transpose(0, 1) for x in (queries, keys, values)), cache, 0, batch,
                          HEAD_DIM**-0.5)
    assert out.is_contiguous()  # the layer's o_proj views it as [T, heads * D]
    torch.testing.assert_close(out.transpose(0, 1), torch.cat(expected, dim=1), atol=1e-5, rtol=1e-5)
