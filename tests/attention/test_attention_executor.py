"""The block-sparse attention executor and its contract: every backend equals the masked
reference (outputs and q/k/v/key_bias gradients) on awkward shapes; all blocks selected equals
causal SDPA; the selection's normalisation, density and recall; SparseAttention with the dense,
window and moba routers (reference equality and causality); bad configuration names its field.

Legend: B batch, H heads, Hkv kv-heads, S sequence, Dh head dim, bs block size, N blocks, K slots.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sparseroute.attention import (
    ATTENTION_ROUTERS,
    SparseAttention,
    block_mask,
    block_sparse_attention,
    masked_reference,
    selection_density,
)
from sparseroute.attention.selection import normalize_block_indices, selection_recall
from sparseroute.kernels import ops

# (B, H, Hkv, S, Dh, bs, K)
SHAPES = [
    (2, 4, 2, 37, 8, 8, 3),  # GQA, S not a multiple of bs
    (1, 2, 2, 5, 4, 8, 2),  # S shorter than one block
    (1, 3, 1, 20, 4, 1, 5),  # token level (bs = 1), GQA of 3
    (2, 2, 1, 64, 8, 16, 10),  # K larger than the number of blocks
    (1, 2, 2, 33, 6, 4, 1),  # one slot
]


def _backend(name: str) -> str:
    if name == "kernel" and not ops.available():
        if os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1":
            pytest.skip("compiled kernels disabled by SPARSEROUTE_NO_EXTENSIONS=1")
        raise AssertionError("the compiled kernels are not loaded (sparseroute kernels build)")
    return name


def _inputs(B, H, Hkv, S, Dh, bs, K, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, Dh, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(B, Hkv, S, Dh, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, Hkv, S, Dh, generator=g, dtype=dtype).requires_grad_()
    N = -(-S // bs)
    idx = torch.randint(-1, N, (B, Hkv, N, K), generator=g)
    bias = torch.randn(B, Hkv, S, generator=g, dtype=dtype).requires_grad_()
    return q, k, v, idx, bias


@pytest.mark.parametrize("backend", ["gather", "kernel"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_executor_equals_reference(backend, with_bias, shape):
    backend = _backend(backend)
    q, k, v, idx, bias = _inputs(*shape)
    bs = shape[5]
    kb = bias if with_bias else None
    out = block_sparse_attention(q, k, v, idx, bs, key_bias=kb, backend=backend)
    ref = masked_reference(q, k, v, idx, bs, key_bias=kb)
    assert_close(out, ref)
    grad = torch.randn_like(out)
    inputs = [q, k, v] + ([bias] if with_bias else [])
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        assert_close(got, want)


@pytest.mark.parametrize("backend", ["gather", "kernel"])
def test_executor_float32_with_chunks(backend, monkeypatch):
    """float32, several chunks of query blocks (the gather path's chunking) and a longer S."""
    backend = _backend(backend)
    from sparseroute.attention import executor

    monkeypatch.setattr(executor, "CHUNK_ELEMENTS", 4096)
    q, k, v, idx, _ = _inputs(2, 4, 2, 300, 16, 16, 4, dtype=torch.float32)
    out = block_sparse_attention(q, k, v, idx, 16, backend=backend)
    ref = masked_reference(q, k, v, idx, 16)
    assert_close(out, ref, atol=2e-5, rtol=1e-4)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_flex_conversion_equals_reference():
    """The FlexAttention BlockMask of a selection (eager flex_attention on the CPU evaluates the
    same mask function the compiled kernel uses in partial blocks) gives the reference output."""
    from sparseroute.attention.flex import flex_block_sparse_attention, selection_to_block_mask

    q, k, v, idx, _ = _inputs(2, 4, 2, 40, 8, 8, 3, dtype=torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()  # FlexAttention has no CPU backward
    with torch.no_grad():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = flex_block_sparse_attention(q, k, v, idx, 8, compiled=False)
        assert_close(out, masked_reference(q, k, v, idx, 8), atol=1e-5, rtol=1e-5)
    # the block structure itself: full blocks are the selected past ones, partial the own
    mask = selection_to_block_mask(idx, 40, 8, 4)
    dense_blocks = mask.to_dense()  # [B, H, N, N]
    sel = normalize_block_indices(idx).repeat_interleave(2, dim=1)
    want = torch.zeros_like(dense_blocks, dtype=torch.bool)
    for b in range(2):
        for h in range(4):
            for n in range(5):
                for j in sel[b, h, n].tolist():
                    if j >= 0:
                        want[b, h, n, j] = True
    assert torch.equal(dense_blocks.bool(), want)


@pytest.mark.parametrize("backend", ["gather", "kernel"])
@pytest.mark.parametrize("S,bs", [(100, 16), (64, 64), (7, 4)])
def test_all_blocks_equal_sdpa(backend, S, bs):
    backend = _backend(backend)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, S, 16, generator=g).requires_grad_() for _ in range(3))
    N = -(-S // bs)
    idx = torch.arange(N).expand(2, 4, N, N).contiguous()
    out = block_sparse_attention(q, k, v, idx, bs, backend=backend)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["gather", "kernel", "reference"])
def test_future_blocks_duplicates_and_empty_rows(backend):
    """A selected future block is never read, a block named twice counts once, and a query block
    that reads nothing gets zeros and passes no gradient."""
    backend = _backend(backend)
    q, k, v, _, _ = _inputs(1, 2, 2, 32, 4, 8, 3)
    # block 0 reads nothing (only future blocks), block 1 reads block 0 twice, 2 reads itself
    # plus the future block 3, block 3 reads blocks 1 and 3
    idx = torch.tensor([[3, 2, -1], [0, 0, -1], [3, 2, -1], [1, 3, 1]]).expand(1, 2, 4, 3).contiguous()
    clean = torch.tensor([[-1, -1, -1], [0, -1, -1], [2, -1, -1], [1, 3, -1]]).expand(1, 2, 4, 3).contiguous()
    assert torch.equal(normalize_block_indices(idx), clean)
    out = block_sparse_attention(q, k, v, idx, 8, backend=backend)
    assert_close(out, masked_reference(q, k, v, clean, 8))
    assert torch.all(out[:, :, :8] == 0)
    out.sum().backward()
    assert torch.all(q.grad[:, :, :8] == 0)
    # keys of block 2 are read only by block 2 itself: their gradient is not zero
    assert k.grad[:, :, 16:24].abs().sum() > 0


def test_normalize_sorts_and_puts_unused_last():
    idx = torch.tensor([[[[2, 0, 2, -1, 1]] * 3]])  # [1, 1, 3, 5]
    out = normalize_block_indices(idx)
    assert out[0, 0].tolist() == [[0, -1, -1, -1, -1], [0, 1, -1, -1, -1], [0, 1, 2, -1, -1]]


def test_density_counts_the_mask_exactly():
    g = torch.Generator().manual_seed(3)
    for S, bs in [(37, 8), (64, 16), (5, 8), (20, 1)]:
        N = -(-S // bs)
        idx = torch.randint(-1, N, (2, 3, N, 4), generator=g)
        mask = block_mask(idx, S, bs)
        want = mask.double().sum(dim=(-1, -2)) / (S * (S + 1) / 2)
        assert_close(selection_density(idx, S, bs), want.mean().float())


def test_recall_and_mass():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    N = 8
    dense = torch.arange(N).expand(1, 2, N, N).contiguous()
    r, m = selection_recall(q, k, dense, 8)
    assert r.item() == pytest.approx(1.0) and m.item() == pytest.approx(1.0)
    own = torch.arange(N).view(1, 1, N, 1).expand(1, 2, N, 1).contiguous()
    r1, m1 = selection_recall(q, k, own, 8)
    assert 0 < m1.item() < 1
    # the best single block by dense attention mass gives recall 1 with one block
    p = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~torch.ones(64, 64, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    mass_blocks = p.view(1, 2, N, 8, N, 8).sum(dim=(3, 5))  # [1, 2, N(query), N(key)]
    best = mass_blocks.argmax(-1, keepdim=True)
    r2, m2 = selection_recall(q, k, best, 8)
    assert r2.item() == pytest.approx(1.0)
    assert m2.item() >= m1.item() - 1e-6


# -- SparseAttention with the built-in routers -------------------------------------------------


ROUTER_CASES = [
    ("dense", {}),
    ("window", {"window": 2}),
    ("window", {"window": 1, "sink": True}),
    ("moba", {"top_k": 2}),
    ("moba", {"top_k": 1, "key_conv": 3}),
    ("moba", {"top_k": 10}),  # more than the past blocks
]


def _layer(router, options, *, bs=8, H=4, Hkv=2, seed=0):
    torch.manual_seed(seed)
    layer = SparseAttention(32, H, Hkv, router=router, router_options=options, block_size=bs).double()
    if router == "moba" and options.get("key_conv"):
        with torch.no_grad():  # a non-zero convolution, so that it matters
            layer.router.key_conv.normal_(std=0.3)
    return layer


@pytest.mark.parametrize("router,options", ROUTER_CASES, ids=[f"{r}-{o}" for r, o in ROUTER_CASES])
@pytest.mark.parametrize("S", [5, 37])
def test_router_through_layer_equals_reference(router, options, S):
    layer = _layer(router, options)
    x = torch.randn(2, S, 32, dtype=torch.float64, requires_grad=True)
    y, routing = layer(x)
    q, k, v = layer.project(x)
    if router == "moba":
        k = layer.router.convolve_keys(k)
    ref = masked_reference(q, k, v, routing.block_indices, routing.block_size)
    y_ref = layer.o(ref.transpose(1, 2).reshape(2, S, -1))
    assert_close(y, y_ref)
    gx, gy = torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(y_ref.sum(), x)[0]
    assert_close(gx, gy)
    assert 0 < routing.stats["density"].item() <= 1.0
    assert 0 <= routing.stats["recall"].item() <= 1.0


@pytest.mark.parametrize("router,options", ROUTER_CASES, ids=[f"{r}-{o}" for r, o in ROUTER_CASES])
def test_router_causality(router, options):
    """Changing tokens at positions >= t changes no output and no selection before t."""
    layer = _layer(router, options)
    S, t = 40, 21
    x = torch.randn(1, S, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, t:] = torch.randn(1, S - t, 32, dtype=torch.float64)
    with torch.no_grad():
        y1, r1 = layer(x)
        y2, r2 = layer(x2)
    assert_close(y1[:, :t], y2[:, :t])
    assert not torch.allclose(y1[:, t:], y2[:, t:])
    bs = r1.block_size
    full_blocks = t // bs  # query blocks entirely before t
    assert torch.equal(r1.block_indices[:, :, :full_blocks], r2.block_indices[:, :, :full_blocks])
    n = torch.arange(r1.block_indices.shape[2]).view(-1, 1)
    assert torch.all(r1.block_indices <= n)  # never a future block


def test_moba_keeps_own_block_and_top_k():
    layer = _layer("moba", {"top_k": 2}, bs=4, H=2, Hkv=2)
    x = torch.randn(1, 32, 32, dtype=torch.float64)
    _, routing = layer(x)
    idx = routing.block_indices[0, 0]  # [N, 3]
    for n in range(idx.shape[0]):
        row = [j for j in idx[n].tolist() if j >= 0]
        assert n in row
        assert len(row) == min(n, 2) + 1


def test_window_and_sink_blocks():
    layer = _layer("window", {"window": 2, "sink": True}, bs=4, H=2, Hkv=2)
    _, routing = layer(torch.randn(1, 24, 32, dtype=torch.float64))
    got = [sorted({j for j in row if j >= 0}) for row in routing.block_indices[0, 0].tolist()]
    assert got == [[0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 5]]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=-3), "block_size"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(n_heads=5), "n_heads"),
        (dict(router="nope"), "nope"),
        (dict(router="moba", router_options={"top_k": 0}), "top_k"),
        (dict(router="moba", router_options={"topk": 3}), "topk"),
        (dict(router="window", router_options={"window": 0}), "window"),
        (dict(backend="fast"), "backend"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, field):
    args = dict(d_model=32, n_heads=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        SparseAttention(**args)


def test_bad_executor_inputs_name_the_argument():
    q, k, v, idx, _ = _inputs(1, 4, 2, 16, 4, 4, 2)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, k, v, idx, 0)
    with pytest.raises(ValueError, match="block_indices"):
        block_sparse_attention(q, k, v, idx[:, :, :2], 4)
    with pytest.raises(ValueError, match="block_indices"):
        block_sparse_attention(q, k, v, idx + 10, 4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        block_sparse_attention(q[:, :3], k, v, idx, 4)
    with pytest.raises(ValueError, match="key_bias"):
        block_sparse_attention(q, k, v, idx, 4, key_bias=torch.zeros(1, 2, 15))
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, v, idx, 4, backend="nope")


def test_registry_lists_the_routers():
    for name in ("dense", "window", "moba"):
        assert name in ATTENTION_ROUTERS


def test_kernel_op_passes_opcheck():
    _backend("kernel")
    q, k, v, idx, bias = _inputs(1, 4, 2, 24, 8, 8, 2)
    norm = normalize_block_indices(idx)
    for kb in (None, bias):
        torch.library.opcheck(torch.ops.sparseroute.block_attention, (q, k, v, norm, kb, 8, 0.3))


# options that make each router's selection depend on the data at these sizes
DATA_DEPENDENT = {
    "moba": {"top_k": 1},
    "nsa": {"top_n": 2},
    "indexer": {"top_k": 4},
    "misa": {"top_k": 4},
    "dynamic_mask": {"window": 4},
    "kmeans": {},
    "topp": {},
}


@pytest.mark.parametrize("router", [n for n in ATTENTION_ROUTERS.names() if ATTENTION_ROUTERS.get(n).causal])
@pytest.mark.parametrize("t", [8, 13, 21, 39])
def test_every_causal_router_is_causal_at_any_position(router, t):
    """Perturbing tokens at positions >= t (at a block start or inside a block) changes no output
    and no selection of a query before t, through SparseAttention, for every registered causal
    router."""
    torch.manual_seed(0)
    layer = SparseAttention(32, 4, 2, router=router, router_options=DATA_DEPENDENT.get(router, {}), block_size=8)
    layer = layer.double().eval()
    S = 40
    x = torch.randn(2, S, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, t:] += torch.randn(2, S - t, 32, dtype=torch.float64)
    with torch.no_grad():
        y1, r1 = layer(x)
        y2, r2 = layer(x2)
    assert_close(y1[:, :t], y2[:, :t], rtol=0, atol=1e-12)
    # the selection of every query before t: compare the token masks the selections imply
    m1 = block_mask(r1.block_indices, S, r1.block_size)[:, :, :t]
    m2 = block_mask(r2.block_indices, S, r2.block_size)[:, :, :t]
    assert torch.equal(m1, m2)
