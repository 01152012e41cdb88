"""The token-level routers ``indexer`` (DSA lightning indexer) and ``misa`` (routed indexer heads):
outputs and gradients against the masked reference on their own selection (float64), the
selection against brute-force loops, the KL losses' values and where their gradients go,
causality, short sequences, GQA, the misa/indexer equivalences, and option errors.

Legend: B batch, H query heads, Hkv kv-heads, S sequence, Dh head dim, D model dim, J indexer
heads, K kept tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sparseroute.attention import SparseAttention, build_attention_router, masked_reference, selection_density
from sparseroute.attention.routers.indexer import dense_attention_distribution, top_tokens
from sparseroute.attention.routers.misa import routed_heads

D = 32


def build(router="indexer", H=4, Hkv=2, bs=4, seed=0, **options) -> SparseAttention:
    torch.manual_seed(seed)
    return SparseAttention(D, H, Hkv, router=router, router_options=options, block_size=bs).double()


def inputs(B, S, seed=1):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def leaf_qkv(attn, x):
    with torch.no_grad():
        q, k, v = attn.project(x)
    return [t.clone().requires_grad_(True) for t in (q, k, v)]


def dense_indices(B, Hkv, S):
    """Token-level dense selection [B, Hkv, S, S]."""
    n = torch.arange(S)
    return torch.where(n.view(1, S) <= n.view(S, 1), n.view(1, S), -1).expand(B, Hkv, S, S).contiguous()


def rotate(x_SD, pos):
    """RoPE by hand: pairs (i, i + Di/2) of the vector at position ``pos`` rotated by
    pos·10000^(-2i/Di)."""
    Di = x_SD.shape[-1]
    half = Di // 2
    ang = pos * 10000.0 ** (-2 * torch.arange(half, dtype=torch.float64) / Di)
    x1, x2 = x_SD[..., :half], x_SD[..., half:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)


@torch.no_grad()
def index_qkw(router, x):
    """The indexer's q [B, S, J, Di], k [B, S, Di], w [B, S, J] by hand (RoPE per position when
    the router's ``rope`` is on)."""
    J, Di = router.options.index_heads, router.options.index_dim
    q = (x @ router.index_q.weight.t()).view(*x.shape[:2], J, Di)
    k = x @ router.index_k.weight.t()
    w = x @ router.index_w.weight.t()
    if router.options.rope:
        q = torch.stack([rotate(q[:, t], t) for t in range(x.shape[1])], dim=1)
        k = torch.stack([rotate(k[:, t], t) for t in range(x.shape[1])], dim=1)
    return q, k, w


@torch.no_grad()
def loop_scores(router, x):
    """I(t, s) = Σ_j w_{t,j}·max(0, q_{t,j}·k_s) for s <= t, by loops: {(b, t): [score per s]}."""
    J = router.options.index_heads
    q, k, w = index_qkw(router, x)
    out = {}
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            out[b, t] = [sum(float(w[b, t, j]) * max(0.0, float(q[b, t, j] @ k[b, s])) for j in range(J))
                         for s in range(t + 1)]
    return out


@torch.no_grad()
def loop_dense_p(q, k):
    """Dense causal attention summed over heads, L1-normalised, by loops over heads: [B, S, S]."""
    B, H, S, Dh = q.shape
    G = H // k.shape[1]
    p = torch.zeros(B, S, S, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(S):
                p[b, t, : t + 1] += (q[b, h, t] @ k[b, h // G, : t + 1].t() * Dh**-0.5).softmax(0) / H
    return p


def selected(row_K):
    """The positions a row of indices keeps, ascending."""
    return sorted(j for j in row_K.tolist() if j >= 0)


def selected_sets(idx_BSK):
    return [[selected(row) for row in rows] for rows in idx_BSK]


ROUTERS = [
    ("indexer", {}),
    ("misa", {"index_heads": 4, "route_heads": 2, "pool_block": 3}),
    ("misa", {"index_heads": 4, "route_heads": 1, "pool_block": 4, "two_stage": True, "candidates": 6}),
]


@pytest.mark.parametrize("router,base", ROUTERS)
@pytest.mark.parametrize(
    "H,Hkv,S,top_k",
    [(4, 2, 13, 4), (4, 4, 9, 3), (4, 1, 3, 5), (4, 2, 1, 2), (4, 2, 7, 64)],
)
def test_output_and_gradients_equal_the_masked_reference_on_the_selection(router, base, H, Hkv, S, top_k):
    base = dict(base, candidates=max(base["candidates"], top_k)) if "candidates" in base else base
    attn = build(router, H, Hkv, index_dim=8, top_k=top_k, **base)
    x = inputs(2, S)
    q, k, v = leaf_qkv(attn, x)
    g_out = torch.randn(2, H, S, D // H, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y, routing = attn.router.attend(q, k, v, x, attn._execute)
    K = min(top_k, S)
    assert routing.block_size == 1 and routing.block_indices.shape == (2, Hkv, S, K)
    idx = routing.block_indices
    assert torch.equal(idx, idx[:, :1].expand_as(idx))  # the same for every kv-head
    pos = torch.arange(S).view(1, 1, S, 1)
    assert bool((idx <= pos).all())  # never a future token
    kept = (idx >= 0).sum(-1)
    assert torch.equal(kept, torch.minimum(pos.squeeze(-1) + 1, torch.tensor(K)).expand_as(kept))
    (y * g_out).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = masked_reference(q, k, v, idx, 1)
    (ref * g_out).sum().backward()
    assert_close(y, ref)
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        assert_close(a, b)
    with torch.no_grad():
        out, r2 = attn(x)
        assert torch.equal(r2.block_indices, idx)
        assert_close(out, attn.o(ref.transpose(1, 2).reshape(2, S, -1)))


@pytest.mark.parametrize("rope", [True, False])
def test_indexer_selects_exactly_the_top_k_by_the_formula(rope):
    attn = build("indexer", index_heads=3, index_dim=4, top_k=4, rope=rope)
    x = inputs(2, 11, seed=3)
    with torch.no_grad():
        q, k, v = attn.project(x)
        routing = attn.router.route(q, k, v, x)
    scores = loop_scores(attn.router, x)
    for b in range(2):
        for t in range(11):
            row = scores[b, t]
            want = sorted(sorted(range(t + 1), key=lambda s: (-row[s], -s))[:4])
            assert selected(routing.block_indices[b, 0, t]) == want, (b, t)
            # the kept scores are the k largest values (robust to rounding among near-ties)
            kept = sorted((row[s] for s in want), reverse=True)
            assert kept == pytest.approx(sorted(row, reverse=True)[:4], abs=1e-12)


def test_equal_scores_prefer_the_later_token():
    attn = build("indexer", index_heads=2, index_dim=4, top_k=3)
    with torch.no_grad():
        attn.router.index_k.weight.zero_()  # every score 0
        x = inputs(1, 8)
        q, k, v = attn.project(x)
        idx = attn.router.route(q, k, v, x).block_indices[0, 0]
    for t in range(8):
        assert sorted(j for j in idx[t].tolist() if j >= 0) == list(range(max(0, t - 2), t + 1))


def test_top_tokens_keeps_the_best_and_the_latest_among_equal_scores():
    """Integer scores (many ties), unselectable entries, columns naming shuffled positions, k
    below and above the row length: against sorting by (score, position) descending."""
    g = torch.Generator().manual_seed(0)
    X = 7
    for trial in range(60):
        k = int(torch.randint(1, 9, (1,), generator=g))
        scores = torch.randint(-2, 3, (2, 3, X), generator=g).double()
        scores[torch.rand(2, 3, X, generator=g) < 0.2] = float("-inf")
        pos = torch.stack([torch.randperm(X, generator=g) for _ in range(6)]).view(2, 3, X)
        for p in (None, pos):
            got = top_tokens(scores, k, p)
            assert got.shape == (2, 3, min(k, X))
            for b in range(2):
                for t in range(3):
                    named = list(range(X)) if p is None else p[b, t].tolist()
                    cols = [c for c in range(X) if scores[b, t, c] > float("-inf")]
                    best = sorted(cols, key=lambda c: (-float(scores[b, t, c]), -named[c]))[:k]
                    row = got[b, t].tolist()
                    n_kept = min(k, len(cols))
                    assert sorted(row[:n_kept]) == sorted(named[c] for c in best), (trial, b, t)
                    assert row[n_kept:] == [-1] * (min(k, X) - n_kept)


@pytest.mark.parametrize("router,base", ROUTERS)
def test_sparse_stage_lm_loss_never_reaches_the_indexer_and_the_kl_trains_only_it(router, base):
    attn = build(router, index_dim=8, top_k=3, **base)
    x = inputs(2, 10).requires_grad_(True)
    y, routing = attn(x)
    index_params = {n: p for n, p in attn.router.named_parameters()}
    assert set(index_params) == {"index_q.weight", "index_k.weight", "index_w.weight"}
    y.square().sum().backward(retain_graph=True)
    for n, p in index_params.items():
        assert p.grad is None, n
    for lin in (attn.q, attn.k, attn.v, attn.o):
        assert lin.weight.grad is not None and float(lin.weight.grad.abs().max()) > 0
    attn.zero_grad(set_to_none=True)
    x.grad = None
    routing.losses["indexer_kl"].backward()
    for n, p in index_params.items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().max()) > 0, n
    for lin in (attn.q, attn.k, attn.v, attn.o):
        assert lin.weight.grad is None
    assert x.grad is None


@pytest.mark.parametrize("router,base", ROUTERS)
def test_warmup_attention_is_dense_and_its_kl_is_the_full_kl(router, base):
    S, coef = 9, 0.5
    attn = build(router, bs=4, index_dim=8, top_k=3, stage="warmup", kl_coef=coef, **base)
    x = inputs(2, S, seed=2)
    q, k, v = leaf_qkv(attn, x)
    y, routing = attn.router.attend(q, k, v, x, attn._execute)
    ref = masked_reference(q, k, v, dense_indices(2, 2, S), 1)
    assert_close(y, ref)
    g = [torch.autograd.grad(t.sum(), (q, k, v)) for t in (y, ref)]
    for a, b in zip(*g):
        assert_close(a, b)
    # the returned selection is the indexer's top-k all the same
    assert routing.block_size == 1 and routing.block_indices.shape == (2, 2, S, 3)
    # KL(p_dense || softmax(I)) over all past tokens, by loops
    with torch.no_grad():
        p = loop_dense_p(q, k)
        logits = index_logits(attn.router, x, routing)
        assert_close(dense_attention_distribution(q, k), p)
        assert_close(p.sum(-1), torch.ones(2, S, dtype=torch.float64))
    want = 0.0
    for b in range(2):
        for t in range(S):
            lq = torch.tensor(logits[b, t], dtype=torch.float64).log_softmax(0)
            want += sum(float(p[b, t, s]) * (math.log(float(p[b, t, s])) - float(lq[s])) for s in range(t + 1))
    want /= 2 * S
    assert float(routing.losses["indexer_kl"].detach()) == pytest.approx(coef * want, rel=1e-6)  # RoPE tables are float32
    assert float(routing.stats["indexer_kl"]) == pytest.approx(want, rel=1e-6)


@torch.no_grad()
def index_logits(router, x, routing):
    """The score the KL trains, by loops: the full indexer's, or misa's routed heads' when it
    does not re-rank."""
    J = router.options.index_heads
    q, k, w = index_qkw(router, x)
    o = router.options
    heads = None
    if getattr(o, "route_heads", None) is not None and not o.two_stage:
        heads = routed_heads(q, k, o.pool_block, o.route_heads)
    out = {}
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            js = [j for j in range(J) if heads is None or bool(heads[b, t, j])]
            out[b, t] = [sum(float(w[b, t, j]) * max(0.0, float(q[b, t, j] @ k[b, s])) for j in js)
                         for s in range(t + 1)]
    return out


@pytest.mark.parametrize("router,base", ROUTERS)
def test_sparse_stage_kl_is_restricted_to_the_selected_tokens(router, base):
    S = 10
    attn = build(router, index_dim=8, top_k=4, **base)
    x = inputs(2, S, seed=4)
    with torch.no_grad():
        q, k, v = attn.project(x)
        routing = attn.router.route(q, k, v, x)
        p = loop_dense_p(q, k)
        logits = index_logits(attn.router, x, routing)
    want = 0.0
    for b in range(2):
        for t in range(S):
            sel = [s for s in routing.block_indices[b, 0, t].tolist() if s >= 0]
            ps = torch.tensor([float(p[b, t, s]) for s in sel], dtype=torch.float64)
            ps = ps / ps.sum()
            lq = torch.tensor([logits[b, t][s] for s in sel], dtype=torch.float64).log_softmax(0)
            want += float((ps * (ps.log() - lq)).sum())
    want /= 2 * S
    assert float(routing.losses["indexer_kl"]) == pytest.approx(want, rel=1e-6)  # RoPE tables are float32
    assert want > 0


@pytest.mark.parametrize("router,base", ROUTERS)
@pytest.mark.parametrize("t", [5, 10])
def test_perturbing_the_future_changes_nothing_before_it(router, base, t):
    S = 14
    attn = build(router, index_dim=8, top_k=4, **base)
    x = inputs(2, S, seed=5)
    x2 = x.clone()
    x2[:, t:] = torch.randn(2, S - t, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        y, r = attn(x)
        y2, r2 = attn(x2)
    assert_close(y[:, :t], y2[:, :t], rtol=0, atol=1e-12)
    assert torch.equal(r.block_indices[:, :, :t], r2.block_indices[:, :, :t])
    assert not torch.allclose(y[:, t:], y2[:, t:])


def test_misa_with_every_head_routed_is_the_indexer():
    idx_attn = build("indexer", index_heads=4, index_dim=8, top_k=5, seed=2)
    misa = build("misa", index_heads=4, route_heads=4, index_dim=8, top_k=5, pool_block=3, seed=7)
    misa.load_state_dict(idx_attn.state_dict())
    x = inputs(2, 17, seed=8)
    with torch.no_grad():
        y1, r1 = idx_attn(x)
        y2, r2 = misa(x)
    assert torch.equal(r1.block_indices, r2.block_indices)
    assert torch.equal(y1, y2)
    assert_close(r1.losses["indexer_kl"], r2.losses["indexer_kl"])


@pytest.mark.parametrize("stage", ["sparse", "warmup"])
def test_misa_two_stage_with_every_token_a_candidate_is_the_indexer(stage):
    S = 15
    idx_attn = build("indexer", index_heads=4, index_dim=8, top_k=4, seed=2, stage=stage)
    misa = build("misa", index_heads=4, route_heads=1, index_dim=8, top_k=4, pool_block=4, two_stage=True,
                 candidates=S, seed=7, stage=stage)
    misa.load_state_dict(idx_attn.state_dict())
    x = inputs(2, S, seed=8)
    with torch.no_grad():
        y1, r1 = idx_attn(x)
        y2, r2 = misa(x)
    assert selected_sets(r1.block_indices.flatten(0, 1)) == selected_sets(r2.block_indices.flatten(0, 1))
    assert_close(y1, y2)
    assert_close(r1.losses["indexer_kl"], r2.losses["indexer_kl"])


def test_misa_routes_heads_by_pooled_block_logits_and_scores_with_the_chosen_heads():
    S, pb, J, h, top_k = 13, 4, 4, 2, 3
    attn = build("misa", index_heads=J, route_heads=h, index_dim=4, top_k=top_k, pool_block=pb, seed=3)
    router = attn.router
    x = inputs(2, S, seed=9)
    with torch.no_grad():
        q, k, v = attn.project(x)
        routing = router.route(q, k, v, x)
        qi, ki, wi = index_qkw(router, x)
        heads = routed_heads(qi, ki, pb, h)
        full = build("indexer", index_heads=J, index_dim=4, top_k=top_k)
        full.load_state_dict(attn.state_dict())
        r_full = full.router.route(q, k, v, x)
    differs = False
    for b in range(2):
        for t in range(S):
            # head routing by loops: max of q·(block mean) over complete past blocks and the own
            # block's mean up to t
            start = (t // pb) * pb
            means = [ki[b, c * pb:(c + 1) * pb].mean(0) for c in range(t // pb)] + [ki[b, start:t + 1].mean(0)]
            hs = [max(float(qi[b, t, j] @ m) for m in means) for j in range(J)]
            want_heads = sorted(sorted(range(J), key=lambda j: -hs[j])[:h])
            assert [j for j in range(J) if bool(heads[b, t, j])] == want_heads, (b, t)
            row = [sum(float(wi[b, t, j]) * max(0.0, float(qi[b, t, j] @ ki[b, s])) for j in want_heads)
                   for s in range(t + 1)]
            want = sorted(sorted(range(t + 1), key=lambda s: (-row[s], -s))[:top_k])
            got = selected(routing.block_indices[b, 0, t])
            assert got == want, (b, t)
            differs |= got != selected(r_full.block_indices[b, 0, t])
    assert differs  # routing the heads changed some selection


def test_indexer_density_estimate_is_the_selection_density():
    attn = build("indexer", index_dim=8, top_k=5)
    x = inputs(1, 23)
    with torch.no_grad():
        _, routing = attn(x)
    assert attn.router.density_estimate(23) == pytest.approx(float(selection_density(routing.block_indices, 23, 1)),
                                                             rel=1e-6)
    assert float(routing.stats["density"]) == pytest.approx(attn.router.density_estimate(23), rel=1e-6)
    assert build("indexer", stage="warmup").router.density_estimate(23) == 1.0


def test_float32_forward_backward_with_stats():
    torch.manual_seed(0)
    for router, base in ROUTERS:
        attn = SparseAttention(D, 4, 2, router=router, router_options=dict(base, top_k=6), block_size=8)
        x = torch.randn(2, 40, D, requires_grad=True)
        y, routing = attn(x)
        (y.square().sum() + sum(routing.losses.values())).backward()
        for key in ("density", "recall", "mass", "indexer_kl"):
            assert bool(torch.isfinite(routing.stats[key])), (router, key)
        for name, prm in attn.named_parameters():
            assert prm.grad is not None and bool(torch.isfinite(prm.grad).all()), (router, name)


@pytest.mark.parametrize(
    "router,options,field",
    [
        ("indexer", {"top_k": 0}, "top_k"),
        ("indexer", {"index_heads": 0}, "index_heads"),
        ("indexer", {"index_dim": -1}, "index_dim"),
        ("indexer", {"stage": "dense"}, "stage"),
        ("indexer", {"kl_coef": -1.0}, "kl_coef"),
        ("indexer", {"index_dim": 5}, "index_dim"),  # odd with RoPE
        ("indexer", {"rope": "on"}, "rope"),
        ("indexer", {"route_heads": 2}, "route_heads"),  # a misa option
        ("misa", {"index_heads": 4, "route_heads": 5}, "route_heads"),
        ("misa", {"route_heads": 0}, "route_heads"),
        ("misa", {"pool_block": 0}, "pool_block"),
        ("misa", {"two_stage": True, "top_k": 8, "candidates": 7}, "candidates"),
        ("misa", {"candidates": 100}, "candidates"),
        ("misa", {"two_stage": 1}, "two_stage"),
        ("misa", {"stage": "frozen"}, "stage"),
    ],
)
def test_bad_options_name_the_field(router, options, field):
    with pytest.raises(ValueError, match=field):
        build_attention_router(router, d_model=D, n_heads=4, n_kv_heads=2, head_dim=8, block_size=4, options=options)
