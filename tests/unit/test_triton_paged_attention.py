"""The Triton paged decode kernel (CUDA's decode attention); without a GPU, run by Triton's interpreter."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton ships with PyTorch's CUDA builds; install it to run this")


@pytest.fixture(scope="module")
def kernel():
    if torch.cuda.is_available():
        yield importlib.import_module("serve_app.layers.triton_paged_attention")
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("without a GPU the kernel needs TRITON_INTERPRET=1, set by tests/conftest.py before Triton loads")
    from triton.runtime import interpreter

    # Triton 3.6's interpreter turns a loop bound into an int with int(array of shape (1,)), which NumPy 2.4
    # refuses; a compiled kernel never takes that path. Read the one element instead, for these tests only.
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    try:
        yield importlib.import_module("serve_app.layers.triton_paged_attention")
    finally:
        interpreter._patch_lang_tensor = patch_tensor


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query `[Hq, D]` over `[L, Hk, D]` keys and values, in float64."""
    group = q.shape[0] // keys.shape[1]
    keys, values = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    weights = (torch.einsum("hd,lhd->hl", q.double(), keys) * scale).softmax(-1)
    return torch.einsum("hl,lhd->hd", weights, values)


@pytest.mark.parametrize(("q_heads", "kv_heads", "dtype"), [(4, 4, torch.float32), (8, 2, torch.float32),
                                                            (4, 4, torch.float16)],
                         ids=["mha", "gqa", "fp16"])
@pytest.mark.parametrize("head_major", [True, False], ids=["head-major", "token-major"])
def test_each_row_attends_over_exactly_its_own_blocks(kernel, q_heads, kv_heads, dtype, head_major):
    """Rows of 1, 15, 16, 17 and 40 tokens (inside one block, its edge, one past, several), each with its
    blocks scattered in the cache and stale entries past its last block. Head-major is `KVCache`'s own
    storage, handed to the kernel as a `[blocks, block_size, heads, D]` view (`KVCache.blocks_view`)."""
    torch.manual_seed(0)
    block_size, head_dim, num_blocks = 16, 32, 24
    if head_major:
        key_cache, value_cache = (torch.randn(kv_heads, num_blocks, block_size, head_dim).to(dtype).permute(1, 2, 0, 3)
                                  for _ in range(2))
    else:
        key_cache, value_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype) for _ in range(2))
    lengths = [1, 15, 16, 17, 40]
    order = torch.randperm(num_blocks).tolist()
    tables = torch.tensor([order[3 * r:3 * r + 3] + [order[-1]] for r in range(len(lengths))], dtype=torch.int32)
    q = torch.randn(len(lengths), q_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = kernel.paged_decode_attention(q, key_cache, value_cache, tables, torch.tensor(lengths), scale)
    for row, length in enumerate(lengths):
        slots = [tables[row, p // block_size].item() * block_size + p % block_size for p in range(length)]
        keys = key_cache.reshape(-1, kv_heads, head_dim)[slots]
        values = value_cache.reshape(-1, kv_heads, head_dim)[slots]
        expected = _attention(q[row], keys, values, scale)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(out[row].double(), expected, atol=tolerance, rtol=tolerance)
