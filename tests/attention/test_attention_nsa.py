"""The ``nsa`` attention router: the three-branch output against a slow reference built from
explicit masks (outputs and gradients, float64), the selection rule against a loop, causality,
short and ragged sequences, GQA, density and option errors.

Legend: B batch, H query heads, Hkv kv-heads (G = H / Hkv), S sequence, Dh head dim, D model dim,
bs block size, N blocks, lc compression length, Nc complete compressed blocks.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sparseroute.attention import SparseAttention, build_attention_router
from sparseroute.attention.routers.nsa import compressed_attention
from sparseroute.attention.selection import block_mask

D = 32


def build(H=4, Hkv=2, bs=4, seed=0, **options) -> SparseAttention:
    torch.manual_seed(seed)
    return SparseAttention(D, H, Hkv, router="nsa", router_options=options, block_size=bs).double()


def inputs(B, S, seed=1):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def leaf_qkv(attn, x):
    with torch.no_grad():
        q, k, v = attn.project(x)
    return [t.clone().requires_grad_(True) for t in (q, k, v)]


def masked_attention(q, k, v, mask_BHTS):
    """softmax over the allowed keys (mask [B or 1, Hkv or 1, T, S'] per kv-head), rows with no
    allowed key 0; GQA by repeating k/v per group."""
    G = q.shape[1] // k.shape[1]
    mask = mask_BHTS.expand(q.shape[0], k.shape[1], *mask_BHTS.shape[2:]).repeat_interleave(G, dim=1)
    s = q @ k.repeat_interleave(G, dim=1).transpose(-1, -2) * q.shape[-1] ** -0.5
    any_ = mask.any(-1, keepdim=True)
    p = torch.where(mask, s, -1e300).softmax(-1) * any_
    return p @ v.repeat_interleave(G, dim=1)


def slow_nsa(router, q, k, v, x, sel_BHNK):
    """The three branches with explicit masks, mixed by the router's gates (recomputed here)."""
    B, H, S, Dh = q.shape
    bs, lc, W = router.block_size, router.compress_block, router.options.window_blocks
    pos = torch.arange(S)
    # compressed: loop means over the complete blocks; block c read when it ends at or before t
    Nc = S // lc
    if Nc:
        kc = torch.stack([k[:, :, c * lc:(c + 1) * lc].mean(2) for c in range(Nc)], 2)
        vc = torch.stack([v[:, :, c * lc:(c + 1) * lc].mean(2) for c in range(Nc)], 2)
        cmp_TC = torch.tensor([[(c + 1) * lc - 1 <= t for c in range(Nc)] for t in range(S)])
        o_cmp = masked_attention(q, kc, vc, cmp_TC.view(1, 1, S, Nc))
    else:
        o_cmp = torch.zeros_like(q)
    # selected: key s read by t when s <= t and block(s) is named for block(t)
    sel = torch.zeros(B, k.shape[1], S, S, dtype=torch.bool)
    for b in range(B):
        for h in range(k.shape[1]):
            for t in range(S):
                blocks = set(sel_BHNK[b, h, t // bs].tolist())
                for s in range(t + 1):
                    sel[b, h, t, s] = (s // bs) in blocks
    o_sel = masked_attention(q, k, v, sel)
    win_TS = (pos.view(1, -1) <= pos.view(-1, 1)) & (pos.view(-1, 1) // bs - pos.view(1, -1) // bs < W)
    o_win = masked_attention(q, k, v, win_TS.view(1, 1, S, S))
    lin = router.gate
    g = torch.sigmoid(x @ lin.weight.t() + lin.bias).view(B, S, 3, H).permute(2, 0, 3, 1).unsqueeze(-1)
    return g[0] * o_cmp + g[1] * o_sel + g[2] * o_win


CASES = [
    # (H, Hkv, bs, S, options)
    (4, 2, 4, 24, {"top_n": 3}),  # GQA, selection narrower than the past
    (4, 4, 4, 13, {"top_n": 2, "window_blocks": 1}),  # S not a multiple of bs
    (4, 1, 4, 3, {}),  # S shorter than one block: no compressed block at all
    (4, 2, 4, 14, {"top_n": 9}),  # top_n larger than the number of blocks
    (4, 2, 4, 22, {"top_n": 3, "compress_block": 2}),  # compression finer than selection
    (4, 2, 2, 17, {"top_n": 3, "compress_block": 3, "window_blocks": 3}),  # blocks not aligned
]


@pytest.mark.parametrize("H,Hkv,bs,S,options", CASES)
def test_nsa_matches_the_slow_three_branch_reference_outputs_and_gradients(H, Hkv, bs, S, options):
    attn = build(H, Hkv, bs, **options)
    router = attn.router
    x = inputs(2, S).requires_grad_(True)
    q, k, v = leaf_qkv(attn, x)
    g_out = torch.randn(2, H, S, D // H, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    y, routing = router.attend(q, k, v, x, attn._execute)
    N = -(-S // bs)
    assert routing.block_size == bs and routing.block_indices.shape == (2, Hkv, N, min(options.get("top_n", 4), N))
    (y * g_out).sum().backward()
    got = [t.grad.clone() for t in (q, k, v, x)] + [router.gate.weight.grad.clone()]
    for t in (q, k, v, x):
        t.grad = None
    router.gate.weight.grad = None

    ref = slow_nsa(router, q, k, v, x, routing.block_indices)
    (ref * g_out).sum().backward()
    want = [t.grad for t in (q, k, v, x)] + [router.gate.weight.grad]
    assert_close(y, ref)
    for a, b in zip(got, want):
        assert_close(a, b)
    assert float(got[-1].abs().max()) > 0  # the gates train
    # the module's output is the output projection of the same thing
    with torch.no_grad():
        out, r2 = attn(x)
        assert torch.equal(r2.block_indices, routing.block_indices)
        assert_close(out, attn.o(ref.transpose(1, 2).reshape(2, S, -1)))


def loop_importance(router, q, k, v, S):
    """[B, Hkv, N, N]: compressed probabilities (loop softmax) averaged over the queries every
    query of the block can see (positions n·bs - bs + 1 .. n·bs) and summed over the group's
    heads, carried to selection blocks by positional overlap."""
    B, H, _, Dh = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    bs, lc = router.block_size, router.compress_block
    N, Nc = -(-S // bs), S // lc
    imp = torch.zeros(B, Hkv, N, N, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for n in range(N):
                window = range(max(0, n * bs - bs + 1), n * bs + 1)
                for t in window:
                    cs = [c for c in range(Nc) if (c + 1) * lc - 1 <= t]
                    if not cs:
                        continue
                    logits = torch.stack([q[b, h, t] @ k[b, h // G, c * lc:(c + 1) * lc].mean(0) * Dh**-0.5 for c in cs])
                    p = logits.softmax(0)
                    for c, pc in zip(cs, p):
                        for s in range(c * lc, (c + 1) * lc):
                            imp[b, h // G, n, s // bs] += pc / lc / len(window)
    return imp


@pytest.mark.parametrize("bs,lc,S,top_n", [(4, 4, 26, 3), (4, 2, 21, 4), (2, 3, 15, 3)])
def test_nsa_selection_keeps_block_0_the_own_block_and_the_heaviest_compressed_blocks(bs, lc, S, top_n):
    attn = build(4, 2, bs, seed=3, top_n=top_n, compress_block=lc)
    x = inputs(2, S, seed=4)
    with torch.no_grad():
        q, k, v = attn.project(x)
        routing = attn.router.route(q, k, v, x)
    imp = loop_importance(attn.router, q, k, v, S)
    N = -(-S // bs)
    idx = routing.block_indices
    narrower = False
    for b in range(2):
        for h in range(2):
            for n in range(N):
                chosen = [j for j in idx[b, h, n].tolist() if j >= 0]
                assert len(chosen) == len(set(chosen)) == min(top_n, n + 1)
                assert 0 in chosen and n in chosen and max(chosen) <= n
                free = [j for j in chosen if j not in (0, n)]
                rest = [j for j in range(n + 1) if j not in chosen]
                narrower |= bool(rest)
                if free and rest:
                    assert min(float(imp[b, h, n, j]) for j in free) >= max(float(imp[b, h, n, j]) for j in rest) - 1e-9
    assert narrower  # the case exercises a real choice


def test_compressed_branch_reads_only_blocks_that_ended():
    """Query t reads compressed block c iff (c+1)·lc - 1 <= t; before the first block ends, zero."""
    B, H, S, Dh, lc = 1, 2, 10, 4, 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, Dh, generator=g, dtype=torch.float64) for _ in range(3))
    out, p = compressed_attention(q, k, v, lc)
    assert p.shape == (B, H, S, S // lc)
    assert bool((out[:, :, : lc - 1] == 0).all()) and bool((p[:, :, : lc - 1] == 0).all())
    for t in range(S):
        readable = [(c + 1) * lc - 1 <= t for c in range(S // lc)]
        assert [bool(x) for x in (p[0, 0, t] > 0)] == readable
    # the last (partial) block's keys never reach any output
    v2 = v.clone()
    v2[:, :, (S // lc) * lc:] += 5.0
    assert torch.equal(compressed_attention(q, k, v2, lc)[0], out)


@pytest.mark.parametrize("S,t", [(20, 8), (18, 12), (9, 4)])
def test_nsa_is_causal_at_block_granularity(S, t):
    """Changing positions >= t (t at a block start) changes no output before t and no selection of
    a query block before t."""
    attn = build(4, 2, 4, seed=5, top_n=2)
    x = inputs(2, S, seed=6)
    x2 = x.clone()
    x2[:, t:] = torch.randn(2, S - t, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        y, r = attn(x)
        y2, r2 = attn(x2)
    assert_close(y[:, :t], y2[:, :t], rtol=0, atol=1e-12)
    assert torch.equal(r.block_indices[:, :, : t // 4], r2.block_indices[:, :, : t // 4])
    assert not torch.allclose(y[:, t:], y2[:, t:])  # the perturbation is seen after t


def test_nsa_density_estimate_counts_the_three_branches():
    S, bs, lc, top_n, W = 80, 4, 3, 3, 2
    attn = build(4, 2, bs, top_n=top_n, compress_block=lc, window_blocks=W)
    x = inputs(1, S)
    with torch.no_grad():
        q, k, v = attn.project(x)
        routing = attn.router.route(q, k, v, x)
    pos = torch.arange(S)
    sel = int(block_mask(routing.block_indices, S, bs)[0, 0].sum())
    win = int(((pos.view(1, -1) <= pos.view(-1, 1)) & (pos.view(-1, 1) // bs - pos.view(1, -1) // bs < W)).sum())
    cmp = sum(sum((c + 1) * lc - 1 <= t for c in range(S // lc)) for t in range(S))
    assert (sel + win + cmp) / (S * (S + 1) / 2) < 1
    assert attn.router.density_estimate(S) == pytest.approx((sel + win + cmp) / (S * (S + 1) / 2))
    # at a short sequence the branches together exceed dense attention: capped at 1
    assert attn.router.density_estimate(6) == 1.0


def test_nsa_stats_and_float32_forward_backward():
    torch.manual_seed(0)
    attn = SparseAttention(D, 4, 2, router="nsa", block_size=8)
    x = torch.randn(2, 40, D, requires_grad=True)
    y, routing = attn(x)
    y.square().sum().backward()
    for key in ("density", "blocks_per_query", "recall", "mass", "gate_cmp", "gate_sel", "gate_win"):
        assert key in routing.stats and bool(torch.isfinite(routing.stats[key]))
    assert float(routing.stats["blocks_per_query"]) < 5  # top_n = 4 at most
    for name, prm in attn.named_parameters():
        assert prm.grad is not None and bool(torch.isfinite(prm.grad).all()), name


@pytest.mark.parametrize(
    "options,field",
    [
        ({"top_n": 0}, "top_n"),
        ({"top_n": 1}, "top_n"),
        ({"top_n": 2.5}, "top_n"),
        ({"window_blocks": 0}, "window_blocks"),
        ({"compress_block": 0}, "compress_block"),
        ({"stats": "yes"}, "stats"),
        ({"top_k": 3}, "top_k"),  # an option of another router
    ],
)
def test_nsa_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        build_attention_router("nsa", d_model=D, n_heads=4, n_kv_heads=2, head_dim=8, block_size=4, options=options)
