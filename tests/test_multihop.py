"""Multi-hop MoE (h_{i+1} = h_i + MoE(h_i)), learned hop scalars and relative-norm halting."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sparseroute.models import TransformerLM, flops_per_token, preset
from sparseroute.moe import MoEConfig
from sparseroute.models.flops import parameter_counts
from sparseroute.moe import MoE
from sparseroute.moe.dispatch import EXECUTORS

D, F, E, K = 32, 48, 6, 2


def layer(**kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(D, F, E, K, dispatch="reference", **kw)
    with torch.no_grad():  # larger expert outputs so that hop updates are not negligible
        m.experts.w_out.mul_(1.5)
    return m


def inputs(B=3, S=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, D, generator=g)


def manual_hops(m: MoE, x, hops):
    """The definition, written out: h_{i+1} = h_i + MoE_i(h_i); output h_H - h_0."""
    ex = EXECUTORS.get("reference")
    h = x.reshape(-1, D)
    h0 = h
    for hop in range(hops):
        r = m.route(h, None, x.shape[1], hop=hop)
        d = ex(h, r, m.experts)
        if m.hop_scale is not None:
            d = d * m.hop_scale[hop]
        h = h + d
    return (h - h0).reshape(x.shape)


def same_gradients(m, x, y, x_ref, y_ref) -> tuple:
    """The gradients of (y · g) and (y_ref · g) for one random g, as to the inputs and every
    parameter of ``m``, are equal (or both absent); returns the first set (input first)."""
    g = torch.randn_like(y)
    params = list(m.parameters())
    got = torch.autograd.grad((y * g).sum(), [x, *params], allow_unused=True)
    want = torch.autograd.grad((y_ref * g).sum(), [x_ref, *params], allow_unused=True)
    for a, b in zip(got, want):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert_close(a, b, rtol=1e-5, atol=1e-4)
    return got


@pytest.mark.parametrize("router", ["topk", "cosine", "sigmoid"])
def test_one_hop_is_the_plain_layer(router):
    m = layer(router=router)
    x = inputs()
    y, r = m(x)
    # the general multi-hop path with H = 1 gives the same as the plain path
    y2, r2 = m._multi_hop(x.reshape(-1, D), None, x.shape[1], EXECUTORS.get("reference"))
    assert torch.equal(y.reshape(-1, D), y2)  # the same computation, bit for bit
    assert torch.equal(r.indices, r2.indices)
    assert_close(r2.stats["active_per_token"], r.stats["active_per_token"])


@pytest.mark.parametrize("hops, hop_routers, hop_scale", [(2, False, False), (3, True, False), (2, False, True)])
def test_multi_hop_matches_the_definition_outputs_and_gradients(hops, hop_routers, hop_scale):
    m = layer(hops=hops, hop_routers=hop_routers, hop_scale=hop_scale)
    if hop_scale:
        with torch.no_grad():
            m.hop_scale.copy_(torch.tensor([0.7, 1.3]))
    x = inputs().requires_grad_(True)
    y, r = m(x)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = manual_hops(m, x2, hops)
    assert_close(y, y_ref)
    same_gradients(m, x, y, x2, y_ref)
    assert float(r.stats["active_per_token"]) == pytest.approx(K * hops)
    assert int(r.stats["tokens_per_expert"].sum()) == x.shape[0] * x.shape[1] * K * hops
    assert -1.0 <= float(r.stats["hop_cos"]) <= 1.0
    if hop_routers:
        assert len(m.hop_routers) == hops - 1
        assert not torch.equal(m.hop_routers[0].weight, m.router.weight)


@pytest.mark.parametrize("dispatch", ["grouped", "loop", "fused", "parallel"])
def test_fast_executors_agree_on_multi_hop(dispatch):
    m = layer(hops=2)
    x = inputs().requires_grad_(True)
    y_ref, _ = m(x)
    gx_ref, = torch.autograd.grad(y_ref.square().sum(), x)
    y, _ = m(x, dispatch=dispatch)
    gx, = torch.autograd.grad(y.square().sum(), x)
    assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)


def test_halting_at_zero_is_no_halting_exactly():
    m = layer(hops=3).eval()
    x = inputs()
    y0, r0 = m(x)
    m.set_halting(0.0)
    y1, _ = m(x)
    assert torch.equal(y0, y1)
    assert float(r0.stats["halted_fraction"]) == 0.0 and float(r0.stats["hops_per_token"]) == 3.0


def test_halted_tokens_are_never_dispatched():
    m = layer(hops=2).eval()
    x = inputs(B=4, S=16)
    x_TD = x.reshape(-1, D)
    with torch.no_grad():
        full, _ = m(x)
        # hop 0 by hand: which tokens fall under the threshold
        r0 = m.route(x_TD, None, x.shape[1])
        d0 = EXECUTORS.get("reference")(x_TD, r0, m.experts)
        ratio = d0.norm(dim=-1) / x_TD.norm(dim=-1)
    tau = float(ratio.median())  # about half the tokens halt after hop 0
    rows = []
    real = m._hop_output

    def counting(h, routing, executor, hop):
        rows.append((hop, h.shape[0], int((routing.indices >= 0).sum())))
        return real(h, routing, executor, hop)

    m._hop_output = counting
    m.set_halting(tau)
    with torch.no_grad():
        y, r = m(x)
    keep = ratio >= tau
    n_keep = int(keep.sum())
    assert 0 < n_keep < x_TD.shape[0]
    assert rows == [(0, x_TD.shape[0], x_TD.shape[0] * K), (1, n_keep, n_keep * K)]
    y_TD = y.reshape(-1, D)
    assert_close(y_TD[~keep], d0[~keep])  # halted: only hop 0's update
    assert_close(y_TD[keep], full.reshape(-1, D)[keep])  # still active: the full two hops
    assert float(r.stats["active_per_token"]) == pytest.approx(K * (x_TD.shape[0] + n_keep) / x_TD.shape[0])
    assert float(r.stats["halted_fraction"]) == pytest.approx(1 - n_keep / x_TD.shape[0])
    # training mode never halts (halting is zero-shot, at inference)
    m.train()
    rows.clear()
    m(x)
    assert [n for _, n, _ in rows] == [x_TD.shape[0]] * 2


def test_learned_scalar_starts_at_the_plain_layer_and_learns():
    plain = layer()
    scaled = layer(hop_scale=True)
    x = inputs()
    assert torch.equal(plain(x)[0], scaled(x)[0])
    with torch.no_grad():
        scaled.hop_scale.fill_(0.5)
    assert_close(scaled(x)[0], 0.5 * plain(x)[0])
    y, _ = scaled(x)
    y.sum().backward()
    assert scaled.hop_scale.grad is not None and scaled.hop_scale.grad.abs().sum() > 0


def test_config_errors():
    with pytest.raises(ValueError, match="hops"):
        MoE(D, F, E, K, hops=0)
    with pytest.raises(ValueError, match="halt_threshold"):
        MoE(D, F, E, K, halt_threshold=-0.1)
    with pytest.raises(ValueError, match="hop_scale"):
        MoE(D, F, E, K, hop_scale=1)
    with pytest.raises(ValueError, match="halt_threshold"):
        MoE(D, F, E, K).set_halting(float("nan"))
    with pytest.raises(ValueError, match="hops"):
        MoEConfig(hops=0)


def test_lm_with_hops_flops_and_parameters():
    moe = MoEConfig(num_experts=4, top_k=2, hops=2, hop_routers=True)
    cfg = preset("tiny", n_layers=2, moe=moe)
    one = preset("tiny", n_layers=2, moe=MoEConfig(num_experts=4, top_k=2))
    f2, f1 = flops_per_token(cfg, 64), flops_per_token(one, 64)
    assert f2["experts"] == pytest.approx(2 * f1["experts"]) and f2["router"] == pytest.approx(2 * f1["router"])
    assert parameter_counts(cfg)["routing"] == 2 * parameter_counts(one)["routing"]
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    assert parameter_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())
    out = model(torch.randint(0, 256, (2, 16)))
    assert all(float(r.stats["active_per_token"]) == pytest.approx(4.0) for r in out.routings)
    assert all("hop_cos" in r.stats for r in out.routings)


# ---- per-hop normalisation (hop_norm) ----------------------------------------------------------


def rms_norm(h, w, eps=1e-5):
    """RMSNorm by hand: h / sqrt(mean(h²) + eps) · w."""
    return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps) * w


def manual_normed_hops(m: MoE, x, hops, norm_weights):
    """The definition of hop_norm, written out: n_0 = h_0, n_i = RMSNorm(h_i; norm_weights[i - 1])
    for i >= 1, h_{i+1} = h_i + MoE_i(n_i) (router, experts and shared experts on n_i); output h_H - h_0."""
    ex = EXECUTORS.get("reference")
    h = x.reshape(-1, D)
    h0 = h
    for hop in range(hops):
        n = h if hop == 0 else rms_norm(h, norm_weights[hop - 1])
        r = m.route(n, None, x.shape[1], hop=hop)
        d = ex(n, r, m.experts)
        if m.shared is not None:
            d = d + m.shared(n)
        if m.hop_scale is not None:
            d = d * m.hop_scale[hop]
        h = h + d
    return (h - h0).reshape(x.shape)


@pytest.mark.parametrize("hops", [2, 3])
def test_hop_norm_none_is_todays_layer(hops):
    plain = layer(hops=hops)
    none = layer(hops=hops, hop_norm="none")
    assert len(none.hop_norms) == 0
    assert none.state_dict().keys() == plain.state_dict().keys()
    x = inputs()
    y0, r0 = plain(x)
    y1, r1 = none(x)
    assert torch.equal(y0, y1)  # bit for bit
    assert torch.equal(r0.indices, r1.indices) and torch.equal(r0.stats["hop_cos"], r1.stats["hop_cos"])
    # and bit for bit the plain recursion with no norm: y = sum of MoE(h_i), h_{i+1} = h_i + MoE(h_i)
    ex = EXECUTORS.get("reference")
    h = x.reshape(-1, D)
    y = None
    for hop in range(hops):
        d = ex(h, none.route(h, None, x.shape[1], hop=hop), none.experts)
        y = d if y is None else y + d
        h = h + d
    assert torch.equal(y1, y.reshape(x.shape))


@pytest.mark.parametrize(
    "hop_norm, hops, extra",
    [
        ("shared", 2, {}),
        ("shared", 3, {}),
        ("per_hop", 2, {}),
        ("per_hop", 3, {}),
        ("per_hop", 3, {"hop_routers": True, "hop_scale": True}),
        ("shared", 2, {"num_shared_experts": 1, "router": "cosine"}),
    ],
)
def test_hop_norm_matches_the_definition_outputs_and_gradients(hop_norm, hops, extra):
    m = layer(hops=hops, hop_norm=hop_norm, **extra)
    n_norms = 1 if hop_norm == "shared" else hops - 1
    assert len(m.hop_norms) == n_norms
    with torch.no_grad():  # distinct, non-trivial norm weights
        for i, norm in enumerate(m.hop_norms):
            norm.weight.copy_(torch.linspace(0.5, 1.5, D) * (1 + 0.25 * i))
        if m.hop_scale is not None:
            m.hop_scale.copy_(torch.linspace(0.7, 1.3, hops))
    # the weights of the definition: the shared norm at every hop >= 1, or hop i's own
    weights = [m.hop_norms[0].weight] * (hops - 1) if hop_norm == "shared" else [n.weight for n in m.hop_norms]
    x = inputs().requires_grad_(True)
    y, r = m(x)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = manual_normed_hops(m, x2, hops, weights)
    assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # the norm changes the result (hop >= 1 sees a rescaled state)
    assert not torch.allclose(y, manual_hops(m, x.detach(), hops), atol=1e-3)
    got = same_gradients(m, x, y, x2, y_ref)
    # every norm weight gets a (non-zero) gradient
    named = dict(zip([n for n, _ in m.named_parameters()], got[1:]))
    for i in range(n_norms):
        gw = named[f"hop_norms.{i}.weight"]
        assert gw is not None and gw.abs().sum() > 0
    assert float(r.stats["active_per_token"]) == pytest.approx(K * hops)
    assert -1.0 <= float(r.stats["hop_cos"]) <= 1.0


def test_per_hop_norms_are_separate_and_shared_is_one():
    m = layer(hops=4, hop_norm="per_hop")
    weights = [n.weight for n in m.hop_norms]
    assert len(weights) == 3 and len({id(w) for w in weights}) == 3
    assert all(torch.equal(w, torch.ones(D)) for w in weights)  # starts as a plain RMSNorm
    x = inputs()
    y, _ = m(x)
    y.square().sum().backward()
    grads = [w.grad for w in weights]
    assert all(gw is not None and gw.abs().sum() > 0 for gw in grads)
    assert not torch.equal(grads[0], grads[1]) and not torch.equal(grads[1], grads[2])
    shared = layer(hops=4, hop_norm="shared")
    assert len(shared.hop_norms) == 1
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in shared.parameters()) == 2 * D
    # one hop has no hop >= 1 to normalise: no norm, the plain layer
    one = layer(hop_norm="per_hop")
    assert len(one.hop_norms) == 0 and torch.equal(one(x)[0], layer()(x)[0])


def test_hop_norm_halting_compares_the_update_with_the_raw_state():
    m = layer(hops=3, hop_norm="per_hop").eval()
    with torch.no_grad():
        for i, norm in enumerate(m.hop_norms):
            norm.weight.fill_(0.3 + 0.1 * i)  # small normalised inputs: hop 1's updates are small against h_1
    x = inputs(B=4, S=16)
    x_TD = x.reshape(-1, D)
    ex = EXECUTORS.get("reference")
    with torch.no_grad():
        full, r_full = m(x)
        # hop 0 and hop 1 by hand: the updates and their ratios to the raw state h_i
        d0 = ex(x_TD, m.route(x_TD, None, x.shape[1], hop=0), m.experts)
        h1 = x_TD + d0
        n1 = m.hop_input(h1, 1)
        assert_close(n1, rms_norm(h1, m.hop_norms[0].weight))
        d1 = ex(n1, m.route(n1, None, x.shape[1], hop=1), m.experts)
        ratio1 = d1.norm(dim=-1) / h1.norm(dim=-1)
    assert_close(r_full.stats["update_ratio"], d0.norm(dim=-1) / x_TD.norm(dim=-1))
    # a threshold that no token's hop-0 ratio falls under but about half the hop-1 ratios do
    tau = float(ratio1.median())
    assert tau < float((d0.norm(dim=-1) / x_TD.norm(dim=-1)).min())
    keep1 = ratio1 >= tau
    m.set_halting(tau)
    with torch.no_grad():
        y, r = m(x)
    y_TD = y.reshape(-1, D)
    n_halt = int((~keep1).sum())
    assert 0 < n_halt < x_TD.shape[0]
    assert_close(y_TD[~keep1], (d0 + d1)[~keep1], rtol=1e-5, atol=1e-5)  # stopped after hop 1
    assert_close(y_TD[keep1], full.reshape(-1, D)[keep1])  # all three hops
    assert float(r.stats["hops_per_token"]) == pytest.approx(3 - n_halt / x_TD.shape[0])


def test_hop_norm_config_errors():
    for bad in ("rms", "None", "", None, 1, True):
        with pytest.raises(ValueError, match="hop_norm") as err:
            MoEConfig(hops=2, hop_norm=bad)
        assert "per_hop" in str(err.value) and "shared" in str(err.value)
    with pytest.raises(ValueError, match="hop_norm"):
        MoE(D, F, E, K, hops=2, hop_norm="layer")
    cfg = MoEConfig(hops=2, hop_norm="per_hop")
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert MoEConfig().hop_norm == "none"


@pytest.mark.parametrize("hop_norm", ["shared", "per_hop"])
def test_lm_with_hop_norm_trains_a_step(hop_norm):
    moe = MoEConfig(num_experts=4, top_k=2, hops=3, hop_norm=hop_norm, router="cosine")
    cfg = preset("tiny", n_layers=2, moe=moe)
    plain = preset("tiny", n_layers=2, moe=moe.replace(hop_norm="none"))
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    n_norms = 1 if hop_norm == "shared" else 2
    counts, plain_counts = parameter_counts(cfg), parameter_counts(plain)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] - plain_counts["total"] == 2 * n_norms * cfg.d_model  # 2 MoE layers
    assert flops_per_token(cfg, 64) == flops_per_token(plain, 64)  # norms are not counted as FLOPs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    out = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss()
    loss.backward()
    norms = [n for blk in model.blocks for n in blk.ffn.hop_norms]
    assert len(norms) == 2 * n_norms
    assert all(n.weight.grad is not None and n.weight.grad.abs().sum() > 0 for n in norms)
    opt.step()
    assert all(not torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out2 = model(ids[:, :-1])
    assert torch.isfinite(out2.logits).all()
    assert all("hop_cos" in r.stats and torch.isfinite(r.stats["update_ratio"]).all() for r in out2.routings)
