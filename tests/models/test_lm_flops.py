"""flops_per_token against hand-written formulas and against torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparseroute.models import LMConfig, TransformerLM, flops_per_token, forward_backward_flops
from sparseroute.moe import MoEConfig

# V vocab, D model, L layers, H heads, F dense hidden, S sequence; MoE: E experts, k, Fe expert hidden
V, D, L, H, F, S = 256, 64, 2, 4, 128, 32
E, K, FE = 4, 2, 64

DENSE = LMConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, d_ff=F, max_seq_len=S)
MOE = DENSE.replace(moe=MoEConfig(num_experts=E, top_k=K, d_ff=FE))  # MoE in all layers


def test_dense_by_hand():
    # per layer: q,k,v,o projections 4 * 2*D*D = 32768; QK^T and AV over the mean causal context
    # (S+1)/2 = 16.5 tokens: 2 * 2*D*16.5 = 4224  -> 36992 per layer, 73984 for 2 layers
    attention = 2 * (4 * 2 * 64 * 64 + 2 * 2 * 64 * 16.5)
    assert attention == 73984
    # SwiGLU: gate, up, down, 3 * 2*D*F = 49152 per layer
    dense_ffn = 2 * (3 * 2 * 64 * 128)
    assert dense_ffn == 98304
    head = 2 * 64 * 256  # 32768; the input lookup is free
    d = flops_per_token(DENSE, S)
    assert d == {
        "attention": 73984.0,
        "dense_ffn": 98304.0,
        "experts": 0.0,
        "router": 0.0,
        "embedding_head": 32768.0,
        "total": 205056.0,
    }
    assert d["total"] == attention + dense_ffn + head
    assert forward_backward_flops(d) == 3 * 205056.0


def test_top2_moe_by_hand():
    # each expert: gate+up (D x 2Fe) and down (Fe x D): 3 * 2*D*Fe = 24576; 2 of them per token
    experts = 2 * (2 * 3 * 2 * 64 * 64)
    assert experts == 98304
    router = 2 * (2 * 64 * 4)  # linear router D x E per layer: 512 each
    d = flops_per_token(MOE, S)
    assert d == {
        "attention": 73984.0,
        "dense_ffn": 0.0,
        "experts": 98304.0,
        "router": 1024.0,
        "embedding_head": 32768.0,
        "total": 73984.0 + 98304.0 + 1024.0 + 32768.0,
    }
    assert d["total"] == 206080.0
    # expert d_ff = dense d_ff / k: the experts cost what the dense FFN costs
    assert d["experts"] == flops_per_token(DENSE, S)["dense_ffn"]


def test_active_experts_scale_the_experts_term_linearly():
    full = flops_per_token(MOE, S)
    assert flops_per_token(MOE, S, [2.0, 2.0]) == full
    d = flops_per_token(MOE, S, [1.5, 1.5])
    assert d["experts"] == pytest.approx(98304.0 * 1.5 / 2)
    assert d["experts"] == 1.5 * 2 * 24576
    for key in ("attention", "router", "embedding_head", "dense_ffn"):
        assert d[key] == full[key]
    assert d["total"] == pytest.approx(full["total"] - 0.5 * 2 * 24576)
    mixed = flops_per_token(MOE, S, [1.0, 3.0])
    assert mixed["experts"] == (1.0 + 3.0) * 24576
    assert flops_per_token(MOE, S, [0.0, 0.0])["experts"] == 0.0


def test_router_costs():
    cos = MOE.replace(moe=MoEConfig(num_experts=E, top_k=K, d_ff=FE, router="cosine", router_options={"d_space": 16}))
    assert flops_per_token(cos, S)["router"] == 2 * 2 * (64 * 16 + 16 * 4)
    cos_default = MOE.replace(moe=MoEConfig(num_experts=E, top_k=K, router="cosine"))
    assert flops_per_token(cos_default, S)["router"] == 2 * 2 * (64 * 64 + 64 * 4)  # d_space 64
    for name in ("hash", "round_robin", "all_to_one"):
        cfg = MOE.replace(moe=MoEConfig(num_experts=E, top_k=K, router=name))
        assert flops_per_token(cfg, S)["router"] == 0.0
    for name in ("sigmoid", "relu", "expert_choice", "sinkhorn", "random_fixed"):
        cfg = MOE.replace(moe=MoEConfig(num_experts=E, top_k=K, router=name))
        assert flops_per_token(cfg, S)["router"] == 2 * 2 * 64 * 4


def test_similarity_router_costs():
    def router(**opts):
        cfg = MOE.replace(moe=MoEConfig(num_experts=E, top_k=K, d_ff=FE, router="similarity", router_options=opts))
        return flops_per_token(cfg, S)["router"]

    # per layer: logits 2·D·E, mixing 2·E·S; features: projection 2·D·R and scores 2·R·S
    assert router(d_feat=8) == L * (2 * D * E + 2 * E * S + 2 * D * 8 + 2 * 8 * S)
    assert router(features="logits") == L * (2 * D * E + 2 * E * S + 2 * E * S)
    # attention-aware: no features, but the attention layer's explicit q kᵀ (2·D·S)
    assert router(features="attention") == L * (2 * D * E + 2 * E * S + 2 * D * S)
    hops2 = MOE.replace(moe=MoEConfig(num_experts=E, top_k=K, d_ff=FE, hops=2, router="similarity",
                                        router_options={"features": "attention"}))
    # the routing decision is paid per hop, the attention probabilities once per layer
    assert flops_per_token(hops2, S)["router"] == L * (2 * (2 * D * E + 2 * E * S) + 2 * D * S)


def test_partial_moe_shared_experts_and_activation():
    cfg = DENSE.replace(moe=MoEConfig(num_experts=E, top_k=K, d_ff=FE, layers=(1,), num_shared_experts=1))
    d = flops_per_token(cfg, S)
    assert d["dense_ffn"] == 3 * 2 * 64 * 128  # layer 0 only
    assert d["experts"] == 2 * 24576 + 24576  # two routed + one shared (hidden Fe)
    assert d["router"] == 2 * 64 * 4
    gelu = DENSE.replace(moe=MoEConfig(num_experts=E, top_k=K, d_ff=FE, activation="gelu"))
    assert flops_per_token(gelu, S)["experts"] == 2 * 2 * (2 * 2 * 64 * 64)  # 2 matrices, not 3


def test_attention_context_term():
    a1 = flops_per_token(DENSE, 1)["attention"]
    a65 = flops_per_token(DENSE, 65)["attention"]
    assert a1 == L * (8 * D * D + 4 * D * 1)
    assert a65 - a1 == L * 4 * D * 32


def test_errors():
    with pytest.raises(ValueError, match="active_experts_per_layer"):
        flops_per_token(MOE, S, [2.0])
    with pytest.raises(ValueError, match="active_experts_per_layer"):
        flops_per_token(MOE, S, [2.0, 5.0])
    with pytest.raises(ValueError, match="active_experts_per_layer"):
        flops_per_token(DENSE, S, [1.0])
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(DENSE, 0)


@pytest.mark.parametrize(
    "router, opts",
    [
        (None, {}),
        ("topk", {}),
        ("cosine", {"d_space": 16}),
        ("relu", {}),
        ("hash", {}),
        ("kmeans", {}),
        ("similarity", {"d_feat": 8}),
        ("similarity", {"features": "logits"}),
        ("similarity", {"features": "attention"}),
    ],
)
def test_matches_torch_flop_counter(router, opts):
    """The matmul part against torch's own count (its CPU SDPA is not counted, so compare without
    the QK^T/AV term); active experts measured from the routings. The similarity routers' [S, S]
    products and the attention-aware form's explicit q kᵀ are counted by torch too."""
    cfg = DENSE
    if router is not None:
        cfg = MOE.replace(moe=MoEConfig(num_experts=E, top_k=K, d_ff=FE, router=router, router_options=opts))
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    B = 3
    ids = torch.randint(0, V, (B, S))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(ids)
    active = [float(r.stats["active_per_token"]) for r in out.routings] if router else None
    d = flops_per_token(cfg, S, active)
    matmuls = d["total"] - L * 4 * D * (S + 1) / 2
    assert counter.get_total_flops() == pytest.approx(B * S * matmuls, rel=1e-6)
