"""TransformerLM: shapes, causality, RoPE, auxiliary losses and gradients, tying, init, input checks."""

from __future__ import annotations

import math

import pytest
import torch

from sparseroute.models import LMConfig, TransformerLM, apply_rope, rope_cos_sin
from sparseroute.moe import MoEConfig
from sparseroute.moe import MoE

V, D, L, H, F, S = 64, 32, 2, 4, 64, 16


def cfg_for(router: str | None = None, **kw) -> LMConfig:
    moe = None
    if router is not None:
        opts = {"d_space": 8} if router == "cosine" else {}
        moe = MoEConfig(num_experts=4, top_k=2, router=router, router_options=opts, **kw)
    return LMConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, d_ff=F, max_seq_len=S, moe=moe)


def build(cfg: LMConfig, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(cfg).eval()


# -- shapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", [None, "topk", "cosine", "hash", "relu"])
@pytest.mark.parametrize("B,T", [(2, S), (1, 1), (3, 5)])
def test_forward_shapes(router, B, T):
    cfg = cfg_for(router)
    model = build(cfg)
    ids = torch.randint(0, V, (B, T))
    out = model(ids)
    assert out.logits.shape == (B, T, V)
    assert torch.isfinite(out.logits).all()
    n_moe = 0 if router is None else L
    assert len(out.routings) == n_moe
    for r in out.routings:
        assert r.indices.shape[0] == B * T
        assert r.num_experts == 4
        assert r.stats["tokens_per_expert"].shape == (4,)
    if router is None:
        assert out.aux_losses == {}


def test_every_other_and_explicit_layers():
    base = dict(vocab_size=V, d_model=D, n_layers=4, n_heads=H, d_ff=F, max_seq_len=S)
    ids = torch.randint(0, V, (2, 8))
    for layers, expect in (("every_other", (1, 3)), ((2, 0), (0, 2)), ("all", (0, 1, 2, 3))):
        cfg = LMConfig(**base, moe=MoEConfig(num_experts=4, top_k=1, layers=layers))
        assert cfg.moe_layer_indices() == expect
        model = build(cfg)
        assert [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)] == list(expect)
        assert len(model(ids).routings) == len(expect)


def test_expert_hidden_defaults_to_dense_over_top_k():
    model = build(cfg_for("topk"))
    assert all(m.experts.d_ff == F // 2 for m in model.moe_layers())
    model = build(cfg_for("topk", d_ff=24))
    assert all(m.experts.d_ff == 24 for m in model.moe_layers())


# -- causality -----------------------------------------------------------------------------------


@pytest.mark.parametrize("router", [None, "topk"])
@pytest.mark.parametrize("j", [0, 5, S - 1])
def test_causal(router, j):
    model = build(cfg_for(router))
    torch.manual_seed(1)
    ids = torch.randint(0, V, (2, S))
    ids2 = ids.clone()
    ids2[:, j] = (ids[:, j] + 1 + torch.randint(0, V - 1, (2,))) % V
    with torch.no_grad():
        a, b = model(ids).logits, model(ids2).logits
    torch.testing.assert_close(a[:, :j], b[:, :j], atol=1e-5, rtol=1e-5)
    # the perturbation must be visible from position j on (else this test could not fail)
    assert (a[:, j] - b[:, j]).abs().max() > 1e-3


# -- RoPE ----------------------------------------------------------------------------------------


def test_rope_matches_complex_rotation():
    K, T, base = 8, 12, 100.0
    torch.manual_seed(0)
    x = torch.randn(2, 3, T, K, dtype=torch.float64)
    cos, sin = rope_cos_sin(T, K, base)
    y = apply_rope(x, cos.double(), sin.double())
    # rotate-half pairs (i, i + K/2) as complex numbers turned by angle pos * base^(-2i/K)
    z = torch.complex(x[..., : K // 2], x[..., K // 2 :])
    theta = base ** (-torch.arange(0, K, 2, dtype=torch.float64) / K)
    rot = torch.polar(torch.ones(T, K // 2, dtype=torch.float64), torch.arange(T, dtype=torch.float64)[:, None] * theta)
    zr = z * rot
    torch.testing.assert_close(y, torch.cat([zr.real, zr.imag], dim=-1), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    K, T = 16, 40
    torch.manual_seed(0)
    q, k = torch.randn(K), torch.randn(K)
    cos, sin = rope_cos_sin(T, K, 10000.0)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q.view(1, 1, 1, K), cos[m : m + 1], sin[m : m + 1]).flatten()
        kn = apply_rope(k.view(1, 1, 1, K), cos[n : n + 1], sin[n : n + 1]).flatten()
        return float(qm @ kn)

    for m, n in [(3, 1), (10, 10), (7, 0), (0, 7)]:
        ref = score(m, n)
        for shift in (1, 5, 20):
            assert score(m + shift, n + shift) == pytest.approx(ref, abs=1e-4)
    # ... and they do depend on it
    assert abs(score(5, 0) - score(5, 3)) > 1e-3
    # rotation keeps norms
    xr = apply_rope(q.expand(1, 1, T, K), cos, sin)
    torch.testing.assert_close(xr.norm(dim=-1), q.norm().expand(1, 1, T))


# -- auxiliary losses and gradients --------------------------------------------------------------


def test_topk_aux_losses_and_router_gradients():
    model = build(cfg_for("topk")).train()
    ids = torch.randint(0, V, (2, S))
    out = model(ids)
    assert "load_balance" in out.aux_losses
    expected = sum(r.losses["load_balance"] for r in out.routings)
    torch.testing.assert_close(out.aux_losses["load_balance"], expected)
    assert out.aux_loss().dim() == 0 and out.aux_loss().item() > 0
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss()
    loss.backward()
    for moe in model.moe_layers():
        g = moe.router.weight.grad
        assert g is not None and g.abs().sum() > 0
        assert moe.experts.w_in.grad is not None and moe.experts.w_in.grad.abs().sum() > 0
    assert model.embed.weight.grad.abs().sum() > 0


def test_aux_loss_alone_reaches_router():
    model = build(cfg_for("topk")).train()
    model(torch.randint(0, V, (2, S))).aux_loss().backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in model.moe_layers())


def test_dense_aux_loss_is_zero():
    out = build(cfg_for(None))(torch.randint(0, V, (1, 4)))
    assert out.aux_losses == {} and out.routings == []
    z = out.aux_loss()
    assert z.dim() == 0 and float(z) == 0.0


def test_hash_router_gets_token_ids():
    model = build(cfg_for("hash"))
    ids = torch.tensor([[3, 7, 3, 9, 7, 3]])
    out = model(ids)
    idx = out.routings[0].indices
    assert torch.equal(idx[0], idx[2]) and torch.equal(idx[0], idx[5]) and torch.equal(idx[1], idx[4])


# -- embeddings, init ------------------------------------------------------------------------------


def test_tie_embeddings_shares_the_tensor():
    tied = build(cfg_for(None))
    assert tied.output_weight() is tied.embed.weight
    assert "embed.weight" in tied.state_dict() and "head.weight" not in tied.state_dict()
    untied = build(cfg_for(None).replace(tie_embeddings=False))
    assert untied.output_weight() is untied.head.weight
    assert untied.output_weight().data_ptr() != untied.embed.weight.data_ptr()
    assert not torch.equal(untied.output_weight(), untied.embed.weight)
    assert untied.num_parameters() - tied.num_parameters() == V * D
    # the head of the tied model really reads the embedding matrix
    with torch.no_grad():
        tied.embed.weight[5].zero_()
    assert torch.all(tied(torch.tensor([[1, 2]])).logits[..., 5] == 0)


@pytest.mark.parametrize("tie", [True, False])
def test_state_dict_saves_with_safetensors(tmp_path, tie):
    st = pytest.importorskip("safetensors.torch")
    model = build(cfg_for("topk").replace(tie_embeddings=tie))
    path = str(tmp_path / "m.safetensors")
    st.save_file(model.state_dict(), path)
    fresh = build(cfg_for("topk").replace(tie_embeddings=tie), seed=1)
    fresh.load_state_dict(st.load_file(path))
    ids = torch.randint(0, V, (2, 8))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_init_scales():
    cfg = LMConfig(vocab_size=256, d_model=256, n_layers=8, n_heads=4, d_ff=512, init_std=0.02)
    model = build(cfg)
    blk = model.blocks[3]
    out_std = 0.02 / math.sqrt(16)
    assert blk.attn.q.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert blk.ffn.gate.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert blk.attn.o.weight.std().item() == pytest.approx(out_std, rel=0.03)
    assert blk.ffn.down.weight.std().item() == pytest.approx(out_std, rel=0.03)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert torch.all(blk.attn_norm.weight == 1) and torch.all(model.norm.weight == 1)


def test_moe_experts_start_like_the_dense_ffn():
    cfg = LMConfig(vocab_size=64, d_model=128, n_layers=2, n_heads=2, d_ff=256, init_std=0.02,
                   moe=MoEConfig(num_shared_experts=1))
    model = build(cfg)
    moe = model.moe_layers()[0]
    out_std = 0.02 / math.sqrt(4)
    for mlp in (moe.experts, moe.shared.mlp):
        assert mlp.w_in.std().item() == pytest.approx(0.02, rel=0.05)
        assert mlp.w_out.std().item() == pytest.approx(out_std, rel=0.05)


def test_meta_device_build_allocates_nothing():
    with torch.device("meta"):
        model = TransformerLM(cfg_for("topk"))
    assert all(p.is_meta for p in model.parameters())


# -- input checks ----------------------------------------------------------------------------------


def test_bad_inputs():
    model = build(cfg_for("topk"))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, S + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[0, V]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.zeros(4, dtype=torch.long))
    model(torch.full((1, S), V - 1))  # the edges are fine
