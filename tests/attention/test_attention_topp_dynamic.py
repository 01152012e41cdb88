"""The ``topp`` (S2O-style early stop) and ``dynamic_mask`` (Trainable Dynamic Mask) attention
routers: the executor equals the masked reference on their selection (outputs and gradients,
including the key bias and its parameters), causality, shapes, the kept estimated mass and its
monotonicity in epsilon, the prefix top-k of the bias against brute force, option validation.

Legend: B batch, H heads, Hkv kv-heads, S sequence, D model dim, Dh head dim, N blocks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sparseroute.attention import SparseAttention, masked_reference
from sparseroute.attention.routers.dynamic_mask import DynamicMaskOptions, causal_topk_keys
from sparseroute.attention.routers.topp import TopPOptions
from sparseroute.attention.selection import normalize_block_indices, selection_density

D = 32


def layer(router, *, H=4, Hkv=2, bs=4, seed=0, **opts) -> SparseAttention:
    torch.manual_seed(seed)
    return SparseAttention(D, H, Hkv, router=router, router_options=opts, block_size=bs).double()


def inputs(B=2, S=13, seed=1, scale=1.0) -> torch.Tensor:
    return scale * torch.randn(B, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def reference_bias(router, v):
    """A_h · softplus(W_h · v_s), written out independently of the router."""
    return router.A.view(1, -1, 1) * F.softplus((v * router.W.view(1, -1, 1, v.shape[-1])).sum(-1))


def check_matches_reference(attn: SparseAttention, x: torch.Tensor):
    """Executor vs masked reference on the router's selection: outputs, q/k/v gradients and,
    for dynamic_mask, the bias recomputed independently with the A and W gradients."""
    biased = attn.router.__class__.__name__ == "DynamicMaskRouter"
    B, S, _ = x.shape
    q, k, v = (t.detach().requires_grad_() for t in attn.project(x))
    y, routing = attn.router.attend(q, k, v, x, attn._execute)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    bias = reference_bias(attn.router, v2) if biased else None
    assert (routing.key_bias is not None) == biased
    ref = masked_reference(q2, k2, v2, routing.block_indices, routing.block_size, key_bias=bias)
    assert_close(y, ref)
    w = torch.randn_like(y)
    extra = [attn.router.A, attn.router.W] if biased else []
    gy = torch.autograd.grad((y * w).sum(), [q, k, v] + extra)
    gr = torch.autograd.grad((ref * w).sum(), [q2, k2, v2] + extra)
    for a, b in zip(gy, gr):
        assert_close(a, b)
    if biased:
        assert gy[3].abs().sum() > 0 and gy[4].abs().sum() > 0
    # the whole layer
    xm = x.detach().requires_grad_()
    out, routing = attn(xm)
    xr = x.detach().requires_grad_()
    qr, kr, vr = attn.project(xr)
    bias = reference_bias(attn.router, vr) if biased else None
    yr = masked_reference(qr, kr, vr, routing.block_indices, routing.block_size, key_bias=bias)
    outr = attn.o(yr.transpose(1, 2).reshape(B, S, -1))
    assert_close(out, outr)
    w = torch.randn_like(out)
    params = [xm, attn.q.weight, attn.k.weight, attn.v.weight] + extra
    g1 = torch.autograd.grad((out * w).sum(), params)
    g2 = torch.autograd.grad((outr * w).sum(), [xr] + params[1:])
    for a, b in zip(g1, g2):
        assert_close(a, b)
    return routing


SHAPES = [
    (13, 4, 4, 2),  # S not a multiple of the block size, GQA
    (3, 8, 4, 4),  # shorter than one block
    (24, 4, 4, 1),  # MQA
]


# -- topp -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S,bs,H,Hkv", SHAPES)
@pytest.mark.parametrize("opts", [{}, {"epsilon": 0.5}, {"epsilon": 0.01, "max_blocks": 2}])
def test_topp_matches_masked_reference(S, bs, H, Hkv, opts):
    r = check_matches_reference(layer("topp", H=H, Hkv=Hkv, bs=bs, **opts), inputs(S=S, scale=3.0))
    N = -(-S // bs)
    assert r.block_indices.shape[:3] == (2, Hkv, N)
    assert 1 <= r.block_indices.shape[3] <= min(N, opts.get("max_blocks", N))


def test_topp_causal():
    bs, S = 4, 32
    attn = layer("topp", bs=bs, epsilon=0.3)
    x = inputs(S=S, scale=3.0)
    y, r = attn(x)
    for t in (4, 12, 20, 28):
        x2 = x.clone()
        x2[:, t:] = torch.randn_like(x2[:, t:]) * 5
        y2, r2 = attn(x2)
        assert_close(y2[:, :t], y[:, :t])
        a = normalize_block_indices(r.block_indices)[:, :, : t // bs]
        b = normalize_block_indices(r2.block_indices)[:, :, : t // bs]
        K = max(a.shape[-1], b.shape[-1])
        assert torch.equal(F.pad(a, (0, K - a.shape[-1]), value=-1), F.pad(b, (0, K - b.shape[-1]), value=-1))


def expected_mass(q, k, bs, Hkv):
    """The estimated mass written out with loops: softmax_j(q̄·k̄_j/√Dh + log len_j), j <= n, with
    q̄ (and the own block's k̄) over the positions up to the block's first."""
    B, H, S, Dh = q.shape
    G = H // Hkv
    N = -(-S // bs)
    out = torch.zeros(B, Hkv, N, N, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            for n in range(N):
                lo = max(0, n * bs - bs + 1)  # what every query of the block can see
                qm = q[b, h * G:(h + 1) * G, lo:n * bs + 1].mean(dim=(0, 1))
                rows = min(bs, S - n * bs)
                logits = []
                for j in range(n + 1):
                    kj = k[b, h, j * bs:(j + 1) * bs] if j < n else k[b, h, lo:n * bs + 1]
                    length = kj.shape[0] if j < n else (rows + 1) / 2
                    logits.append(qm @ kj.mean(0) / math.sqrt(Dh) + math.log(length))
                out[b, h, n, : n + 1] = torch.stack(logits).softmax(0)
    return out


def test_topp_kept_mass_reaches_one_minus_epsilon_and_stops_there():
    bs, eps = 4, 0.2
    attn = layer("topp", bs=bs, epsilon=eps)
    x = inputs(S=38, scale=3.0)
    q, k, v = attn.project(x)
    mass = attn.router.block_mass(q, k)
    assert_close(mass, expected_mass(q.detach(), k.detach(), bs, 2))
    r = attn.router.route(q, k, v, x)
    idx = r.block_indices
    B, Hkv, N, _ = idx.shape
    for b in range(B):
        for h in range(Hkv):
            for n in range(N):
                kept = [j for j in idx[b, h, n].tolist() if j >= 0]
                assert kept[0] == n and len(set(kept)) == len(kept) and max(kept) <= n
                m = mass[b, h, n]
                total = float(m[kept].sum())
                assert total >= 1 - eps - 1e-12
                # the visit stops as soon as it may: without the last block, below 1 - eps
                if len(kept) > 1:
                    assert total - float(m[kept[-1]]) < 1 - eps
                # the kept past blocks are the heaviest past blocks
                rest = [j for j in range(n) if j not in kept]
                if rest and len(kept) > 1:
                    assert float(m[rest].max()) <= float(m[kept[1:]].min())
    assert float(r.stats["kept_mass"]) >= 1 - eps


def test_topp_fewer_blocks_for_larger_epsilon_and_variable_counts():
    bs = 4
    x = inputs(S=64, scale=3.0)
    prev = None
    counts_all = []
    for eps in (0.02, 0.1, 0.3, 0.6, 0.9):
        attn = layer("topp", bs=bs, epsilon=eps)
        q, k, v = attn.project(x)
        idx = normalize_block_indices(attn.router.route(q, k, v, x).block_indices)
        sel = torch.zeros(*idx.shape[:3], idx.shape[2] + 1, dtype=torch.bool)
        sel.scatter_(-1, torch.where(idx >= 0, idx, idx.shape[2]), True)
        sel = sel[..., :-1]
        counts = sel.sum(-1)
        counts_all.append(counts.sum())
        if prev is not None:
            assert (counts <= prev[0]).all()
            assert (sel <= prev[1]).all()  # nested: a larger epsilon keeps a subset
        prev = (counts, sel)
        if eps == 0.1:
            assert counts[:, :, 4:].unique().numel() > 1  # the count varies per query block
    assert counts_all[0] > counts_all[-1]


def test_topp_max_blocks_caps_the_count_and_density_estimate_is_the_maximum():
    attn = layer("topp", bs=4, epsilon=0.01, max_blocks=3)
    _, r = attn(inputs(S=40, scale=3.0))
    assert r.block_indices.shape[-1] <= 3
    assert float(r.stats["density"]) <= attn.router.density_estimate(40) + 1e-6
    assert layer("topp", bs=4).router.density_estimate(40) == 1.0
    # with a tiny epsilon every row hits the cap: the estimate is attained
    assert_close(float(r.stats["density"]), attn.router.density_estimate(40), rtol=0, atol=1e-6)


# -- dynamic_mask -----------------------------------------------------------------------------------


@pytest.mark.parametrize("S,bs,H,Hkv", SHAPES)
@pytest.mark.parametrize("window", [1, 4, 100])
def test_dynamic_mask_matches_masked_reference_with_bias_gradients(S, bs, H, Hkv, window):
    r = check_matches_reference(layer("dynamic_mask", H=H, Hkv=Hkv, bs=bs, window=window), inputs(S=S))
    assert r.block_size == 1  # token-level whatever the layer's block size
    assert r.block_indices.shape == (2, Hkv, S, min(window, S - 1) + 1)


def test_dynamic_mask_selection_is_self_plus_top_window_past_keys_by_bias():
    window = 5
    attn = layer("dynamic_mask", bs=8, window=window)
    with torch.no_grad():
        attn.router.A.copy_(torch.tensor([1.0, -2.0]))
    x = inputs(S=30)
    q, k, v = attn.project(x)
    r = attn.router.route(q, k, v, x)
    bias = reference_bias(attn.router, v).detach()
    assert_close(r.key_bias, bias)
    for b in range(2):
        for h in range(2):
            for t in range(30):
                got = [s for s in r.block_indices[b, h, t].tolist() if s >= 0]
                want = {t} | set(bias[b, h, :t].topk(min(window, t)).indices.tolist())
                assert got[0] == t and set(got) == want and len(got) == len(want)


def test_dynamic_mask_window_covering_everything_is_dense_attention_with_bias():
    attn = layer("dynamic_mask", bs=4, window=64)
    x = inputs(S=20)
    q, k, v = attn.project(x)
    y, _ = attn.router.attend(q, k, v, x, attn._execute)
    dense = torch.arange(20).view(1, 1, 20, 1).expand(2, 2, 20, 20).transpose(-1, -2).contiguous()
    ref = masked_reference(q, k, v, dense, 1, key_bias=reference_bias(attn.router, v))
    assert_close(y, ref)


@pytest.mark.parametrize("S,window,chunk", [(1, 3, 4), (7, 3, 2), (50, 6, 8), (50, 64, 16), (33, 1, 5)])
def test_causal_topk_keys_matches_brute_force(S, window, chunk):
    bias = torch.randn(2, 3, S, generator=torch.Generator().manual_seed(S))
    got = causal_topk_keys(bias, window, chunk=chunk)
    W = min(window, S - 1)
    assert got.shape == (2, 3, S, max(W, 0))
    for t in range(S):
        m = min(W, t)
        want = bias[:, :, :t].topk(m, dim=-1).indices if m else torch.zeros(2, 3, 0, dtype=torch.long)
        assert torch.equal(got[:, :, t, :m], want)
        assert (got[:, :, t, m:] == -1).all()


def test_dynamic_mask_causal_at_any_position():
    attn = layer("dynamic_mask", bs=4, window=3)
    x = inputs(S=23)
    y, r = attn(x)
    for t in (1, 5, 10, 17):
        x2 = x.clone()
        x2[:, t:] = torch.randn_like(x2[:, t:]) * 3
        y2, r2 = attn(x2)
        assert_close(y2[:, :t], y[:, :t])
        assert torch.equal(r2.block_indices[:, :, :t], r.block_indices[:, :, :t])
        assert_close(r2.key_bias[:, :, :t], r.key_bias[:, :, :t])


def test_dynamic_mask_density_estimate_is_exact():
    attn = layer("dynamic_mask", bs=4, window=3)
    _, r = attn(inputs(S=17))
    assert_close(float(selection_density(r.block_indices, 17, 1)), attn.router.density_estimate(17), rtol=0, atol=1e-6)


# -- options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "router,cls,field,value",
    [
        ("topp", TopPOptions, "epsilon", 0.0),
        ("topp", TopPOptions, "epsilon", 1.0),
        ("topp", TopPOptions, "epsilon", -0.5),
        ("topp", TopPOptions, "max_blocks", 0),
        ("dynamic_mask", DynamicMaskOptions, "window", 0),
        ("dynamic_mask", DynamicMaskOptions, "window", -3),
        ("dynamic_mask", DynamicMaskOptions, "window", 2.0),
    ],
)
def test_bad_options_name_the_field(router, cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})
    with pytest.raises(ValueError, match=field):
        SparseAttention(D, 4, 2, router=router, router_options={field: value}, block_size=4)
