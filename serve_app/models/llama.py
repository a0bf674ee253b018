"""Llama's forward pass over a paged KV cache, on the Hugging Face module tree.

The model is built by `transformers` (`from_pretrained`) and, with tensor parallelism, sharded afterwards by
DeepSpeed AutoTP (q/k/v/gate/up split by output, o_proj/down_proj/lm_head all-reduced). This file never knows
about the sharding: it calls the same submodules and reads the local head count off the weights. What it
replaces is only the attention's memory: instead of a padded per-batch cache, keys and values live in the
paged `KVCache` (`layers/attention.py`) and every step is ragged — a flat list of tokens from many
sequences, no padding.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from serve_app.layers.attention import AttentionBatch, KVCache, paged_attention


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
    out = paged_attention(q[0], k[0], v[0], kv_cache, layer_index, batch, attn.scaling)  # [Hq, T, D]
    return attn.o_proj(out.transpose(0, 1).reshape(1, num_tokens, -1))
