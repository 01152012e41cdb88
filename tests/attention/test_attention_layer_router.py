"""Flux Attention-style layer routing: ``LayerRouter`` (contiguous sparse runs of the target
length at inference, a straight-through Gumbel-sigmoid and the target loss in training) and
``FluxAttention`` (dense SDPA or the sparse router per sample, each sample on one path only).

Legend: B batch, S sequence, D model dim, L layers, H heads, Hkv kv-heads, Dh head dim.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sparseroute.attention import SparseAttention, masked_reference
from sparseroute.attention.layer_router import (
    FluxAttention,
    LayerRouter,
    LayerRouterOptions,
    best_contiguous_run,
)

D = 32


def inputs(B=3, S=14, seed=1) -> torch.Tensor:
    return torch.randn(B, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def router(L=8, seed=0, **opts) -> LayerRouter:
    torch.manual_seed(seed)
    r = LayerRouter(L, D, **opts).double()
    torch.nn.init.normal_(r.proj.weight, std=1.0)
    return r


# -- LayerRouter ------------------------------------------------------------------------------------


def brute_force_run(logits, m):
    L = logits.shape[0]
    best = max(range(L - m + 1), key=lambda i: (float(logits[i:i + m].sum()), -i))
    out = torch.zeros(L, dtype=torch.bool)
    out[best:best + m] = True
    return out


@pytest.mark.parametrize("L,m", [(8, 4), (8, 1), (8, 8), (5, 2), (7, 0)])
def test_best_contiguous_run_matches_brute_force(L, m):
    logits = torch.randn(20, L, generator=torch.Generator().manual_seed(L * 10 + m))
    got = best_contiguous_run(logits, m)
    for b in range(20):
        if m == 0:
            assert not got[b].any()
        else:
            assert torch.equal(got[b], brute_force_run(logits[b], m))


@pytest.mark.parametrize(
    "L,target,m", [(8, 0.5, 4), (6, 1 / 3, 2), (4, 0.0, 0), (4, 1.0, 4), (5, 0.5, 3), (10, 0.25, 3)]
)
def test_inference_decisions_are_contiguous_with_the_target_count(L, target, m):
    r = router(L, target_sparse=target).eval()
    assert r.n_sparse == m
    x = inputs(B=16, seed=L)
    d = r(x)
    assert d.sparse_BL.shape == (16, L) and d.sparse_BL.dtype == torch.bool
    assert (d.sparse_BL.sum(-1) == m).all()
    assert_close(float(d.stats["sparse_fraction"]), m / L)
    logits = r.proj(x.mean(1))
    for b in range(16):
        row = d.sparse_BL[b].tolist()
        runs = [k for k, _ in itertools.groupby(row) if k]
        assert len(runs) <= 1  # one contiguous run of sparse layers
        if m:
            assert torch.equal(d.sparse_BL[b], brute_force_run(logits[b].detach(), m))
    assert (d.gate_BL == 1).all() and not d.gate_BL.requires_grad
    # decisions differ between sequences (the router looks at the input)
    if 0 < m < L:
        assert d.sparse_BL.unique(dim=0).shape[0] > 1


def test_training_gate_is_one_forward_and_carries_the_router_gradient():
    r = router(6, noise=False, temperature=0.5).train()
    x = inputs(B=4)
    d = r(x)
    logits = r.proj(x.mean(1))
    assert torch.equal(d.sparse_BL, logits > 0)  # no noise: sigmoid(z / tau) > 0.5
    assert_close(d.gate_BL, torch.ones_like(d.gate_BL))
    (g,) = torch.autograd.grad(d.gate_BL.sum(), [r.proj.weight])
    assert g.abs().sum() > 0
    # the gate's gradient is ±d sigmoid(z / tau): + for sparse, - for dense
    z = logits.detach().requires_grad_()
    soft = (z / 0.5).sigmoid()
    want = torch.where(d.sparse_BL, soft, 1 - soft).sum()
    (gz,) = torch.autograd.grad(want, [z])
    d2 = r(x)
    (gl,) = torch.autograd.grad(d2.gate_BL.sum(), [r.proj.bias])
    assert_close(gl, gz.sum(0))


def test_training_noise_is_stochastic_and_the_fraction_follows_the_probabilities():
    r = router(8).train()
    with torch.no_grad():
        r.proj.weight.zero_()
        r.proj.bias.fill_(1.0)  # p = sigmoid(1) ≈ 0.73 for every layer
    x = inputs(B=256)
    torch.manual_seed(0)
    a = r(x).sparse_BL
    b = r(x).sparse_BL
    assert not torch.equal(a, b)
    frac = a.float().mean()
    assert abs(float(frac) - torch.sigmoid(torch.tensor(1.0)).item()) < 0.05


def test_target_loss_value_and_gradient():
    r = router(8, target_sparse=0.25, loss_coef=2.0).train()
    x = inputs(B=4)
    d = r(x)
    p = r.proj(x.mean(1)).sigmoid()
    loss = d.losses["flux_target"]
    assert_close(loss, 2.0 * (p.mean() - 0.25) ** 2)
    gw, gb = torch.autograd.grad(loss, [r.proj.weight, r.proj.bias])
    assert gb.abs().sum() > 0
    # a gradient step on the loss moves the mean probability toward the target
    with torch.no_grad():
        before = float(p.mean())
        r.proj.weight -= 1.0 * gw
        r.proj.bias -= 1.0 * gb
        after = float(r.proj(x.mean(1)).sigmoid().mean())
    assert abs(after - 0.25) < abs(before - 0.25)
    assert "flux_target" in r.eval()(x).losses


@pytest.mark.parametrize(
    "field,value",
    [("target_sparse", -0.1), ("target_sparse", 1.5), ("temperature", 0.0), ("loss_coef", -1.0), ("noise", 1)],
)
def test_bad_router_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LayerRouterOptions(**{field: value})
    with pytest.raises(ValueError, match=field):
        LayerRouter(4, D, **{field: value})
    with pytest.raises(ValueError, match="n_layers"):
        LayerRouter(0, D)


# -- FluxAttention ----------------------------------------------------------------------------------


def flux(router_name="moba", H=4, Hkv=2, bs=4, **opts) -> FluxAttention:
    torch.manual_seed(0)
    return FluxAttention(SparseAttention(D, H, Hkv, router=router_name, router_options=opts, block_size=bs).double())


def dense_reference(attn: SparseAttention, x):
    """Causal attention written out: the masked reference with every past block."""
    B, S, _ = x.shape
    q, k, v = attn.project(x)
    N = -(-S // attn.block_size)
    n = torch.arange(N)
    idx = torch.where(n.view(1, N) <= n.view(N, 1), n.view(1, N), -1).expand(B, attn.n_kv_heads, N, N)
    y = masked_reference(q, k, v, idx.contiguous(), attn.block_size)
    return attn.o(y.transpose(1, 2).reshape(B, S, -1))


@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 4), (2, 1)])
def test_all_dense_is_sdpa_causal_attention(H, Hkv):
    f = flux(H=H, Hkv=Hkv, top_k=1)
    x = inputs().requires_grad_()
    y, routing = f(x, torch.zeros(3, dtype=torch.bool))
    assert routing is None
    x2 = x.detach().requires_grad_()
    ref = dense_reference(f.attention, x2)
    assert_close(y, ref)
    w = torch.randn_like(y)
    assert_close(torch.autograd.grad((y * w).sum(), x)[0], torch.autograd.grad((ref * w).sum(), x2)[0])
    # and the sparse path is really different here (top_k=1 drops blocks)
    ys, _ = f.attention(x)
    assert not torch.allclose(ys, y)


@pytest.mark.parametrize(
    "router_name,opts", [("moba", {"top_k": 1}), ("topp", {"epsilon": 0.5}), ("dynamic_mask", {"window": 3})]
)
def test_all_sparse_is_the_sparse_layer(router_name, opts):
    f = flux(router_name, **opts)
    x = inputs()
    y, routing = f(x, torch.ones(3, dtype=torch.bool))
    ys, rs = f.attention(x)
    assert_close(y, ys)
    assert torch.equal(routing.block_indices, rs.block_indices)


def test_mixed_decisions_run_each_sample_on_its_path_only(monkeypatch):
    f = flux(top_k=1)
    x = inputs(B=4)
    sparse = torch.tensor([True, False, False, True])
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kw):
        calls.append(q.shape[0])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    executed = []
    execute = f.attention._execute

    def counting_execute(q, k, v, idx, bs, **kw):
        executed.append(q.shape[0])
        return execute(q, k, v, idx, bs, **kw)

    monkeypatch.setattr(f.attention, "_execute", counting_execute)
    xg = x.clone().requires_grad_()
    y, routing = f(xg, sparse)
    assert calls == [2] and executed == [2]  # each path sees only its own samples
    assert routing.block_indices.shape[0] == 2
    ys, rs = f.attention(x[sparse])
    assert_close(y[sparse], ys)
    assert torch.equal(routing.block_indices, rs.block_indices)
    assert_close(y[~sparse], dense_reference(f.attention, x[~sparse]))
    # gradients reach every sample's input
    y.sum().backward()
    assert (xg.grad.abs().sum(dim=(1, 2)) > 0).all()


def test_gate_scales_the_output_and_passes_the_router_gradient():
    L = 3
    r = router(L, noise=False).train()
    f = flux(top_k=1)
    x = inputs(B=4)
    d = r(x)
    y, _ = f(x, d.sparse_BL[:, 1], gate_B=d.gate_BL[:, 1])
    y0, _ = f(x, d.sparse_BL[:, 1])
    assert_close(y, y0)  # the gate is 1 forward
    (g,) = torch.autograd.grad((y ** 2).sum(), [r.proj.weight])
    assert g[1].abs().sum() > 0 and g[0].abs().sum() == 0


def test_flux_attention_errors():
    f = flux()
    with pytest.raises(ValueError, match="sparse_B"):
        f(inputs(), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="sparse_B"):
        f(inputs(), torch.ones(3))
    with pytest.raises(ValueError, match="gate_B"):
        f(inputs(), torch.ones(3, dtype=torch.bool), gate_B=torch.ones(2))
    with pytest.raises(ValueError, match="attention"):
        FluxAttention(torch.nn.Linear(2, 2))
