"""Llama's forward pass over a paged KV cache, on the Hugging Face module tree.

The model is built by `transformers` (`from_pretrained`) and, with tensor parallelism, sharded afterwards by
DeepSpeed AutoTP (q/k/v/gate/up split by output, o_proj/down_proj/lm_head all-reduced). This file never knows
about the sharding: it calls the same submodules and reads the local head count off the weights. What it
replaces is the attention's memory and the step's shape: instead of a padded per-batch cache, keys and values
live in the paged `KVCache` (`layers/attention.py`), and every step is ragged — a flat list of `[T, hidden]`
tokens from many sequences, no padding, no batch axis.

`fuse_projections` runs once on each rank's (possibly sharded) model: q/k/v become one matmul and gate/up
another, so a decoder layer dispatches 4 matmuls instead of 7. On a GPU a small decode batch is bound by the
host launching kernels, so every kernel a layer saves is time, x layers, every step. For the same reason
the norms are `F.rms_norm` (one kernel; transformers' module is seven) and the rotary embedding is applied
to queries and keys together.

On CPU the same function also stores the widening projections (q/k/v, gate/up and the vocabulary head)
input-major: the weight keeps its `[out, in]` shape but its memory is `[in, out]`, so `F.linear` hands
PyTorch's CPU matmul a contiguous `[in, out]` operand. For a small decode batch that matmul runs several
times faster against the vocabulary head than the row-major one does (`docs/benchmarks.md`), and the head is
most of a small model's decode step. Every output is the same dot product; only the order of its additions
can differ. GPUs keep the checkpoint's layout: cuBLAS reads either at the same speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve_app.layers.attention import AttentionBatch, KVCache, paged_attention


def layout(model: torch.nn.Module) -> tuple[int, int, int]:
    """(num_layers, kv heads on this rank, head_dim) of a possibly-sharded, fused Llama."""
    first = model.model.layers[0].self_attn
    return len(model.model.layers), first.qkv_sizes[1] // first.head_dim, first.head_dim


def fuse_projections(model: torch.nn.Module, input_major: bool = False) -> torch.nn.Module:
    """q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`, on this rank's shard; idempotent.

    Each output column is still the same dot product of the same weights, so the logits do not change; the
    original modules are dropped, so the weights are not held twice. `input_major` (for CPU ranks) stores
    the fused projections and the head `[in, out]` in memory (the module docstring says why).
    """
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "qkv_proj"):
            continue
        attn.qkv_sizes = (attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0])
        attn.qkv_proj = _concatenated([attn.q_proj, attn.k_proj, attn.v_proj], input_major)
        del attn.q_proj, attn.k_proj, attn.v_proj
        mlp.gate_up_proj = _concatenated([mlp.gate_proj, mlp.up_proj], input_major)
        del mlp.gate_proj, mlp.up_proj
    head = model.lm_head
    # A head tied to the embedding stays as it is: its input-major copy would hold the vocabulary twice.
    tied = head.weight is model.model.embed_tokens.weight
    if input_major and not tied and not is_input_major(head.weight):
        head.weight = torch.nn.Parameter(head.weight.detach().t().contiguous().t(), requires_grad=False)
    return model


def is_input_major(weight: torch.Tensor) -> bool:
    """Whether an `[out, in]` weight's memory is laid out `[in, out]`."""
    return weight.dim() == 2 and weight.shape[0] > 1 and weight.stride() == (1, weight.shape[0])


def _concatenated(projections: list[torch.nn.Module], input_major: bool) -> torch.nn.Linear:
    weights = [projection.weight.detach() for projection in projections]
    biases = [getattr(projection, "bias", None) for projection in projections]
    fused = torch.nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=biases[0] is not None,
                            device="meta")
    # Input-major: the concatenation of the transposes, written once, viewed back as `[out, in]`.
    weight = torch.cat([w.t() for w in weights], dim=1).t() if input_major else torch.cat(weights)
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if biases[0] is not None:
        fused.bias = torch.nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


@torch.inference_mode()
def forward(model: torch.nn.Module, kv_cache: KVCache, input_ids: torch.Tensor, positions: torch.Tensor,
            batch: AttentionBatch, sample_rows: torch.Tensor) -> torch.Tensor:
    """Run one ragged step; return logits `[len(sample_rows), vocab]` for the tokens that sample."""
    decoder = model.model
    hidden = decoder.embed_tokens(input_ids)  # [T, H]
    cos, sin = decoder.rotary_emb(hidden, positions.unsqueeze(0))  # [1, T, D]: the same for every layer
    rotary = _rotary_tables(cos[0], sin[0])
    for index, layer in enumerate(decoder.layers):
        hidden = hidden + _attention(layer.self_attn, index, _norm(layer.input_layernorm, hidden), rotary,
                                     kv_cache, batch)
        hidden = hidden + _mlp(layer.mlp, _norm(layer.post_attention_layernorm, hidden))
    # Only the rows that sample need the final norm and the (large) vocabulary projection. The lm_head is
    # called on [1, S, H]: DeepSpeed's sharded lm_head slices its input's third axis.
    hidden = _norm(decoder.norm, hidden.index_select(0, sample_rows))
    return model.lm_head(hidden[None])[0].float()


def _norm(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token `[T, 1, D]`: cos, and sin with its first half negated, so that rotating x (halves x1, x2) is
    `x * cos + cat(x2, x1) * signed_sin` — Llama's rotate_half without its negation kernel."""
    half = cos.shape[-1] // 2
    signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    return cos.unsqueeze(1), signed_sin.unsqueeze(1)


def _rotate(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, signed_sin = rotary
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin


def _attention(attn: torch.nn.Module, layer_index: int, hidden: torch.Tensor,
               rotary: tuple[torch.Tensor, torch.Tensor], kv_cache: KVCache, batch: AttentionBatch) -> torch.Tensor:
    num_tokens, head_dim = hidden.shape[0], attn.head_dim
    q_size, k_size, _ = attn.qkv_sizes
    qkv = attn.qkv_proj(hidden)  # [T, (Hq + 2 Hk) D]
    # Queries and keys rotate together: one set of kernels for both.
    qk = _rotate(qkv[:, :q_size + k_size].view(num_tokens, -1, head_dim), rotary)  # [T, Hq + Hk, D]
    q, k = qk[:, :q_size // head_dim], qk[:, q_size // head_dim:]
    v = qkv[:, q_size + k_size:].view(num_tokens, -1, head_dim)
    out = paged_attention(q, k, v, kv_cache, layer_index, batch, attn.scaling)  # [T, Hq, D]
    return attn.o_proj(out.view(num_tokens, -1))


def _mlp(mlp: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    gate, up = mlp.gate_up_proj(hidden).chunk(2, dim=-1)
    return mlp.down_proj(mlp.act_fn(gate) * up)
