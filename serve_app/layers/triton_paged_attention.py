"""Decode attention that reads the paged KV cache in place: a Triton kernel, for CUDA.

In: one query token per row (`[R, q_heads, D]`), the cache's key and value tensors of one layer as
`[num_blocks, block_size, kv_heads, D]` views (`KVCache.blocks_view`: strided over head-major storage; any
layout whose head_dim is contiguous and whose keys and values share strides will do), each row's block table
(`[R, W]`) and context length (`[R]`), all on the device. Out: `[R, q_heads, D]`. The gather path
(`attention._decode_group`) copies every row's blocks into a contiguous tensor first, which reads the
context three times (read, write, read again) and needs Python to know each row's length; this kernel walks
the block table itself, so it reads the context once and its launch depends on nothing but tensor shapes. That is what lets a CUDA graph replay decode
steps (`engine/cuda_graphs.py`).

One program per (row, kv head) handles the `q_heads / kv_heads` query heads that share that kv head, over the
row's blocks with an online softmax in fp32. The tests run it on CPU under Triton's interpreter
(`TRITON_INTERPRET=1`) against plain attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale,
                         stride_q_row, stride_q_head, stride_cache_block, stride_cache_token, stride_cache_head,
                         stride_table_row, stride_out_row, stride_out_head,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         HEAD_DIM: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)  # the query heads that read this kv head
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    tokens = tl.arange(0, BLOCK_SIZE)

    q = tl.load(q_ptr + row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :],
                mask=head_ok[:, None], other=0.0).to(tl.float32)  # [G, D]
    context_len = tl.load(context_lens_ptr + row)
    best = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    for index in range(tl.cdiv(context_len, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + row * stride_table_row + index).to(tl.int64)
        # int64 throughout: in head-major storage one head's stride is a whole layer's blocks, and
        # kv_head * that overflows int32 once a layer's keys pass ~2^31 elements (a few GiB: a small model
        # with an automatic KV budget on a large GPU).
        offsets = (block * stride_cache_block + tokens[:, None] * stride_cache_token
                   + kv_head.to(tl.int64) * stride_cache_head + dims[None, :])
        valid = index * BLOCK_SIZE + tokens < context_len
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)  # [B, D]
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, B]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        rescale = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best[:, None])
        total = total * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
        best = new_best
    out = acc / total[:, None]
    tl.store(out_ptr + row * stride_out_row + heads[:, None] * stride_out_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of each row's one query over its first `context_lens[r]` cached tokens; `[R, q_heads, D]`.

    Every row must have at least one token of context; block-table entries past a row's last block are
    never read.
    """
    rows, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = key_cache.shape
    if key_cache.stride() != value_cache.stride() or key_cache.stride(3) != 1:
        raise ValueError("the kernel reads keys and values through one set of strides, with head_dim contiguous")
    group = q_heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    if rows == 0:
        return out
    _paged_decode_kernel[(rows, kv_heads)](
        q, key_cache, value_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_SIZE=block_size, HEAD_DIM=head_dim)
    return out
