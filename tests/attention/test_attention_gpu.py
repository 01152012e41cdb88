"""The sparse-attention executor on CUDA (marked ``gpu``; skipped where no CUDA device is
present): the compiled FlexAttention backend and the gather backend equal the masked reference on
the device, outputs and gradients, and SparseAttention runs there with ``backend="auto"``.
``benchmarks/cuda_checks.sh`` runs these with the attention benchmark on ``cuda``.

Legend: B batch, H heads, Hkv kv-heads, S sequence, Dh head dim, bs block size, N blocks, K slots.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sparseroute.attention import SparseAttention, block_sparse_attention, masked_reference

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def _inputs(B, H, Hkv, S, Dh, bs, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, Dh, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(B, Hkv, S, Dh, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(B, Hkv, S, Dh, generator=g).to(DEVICE).requires_grad_()
    N = -(-S // bs)
    idx = torch.randint(-1, N, (B, Hkv, N, K), generator=g).to(DEVICE)
    return q, k, v, idx


@pytest.mark.parametrize("backend", ["flex", "gather"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 256, 64, 64, 3), (1, 8, 2, 1000, 64, 128, 4), (1, 4, 4, 512, 32, 128, 8)])
def test_cuda_backend_equals_reference(backend, shape):
    q, k, v, idx = _inputs(*shape)
    bs = shape[5]
    out = block_sparse_attention(q, k, v, idx, bs, backend=backend)
    ref = masked_reference(q, k, v, idx, bs)
    assert_close(out, ref, atol=2e-3, rtol=2e-3)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert_close(got, want, atol=5e-3, rtol=5e-3)


def test_sparse_attention_layer_on_cuda():
    layer = SparseAttention(256, 4, 2, router="moba", router_options={"top_k": 2}, block_size=64).to(DEVICE)
    x = torch.randn(2, 512, 256, device=DEVICE, requires_grad=True)
    y, routing = layer(x)
    assert y.shape == x.shape and routing.block_indices.device.type == "cuda"
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
