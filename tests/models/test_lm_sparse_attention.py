"""The LM with block-sparse attention layers (LMConfig.attention): equal to the dense LM under the
``dense`` attention router (outputs and gradients), the config's round trip and errors, the
routings and losses it returns, its init, and its FLOPs and parameter counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from sparseroute.attention import AttentionConfig, SparseAttention
from sparseroute.models import LMConfig, TransformerLM, flops_per_token, parameter_counts
from sparseroute.models.flops import attention_densities
from sparseroute.moe import MoEConfig

V, D, L, H, F = 64, 64, 3, 4, 128
BASE = LMConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, d_ff=F, max_seq_len=128)


def build(cfg: LMConfig, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(cfg)


def grads(model: TransformerLM, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(ids)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    (loss + out.aux_loss()).backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layers, S", [("all", 40), ((1,), 48), ("all", 7)])  # 40, 7: a partial last block
def test_dense_router_equals_the_dense_lm_forward_and_backward(layers, S):
    dense = build(BASE)
    sparse = build(BASE.replace(attention=AttentionConfig(router="dense", block_size=16, layers=layers)), seed=1)
    assert sparse.state_dict().keys() == dense.state_dict().keys()  # the same q/k/v/o names: loads across
    sparse.load_state_dict(dense.state_dict())
    want = [i for i in range(L) if layers == "all" or i in layers]
    assert [i for i, b in enumerate(sparse.blocks) if isinstance(b.attn, SparseAttention)] == want
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(0))
    logits_d, grads_d = grads(dense, ids)
    logits_s, grads_s = grads(sparse, ids)
    assert_close(logits_s, logits_d, rtol=1e-5, atol=1e-5)
    assert grads_s.keys() == grads_d.keys()
    for name in grads_d:
        assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)
    out = sparse(ids)
    assert len(out.attention_routings) == len(want) and out.routings == [] and out.aux_losses == {}
    for r in out.attention_routings:
        assert float(r.stats["density"]) == pytest.approx(1.0) and float(r.stats["recall"]) == pytest.approx(1.0)
    # and the sparse model is really sparse with another router: its logits differ
    moba = build(BASE.replace(attention=AttentionConfig(router="moba", block_size=8, router_options={"top_k": 1})))
    moba.load_state_dict(dense.state_dict())
    if S > 16:
        assert not torch.allclose(moba(ids).logits, logits_d, atol=1e-4)
        assert all(float(r.stats["density"]) < 1.0 for r in moba(ids).attention_routings)


def test_dense_attention_default_is_unchanged():
    """No ``attention``: the plain SDPA blocks, the same init (RNG draws) and the same outputs."""
    a, b = build(BASE), build(BASE.replace(attention=None))
    assert not any(isinstance(blk.attn, SparseAttention) for blk in a.blocks)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert a(torch.zeros(1, 4, dtype=torch.long)).attention_routings == []
    assert "attention" not in BASE.to_dict()  # left out: stored configs and sweep fingerprints read as before


def test_attention_router_losses_reach_aux_losses(monkeypatch):
    cfg = BASE.replace(attention=AttentionConfig(router="moba", block_size=8, layers=(0, 2)))
    model = build(cfg)
    for i, attn in enumerate(model.sparse_attention_layers()):
        route = attn.router.route

        def with_loss(q, k, v, x, route=route, i=i):
            r = route(q, k, v, x)
            return r.replace(losses={"attn_test": (i + 1) * q.square().mean()})

        monkeypatch.setattr(attn.router, "route", with_loss)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    assert set(out.aux_losses) == {"attn_test"} and len(out.attention_routings) == 2
    expect = sum(r.losses["attn_test"] for r in out.attention_routings)
    assert_close(out.aux_losses["attn_test"], expect)
    assert_close(out.aux_loss(), expect.float())
    out.aux_loss().backward()
    # the losses train what feeds layers 0 and 2's queries, not what comes after them
    assert model.blocks[0].attn.q.weight.grad is not None and model.blocks[2].attn.q.weight.grad is not None
    assert model.blocks[2].ffn.down.weight.grad is None and model.blocks[2].attn.o.weight.grad is None


def test_config_round_trip_and_old_configs():
    a = AttentionConfig(router="moba", router_options={"top_k": 2, "key_conv": 3}, block_size=32, layers=(0, 2),
                        n_kv_heads=2, backend="gather")
    cfg = BASE.replace(attention=a)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["attention"] == {"router": "moba", "router_options": {"top_k": 2, "key_conv": 3}, "block_size": 32,
                              "layers": [0, 2], "n_kv_heads": 2, "backend": "gather"}
    assert LMConfig.from_dict(d) == cfg and LMConfig.from_dict(d).attention.layers == (0, 2)
    assert AttentionConfig.from_dict(a.to_dict()) == a
    # a dict is read as AttentionConfig fields, like moe
    assert BASE.replace(attention={"router": "window", "router_options": {"window": 2}}).attention == AttentionConfig(
        router="window", router_options={"window": 2})
    old = BASE.to_dict()
    assert "attention" not in old and LMConfig.from_dict(old) == BASE and LMConfig.from_dict(old).attention is None
    assert AttentionConfig().router == "moba" and AttentionConfig().block_size == 64


@pytest.mark.parametrize(
    "attention, match",
    [
        ({"router": "nope"}, r"attention: unknown attention router 'nope'; known: .*moba"),
        ({"router": "moba", "router_options": {"top_kk": 2}}, r"attention\.router_options: unknown option\(s\) top_kk"),
        ({"router": "moba", "router_options": {"top_k": 0}}, r"attention\.router_options.*top_k"),
        ({"router": "moba", "router_options": [1]}, r"attention\.router_options must be a dict"),
        ({"block_size": 0}, r"attention\.block_size"),
        ({"layers": (0, 3)}, r"attention\.layers: indices \[3\] are out of range for n_layers=3"),
        ({"layers": ()}, r"attention\.layers"),
        ({"layers": "odd"}, r"attention\.layers"),
        ({"n_kv_heads": 3}, r"attention\.n_kv_heads=3 must divide n_heads=4"),
        ({"n_kv_heads": 0}, r"attention\.n_kv_heads"),
        ({"backend": "cuda"}, r"attention\.backend must be one of auto"),
        ({"block": 4}, r"unknown AttentionConfig field\(s\) block"),
    ],
)
def test_config_errors_name_the_field(attention, match):
    with pytest.raises(ValueError, match=match):
        BASE.replace(attention=attention)


def test_attention_aware_moe_routing_on_a_sparse_layer_is_refused():
    aware = MoEConfig(router="similarity", router_options={"features": "attention"}, layers=(1,))
    with pytest.raises(ValueError, match=r"moe: the similarity router.*layers \[1\]"):
        BASE.replace(moe=aware, attention=AttentionConfig(router="dense", block_size=8))
    # on other layers, or with other features, it is fine
    BASE.replace(moe=aware, attention=AttentionConfig(router="dense", block_size=8, layers=(0, 2)))
    plain = MoEConfig(router="similarity", router_options={"features": "logits"})
    model = build(BASE.replace(moe=plain, attention=AttentionConfig(router="moba", block_size=8)))
    out = model(torch.randint(0, V, (2, 16)))
    assert len(out.routings) == L and len(out.attention_routings) == L


def test_sparse_projections_are_initialised_like_the_dense_ones():
    cfg = LMConfig(vocab_size=V, d_model=256, n_layers=8, n_heads=4, d_ff=256, init_std=0.02,
                   attention=AttentionConfig(router="moba", router_options={"key_conv": 4}))
    model = build(cfg)
    out_std = 0.02 / math.sqrt(16)
    attn = model.blocks[3].attn
    assert isinstance(attn, SparseAttention)
    for lin in (attn.q, attn.k, attn.v):
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert attn.o.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.all(attn.router.key_conv == 0)  # the router keeps its own init (MoBA's conv starts at zero)


def test_gqa_sparse_layers():
    cfg = BASE.replace(attention=AttentionConfig(router="moba", block_size=8, n_kv_heads=2))
    model = build(cfg)
    assert model.blocks[0].attn.k.weight.shape == (2 * D // H, D)
    out = model(torch.randint(0, V, (1, 20)))
    assert out.attention_routings[0].block_indices.shape[1] == 2
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == parameter_counts(BASE)["total"] - L * 2 * (D - 2 * D // H) * D
    # k and v projections: 2·2·D·(Hkv·K) instead of 2·2·D·D
    S = 64
    rho = attention_densities(cfg, S)[0]
    expect = L * (4 * D * D + 4 * D * (2 * D // H) + 4 * D * (S + 1) / 2 * rho)
    assert flops_per_token(cfg, S)["attention"] == pytest.approx(expect)


def test_flops_charge_the_attention_that_runs():
    S = 256
    dense = flops_per_token(BASE, S)
    assert flops_per_token(BASE.replace(attention=AttentionConfig(router="dense", block_size=16)), S) == dense
    moba_cfg = BASE.replace(attention=AttentionConfig(router="moba", block_size=16, router_options={"top_k": 2}))
    moba = flops_per_token(moba_cfg, S)
    rho = moba_cfg.attention.build_router(D, H, device="cpu").density_estimate(S)
    assert attention_densities(moba_cfg, S) == [rho] * L and 0 < rho < 0.3
    context_terms = L * 4 * D * (S + 1) / 2
    assert dense["attention"] - moba["attention"] == pytest.approx(context_terms * (1 - rho))
    assert dense["total"] - moba["total"] == pytest.approx(context_terms * (1 - rho))
    # one sparse layer of three: a third of the saving
    one = flops_per_token(moba_cfg.replace(attention=moba_cfg.attention.replace(layers=(1,))), S)
    assert dense["attention"] - one["attention"] == pytest.approx(context_terms * (1 - rho) / L)


def test_parameter_counts_include_the_attention_routers():
    w = 4
    cfg = BASE.replace(attention=AttentionConfig(router="moba", router_options={"key_conv": w}, block_size=8))
    counts, dense = parameter_counts(cfg), parameter_counts(BASE)
    assert counts["attention_routing"] == L * D * w  # a depthwise conv of width w per key channel
    assert counts["total"] == dense["total"] + L * D * w == build(cfg).num_parameters()
    assert counts["routing"] == 0 and dense["attention_routing"] == 0
