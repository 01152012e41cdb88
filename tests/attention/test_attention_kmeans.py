"""The ``kmeans`` attention router (Routing Transformer k-means over blocks): the executor equals
the masked reference on its selection (outputs and gradients), causality, shapes, the balanced
selection, the EMA centroid update (training only, toward the assigned points), the commitment
loss, and option validation.

Legend: B batch, H heads, Hkv kv-heads, S sequence, D model dim, Dh head dim, N blocks, C clusters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sparseroute.attention import SparseAttention, build_attention_router, masked_reference
from sparseroute.attention.routers.kmeans import KMeansOptions, KMeansRouter, pooled_unit_blocks
from sparseroute.attention.selection import normalize_block_indices

D = 32


def layer(*, H=4, Hkv=2, bs=4, seed=0, **opts) -> SparseAttention:
    torch.manual_seed(seed)
    return SparseAttention(D, H, Hkv, router="kmeans", router_options=opts, block_size=bs).double()


def inputs(B=2, S=13, seed=1) -> torch.Tensor:
    return torch.randn(B, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def check_matches_reference(attn: SparseAttention, x: torch.Tensor):
    """Through the module and through the router's attend: outputs and gradients equal the masked
    reference run on the router's own selection."""
    B, S, _ = x.shape
    # (a) q/k/v gradients of the executor
    q, k, v = (t.detach().requires_grad_() for t in attn.project(x))
    y, routing = attn.router.attend(q, k, v, x, attn._execute)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    ref = masked_reference(q2, k2, v2, routing.block_indices, routing.block_size)
    assert_close(y, ref)
    w = torch.randn_like(y)
    gy = torch.autograd.grad((y * w).sum(), (q, k, v))
    gr = torch.autograd.grad((ref * w).sum(), (q2, k2, v2))
    for a, b in zip(gy, gr):
        assert_close(a, b)
    # (b) the whole layer, gradients to the input and the projections
    xm = x.detach().requires_grad_()
    out, routing = attn(xm)
    xr = x.detach().requires_grad_()
    qr, kr, vr = attn.project(xr)
    yr = masked_reference(qr, kr, vr, routing.block_indices, routing.block_size)
    outr = attn.o(yr.transpose(1, 2).reshape(B, S, -1))
    assert_close(out, outr)
    w = torch.randn_like(out)
    params = [attn.q.weight, attn.k.weight, attn.v.weight, attn.o.weight]
    g1 = torch.autograd.grad((out * w).sum(), [xm] + params)
    g2 = torch.autograd.grad((outr * w).sum(), [xr] + params)
    for a, b in zip(g1, g2):
        assert_close(a, b)
    return routing


@pytest.mark.parametrize(
    "S,bs,H,Hkv,opts",
    [
        (13, 4, 4, 2, {}),  # S not a multiple of the block size, GQA
        (3, 8, 4, 4, {}),  # shorter than one block
        (24, 4, 4, 1, {"blocks_per_cluster": 9, "n_clusters": 2}),  # w larger than the past blocks
        (32, 4, 2, 2, {"blocks_per_cluster": 1, "n_clusters": 3}),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_matches_masked_reference_outputs_and_gradients(S, bs, H, Hkv, opts, training):
    attn = layer(H=H, Hkv=Hkv, bs=bs, **opts).train(training)
    routing = check_matches_reference(attn, inputs(S=S))
    N = -(-S // bs)
    w = attn.router.options.blocks_per_cluster
    assert routing.block_indices.shape == (2, Hkv, N, min(w + 1, N))
    assert routing.block_size == bs


def test_causal_in_eval_mode():
    bs, S = 4, 24
    attn = layer(bs=bs, n_clusters=3, blocks_per_cluster=2).eval()
    x = inputs(S=S)
    y, r = attn(x)
    for t in (4, 8, 12, 20):
        x2 = x.clone()
        x2[:, t:] = torch.randn_like(x2[:, t:]) * 3
        y2, r2 = attn(x2)
        assert_close(y2[:, :t], y[:, :t])
        assert torch.equal(r2.block_indices[:, :, : t // bs], r.block_indices[:, :, : t // bs])
        assert not torch.allclose(y2[:, t:], y[:, t:])


def test_never_selects_a_future_block_and_always_the_own_block():
    attn = layer(bs=2, n_clusters=2, blocks_per_cluster=3).eval()
    _, r = attn(inputs(S=21))
    idx = r.block_indices
    N = idx.shape[2]
    n = torch.arange(N).view(1, 1, N, 1)
    assert ((idx < 0) | (idx <= n)).all()
    assert (idx == n).any(-1).all()


def test_balanced_selection_is_the_centroids_top_w_past_blocks():
    """Each query block reads its own block and at most w past blocks: the w nearest past key
    blocks to its nearest centroid."""
    bs, w = 4, 2
    attn = layer(bs=bs, n_clusters=3, blocks_per_cluster=w).eval()
    x = inputs(S=40)
    q, k, v = attn.project(x)
    r = attn.router.route(q, k, v, x)
    qb = pooled_unit_blocks(q, attn.n_kv_heads, bs, causal=True)
    kb = pooled_unit_blocks(k, attn.n_kv_heads, bs)
    mu = attn.router.centroids.double()
    idx = normalize_block_indices(r.block_indices)
    B, Hkv, N, _ = idx.shape
    for b in range(B):
        for h in range(Hkv):
            for n in range(N):
                c = int((qb[b, h, n] @ mu[h].T).argmax())
                sim = kb[b, h, :n] @ mu[h, c]
                want = set(sim.topk(min(w, n)).indices.tolist()) | {n}
                got = set(i for i in idx[b, h, n].tolist() if i >= 0)
                assert got == want
                assert len(got - {n}) <= w


def test_centroids_move_only_in_training_and_toward_assigned_points():
    bs = 4
    attn = layer(bs=bs, n_clusters=3, decay=0.5)
    x = inputs(S=24)
    before = attn.router.centroids.clone()
    attn.eval()
    attn(x)
    assert torch.equal(attn.router.centroids, before)
    attn.train()
    with torch.no_grad():
        q, k, _ = attn.project(x)
        pts = torch.cat([pooled_unit_blocks(q, 2, bs, causal=True), pooled_unit_blocks(k, 2, bs)], dim=2)
    attn(x)
    after = attn.router.centroids
    assert not torch.equal(after, before)
    moved = 0
    for h in range(2):
        p = pts[:, h].reshape(-1, pts.shape[-1])
        a = (p @ before[h].T).argmax(-1)
        for c in range(3):
            mine = p[a == c]
            if len(mine) == 0:
                assert torch.equal(after[h, c], before[h, c])
                continue
            m = mine.mean(0)
            assert_close(after[h, c], F.normalize(0.5 * before[h, c] + 0.5 * m, dim=0))
            assert F.cosine_similarity(after[h, c], m, dim=0) > F.cosine_similarity(before[h, c], m, dim=0)
            moved += 1
    assert moved >= 2
    assert_close(after.norm(dim=-1), torch.ones(2, 3, dtype=after.dtype))


def test_commitment_loss_value_and_gradient():
    bs, coef = 4, 1e-2
    attn = layer(bs=bs, n_clusters=3, commit_coef=coef).eval()
    x = inputs(S=16)
    _, r = attn(x)
    loss = r.losses["kmeans_commit"]
    q, k, _ = attn.project(x)
    pts = torch.cat([pooled_unit_blocks(q, 2, bs, causal=True), pooled_unit_blocks(k, 2, bs)], dim=2)
    mu = attn.router.centroids.double()
    want = []
    for h in range(2):
        p = pts[:, h].reshape(-1, pts.shape[-1])
        near = mu[h][(p @ mu[h].T).argmax(-1)]
        want.append(((p - near) ** 2).sum(-1))
    assert_close(loss, coef * torch.cat(want).mean())
    gq, gk, gv = torch.autograd.grad(loss, [attn.q.weight, attn.k.weight, attn.v.weight], allow_unused=True)
    assert gq.abs().sum() > 0 and gk.abs().sum() > 0
    assert gv is None or gv.abs().sum() == 0
    _, r0 = layer(bs=bs, commit_coef=0.0)(x)
    assert "kmeans_commit" not in r0.losses


def test_centroid_init_is_seeded_and_saved():
    kw = dict(d_model=D, n_heads=4, n_kv_heads=2, head_dim=8, block_size=4)
    torch.manual_seed(0)
    a = build_attention_router("kmeans", options={"seed": 3}, **kw)
    torch.manual_seed(1)
    b = build_attention_router("kmeans", options={"seed": 3}, **kw)
    c = build_attention_router("kmeans", options={"seed": 4}, **kw)
    assert isinstance(a, KMeansRouter)
    assert torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)
    assert a.centroids.shape == (2, 4, 8)
    assert "centroids" in a.state_dict()


@pytest.mark.parametrize("S", [40, 37, 3])
def test_density_estimate_is_the_selected_density(S):
    """kmeans always fills its w past slots when there are w past blocks: the estimate is exact."""
    attn = layer(bs=4, blocks_per_cluster=2).eval()
    _, r = attn(inputs(S=S))
    assert_close(float(r.stats["density"]), attn.router.density_estimate(S), rtol=0, atol=1e-6)
    assert attn.router.density_estimate(S) < 1.0 or S <= 12


@pytest.mark.parametrize(
    "field,value",
    [("n_clusters", 0), ("n_clusters", -1), ("blocks_per_cluster", 0), ("decay", 1.0), ("decay", -0.1),
     ("commit_coef", -1e-4), ("seed", -1), ("n_clusters", 2.5)],
)
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        KMeansOptions(**{field: value})
    with pytest.raises(ValueError, match=field):
        SparseAttention(D, 4, 2, router="kmeans", router_options={field: value}, block_size=4)
