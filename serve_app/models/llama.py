"""Llama's forward pass over a paged KV cache, on the Hugging Face module tree.

The model is built by `transformers` (`from_pretrained`) and, with tensor parallelism, sharded afterwards by
DeepSpeed AutoTP (q/k/v/gate/up split by output, o_proj/down_proj/lm_head all-reduced). This file never knows
about the sharding: it calls the same submodules and reads the local head count off the weights. What it
replaces is only the attention's memory: instead of a padded per-batch cache, keys and values live in the
paged `KVCache` and every step is ragged — a flat list of tokens from many sequences, no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from serve_app.engine.kv_cache import KVCache


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
    decode_groups: list[DecodeGroup]
    causal_masks: dict[int, torch.Tensor]  # prefill rows with cached context: their offset causal mask

    @classmethod
    def build(cls, query_starts: list[int], context_lens: list[int], block_tables: torch.Tensor,
              slots: torch.Tensor, block_size: int, decode_gather_tokens: int) -> AttentionBatch:
        device = block_tables.device
        rows = [b for b in range(len(context_lens))
                if query_starts[b + 1] - query_starts[b] == 1 and context_lens[b] > 1]
        groups = []
        for group in group_decode_rows(rows, context_lens, block_size, decode_gather_tokens):
            width = -(-context_lens[group[-1]] // block_size)  # the group's longest row is its last
            lens = torch.tensor([context_lens[b] for b in group], device=device)
            groups.append(DecodeGroup(
                tokens=torch.tensor([query_starts[b] for b in group], device=device),
                blocks=block_tables[group, :width].flatten(),
                valid=(torch.arange(width * block_size, device=device)[None, :] < lens[:, None])[:, None, None, :]))
        masks = {}
        for b, context_len in enumerate(context_lens):
            query_len = query_starts[b + 1] - query_starts[b]
            if 1 < query_len:
                key_pos = torch.arange(context_len, device=device)
                query_pos = torch.arange(context_len - query_len, context_len, device=device)
                masks[b] = key_pos[None, :] <= query_pos[:, None]
        return cls(query_starts, context_lens, block_tables, slots, frozenset(rows), groups, masks)


@dataclass
class DecodeGroup:
    """Decode rows attended in one call: every row's blocks are gathered up to the group's longest row."""

    tokens: torch.Tensor  # [R] each row's token index in the step
    blocks: torch.Tensor  # [R * W] their block tables, flat, W = blocks of the group's longest row
    valid: torch.Tensor  # [R, 1, 1, W * block_size] True where a row has context


def group_decode_rows(rows: list[int], context_lens: list[int], block_size: int, max_tokens: int
                      ) -> list[list[int]]:
    """`rows`, shortest context first, cut into groups whose gather (rows x the longest row's blocks, in tokens)
    stays within `max_tokens`; a row longer than that alone is a group of its own.

    One call for every decode row would pad each row to the batch's longest: with one long conversation in a
    batch of short ones, nearly all of the gathered cache is padding, read and attended for nothing, and its
    transient memory grows with rows x the longest context (for Llama-2-7B at 64 rows x 4,096 tokens, 4 GiB a
    layer, which the KV cache had to leave free). By length, short rows share a short call.
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


def layout(model: torch.nn.Module) -> tuple[int, int, int]:
    """(num_layers, kv heads on this rank, head_dim) of a possibly-sharded Llama."""
    first = model.model.layers[0].self_attn
    head_dim = first.head_dim
    return len(model.model.layers), first.k_proj.weight.shape[0] // head_dim, head_dim


@torch.inference_mode()
def forward(model: torch.nn.Module, kv_cache: KVCache, input_ids: torch.Tensor, positions: torch.Tensor,
            batch: AttentionBatch, sample_rows: torch.Tensor) -> torch.Tensor:
    """Run one ragged step; return logits `[len(sample_rows), vocab]` for the tokens that sample."""
    decoder = model.model
    hidden = decoder.embed_tokens(input_ids).unsqueeze(0)  # [1, T, H]: HF modules expect a batch axis
    cos, sin = decoder.rotary_emb(hidden, positions.unsqueeze(0))
    for index, layer in enumerate(decoder.layers):
        residual = hidden
        hidden = layer.input_layernorm(hidden)
        hidden = _attention(layer.self_attn, index, hidden, cos, sin, kv_cache, batch)
        hidden = residual + hidden
        residual = hidden
        hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
    # Only the rows that sample need the final norm and the (large) vocabulary projection.
    hidden = decoder.norm(hidden[:, sample_rows])
    return model.lm_head(hidden)[0].float()


def _attention(attn: torch.nn.Module, layer_index: int, hidden: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, kv_cache: KVCache, batch: AttentionBatch) -> torch.Tensor:
    num_tokens = hidden.shape[1]
    head_dim = attn.head_dim
    q = attn.q_proj(hidden).view(1, num_tokens, -1, head_dim).transpose(1, 2)  # [1, Hq, T, D]
    k = attn.k_proj(hidden).view(1, num_tokens, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(hidden).view(1, num_tokens, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k, v = q[0], k[0], v[0]  # [heads, T, D]
    kv_cache.write(layer_index, batch.slots, k.transpose(0, 1), v.transpose(0, 1))

    out = torch.empty_like(q)
    gqa = q.shape[0] != k.shape[0]
    for b, context_len in enumerate(batch.context_lens):
        if b in batch.decode_rows:
            continue
        start, stop = batch.query_starts[b], batch.query_starts[b + 1]
        query_len = stop - start
        if query_len == context_len:  # the whole context is in this step: no cache read needed
            keys, values = k[:, start:stop], v[:, start:stop]
        else:
            keys, values = kv_cache.read(layer_index, batch.block_tables[b], context_len)
            keys, values = keys.transpose(0, 1), values.transpose(0, 1)
        out[:, start:stop] = F.scaled_dot_product_attention(
            q[:, start:stop], keys, values, attn_mask=batch.causal_masks.get(b), scale=attn.scaling,
            enable_gqa=gqa)

    for group in batch.decode_groups:
        _batched_decode_attention(attn, layer_index, q, out, kv_cache, group, gqa)

    attn_out = out.transpose(0, 1).reshape(1, num_tokens, -1)
    return attn.o_proj(attn_out)


def _batched_decode_attention(attn: torch.nn.Module, layer_index: int, q: torch.Tensor, out: torch.Tensor,
                              kv_cache: KVCache, group: DecodeGroup, gqa: bool) -> None:
    """One attention call for a group of single-token rows: gather their blocks, mask each past its length."""
    shape = (group.tokens.numel(), -1, kv_cache.shape.num_kv_heads, kv_cache.shape.head_dim)
    # index_select on the flat block list copies whole blocks; advanced indexing is ~3x slower on CPU.
    keys = kv_cache.keys[layer_index].index_select(0, group.blocks).view(shape).transpose(1, 2)
    values = kv_cache.values[layer_index].index_select(0, group.blocks).view(shape).transpose(1, 2)
    queries = q[:, group.tokens].transpose(0, 1).unsqueeze(2)  # [R, Hq, 1, D]
    result = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.valid,
                                            scale=attn.scaling, enable_gqa=gqa)
    out[:, group.tokens] = result.squeeze(2).transpose(0, 1)
