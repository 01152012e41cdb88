"""Forward FLOPs per token and parameter counts of an :class:`LMConfig`.

Legend: V vocab, D model dim, L layers, F dense FFN hidden, Fe expert hidden, E experts,
R cosine routing dim (d_space), S sequence length, a_i active experts per token of MoE layer i.

Matmuls only (plus the attention score and value products), one multiply-add = 2 FLOPs:

- attention, per layer: q, k, v, o projections 4·2·D² plus QKᵀ and AV 2·2·D·c, where c = (S+1)/2
  is the mean causal context of a token. On the block-sparse attention layers (``cfg.attention``)
  only the attention that actually runs is charged: QKᵀ and AV 2·2·D·c·ρ, with ρ the router's
  ``density_estimate(S)`` (the kept fraction of the causal score matrix; its router is built on the
  meta device, nothing is allocated), and k, v projections 2·2·D·Hkv·K with GQA (``n_kv_heads``
  kv-heads of head dim K); what the attention router itself computes to choose (block scores, an
  indexer) is not counted;
- dense_ffn, per non-MoE layer: SwiGLU gate, up, down 3·2·D·F;
- experts, per MoE layer: a_i × one expert (``Experts.flops_per_row``: 3·2·D·Fe for SwiGLU,
  2·2·D·Fe otherwise) plus the shared experts (hidden ``num_shared_experts``·Fe), every token;
- router, per MoE layer and hop: what the router class says (``Router.flops_per_token``): linear
  routers 2·D·E; cosine 2·(D·R + R·E); hash and the oracles 0; the similarity router adds its
  [S, S] products (see :mod:`sparseroute.moe.routers.similarity`); and, once per MoE layer, what
  the router makes its attention layer spend (``Router.attention_flops_per_token``: the
  attention-aware similarity router's explicit q kᵀ, 2·D·S);
- embedding_head: the output head 2·D·V (the input lookup costs nothing).

Norms, softmax, activations and the routing bookkeeping are not counted. Training (forward +
backward) costs about 3× the forward: :func:`forward_backward_flops`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sparseroute.models.config import LMConfig
from sparseroute.moe.config import MoEConfig
from sparseroute.moe.experts import expert_flops_per_row
from sparseroute.moe.routers import ROUTERS
from sparseroute.moe.routers.base import make_config

__all__ = ["flops_per_token", "forward_backward_flops", "router_flops_per_token", "parameter_counts",
           "attention_densities"]

def _router_class(moe: MoEConfig):
    """The configured router class and its validated config."""
    cls = ROUTERS.get(moe.router)
    return cls, make_config(cls, moe.router_options)


def attention_densities(cfg: LMConfig, seq_len: int) -> list[float]:
    """Per block-sparse attention layer (layer order), the kept fraction of the causal score matrix
    its router will select at ``seq_len`` (``AttentionRouter.density_estimate``); empty without
    ``cfg.attention``."""
    a = cfg.attention
    if a is None:
        return []
    rho = a.density_estimate(seq_len, d_model=cfg.d_model, n_heads=cfg.n_heads)
    if not 0.0 <= rho <= 1.0 or math.isnan(rho):
        raise ValueError(f"attention router {a.router!r}: density_estimate({seq_len}) = {rho} is not in [0, 1]")
    return [rho] * len(cfg.sparse_attention_layer_indices())


def router_flops_per_token(moe: MoEConfig, d_model: int, seq_len: int) -> float:
    """Forward FLOPs of one routing decision on one token in sequences of ``seq_len`` (see the
    module docstring), not counting what the router makes the attention layer spend."""
    cls, rcfg = _router_class(moe)
    return float(cls.flops_per_token(rcfg, d_model, moe.num_experts, seq_len))


def flops_per_token(
    cfg: LMConfig, seq_len: int, active_experts_per_layer: Sequence[float] | None = None
) -> dict[str, float]:
    """Forward FLOPs per token, by part: attention, dense_ffn, experts, router, embedding_head and
    total. ``active_experts_per_layer[i]`` is the mean number of experts a token uses in the i-th
    MoE layer, summed over its hops (e.g. ``Routing.stats["active_per_token"]``); ``None`` means
    ``top_k x hops`` everywhere. Router and shared-expert FLOPs are charged once per hop.
    Pass measured counts for variable-k routers (relu, expert_choice) and capacity drops."""
    if not isinstance(cfg, LMConfig):
        raise ValueError(f"cfg must be an LMConfig; got {type(cfg).__name__}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1; got {seq_len!r}")
    D, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    moe_layers = cfg.moe_layer_indices()
    n_moe = len(moe_layers)
    if active_experts_per_layer is None:
        active = [float(cfg.moe.top_k * cfg.moe.hops)] * n_moe if cfg.moe is not None else []
    else:
        active = [float(a) for a in active_experts_per_layer]
        if len(active) != n_moe:
            raise ValueError(
                f"active_experts_per_layer must have one value per MoE layer ({n_moe}: layers "
                f"{list(moe_layers)}); got {len(active)}"
            )
        E = cfg.moe.num_experts * cfg.moe.hops if cfg.moe is not None else 0
        bad = [a for a in active if not (0.0 <= a <= E) or math.isnan(a)]
        if bad:
            raise ValueError(f"active_experts_per_layer: values must be in [0, num_experts x hops = {E}]; got {bad}")

    context = (seq_len + 1) / 2.0
    densities = attention_densities(cfg, seq_len)
    attention = (L - len(densities)) * (8.0 * D * D + 4.0 * D * context)
    if densities:
        kv_width = cfg.attention.kv_heads(cfg.n_heads) * cfg.head_dim
        attention += sum(4.0 * D * D + 4.0 * D * kv_width + 4.0 * D * context * rho for rho in densities)
    dense_ffn = (L - n_moe) * 6.0 * D * cfg.d_ff
    experts = router = 0.0
    if cfg.moe is not None:
        m = cfg.moe
        fe = m.expert_d_ff(cfg.d_ff)
        per_expert = float(expert_flops_per_row(D, fe, m.activation))
        shared = float(expert_flops_per_row(D, m.num_shared_experts * fe, m.activation)) if m.num_shared_experts else 0.0
        experts = sum(a * per_expert + m.hops * shared for a in active)
        cls, rcfg = _router_class(m)
        router = n_moe * (m.hops * cls.flops_per_token(rcfg, D, m.num_experts, seq_len)
                          + cls.attention_flops_per_token(rcfg, D, seq_len))
    embedding_head = 2.0 * D * V
    out = {
        "attention": attention,
        "dense_ffn": dense_ffn,
        "experts": experts,
        "router": router,
        "embedding_head": embedding_head,
    }
    out["total"] = sum(out.values())
    return out


def forward_backward_flops(d: dict[str, float]) -> float:
    """Training FLOPs per token ≈ 3 × forward (backward computes two matmuls per forward one)."""
    return 3.0 * d["total"]


def parameter_counts(cfg: LMConfig) -> dict[str, int]:
    """Exact parameter counts of ``TransformerLM(cfg)``, built on the meta device (nothing is
    allocated): ``total`` (unique parameters, the attention routers' included), ``embedding``
    (input table, plus the head when untied), ``experts`` (all routed-expert weights), ``active``
    (per token: total minus the routed experts a top-k token does not use), ``routing`` (learned
    routing parameters over all MoE layers: D·E for a linear router, D·d_space + E·d_space + 1 for
    the cosine router, 0 for hash and random-fixed), ``linear_router`` (what linear routers would
    have, for comparison) and ``attention_routing`` (the parameters of the sparse attention layers'
    routers, e.g. MoBA's key convolution, an indexer; 0 without sparse attention)."""
    from sparseroute.models.lm import TransformerLM

    with torch.device("meta"):
        model = TransformerLM(cfg)
    total = model.num_parameters()
    embedding = model.embed.weight.numel() + (0 if model.head is None else model.head.weight.numel())
    experts = active_experts = routing = linear_router = 0
    for moe in model.moe_layers():
        n = moe.experts.w_in.numel() + moe.experts.w_out.numel()
        experts += n
        active_experts += n * moe.config.top_k // moe.config.num_experts
        for r in (moe.router, *moe.hop_routers):
            routing += r.routing_parameters()
            linear_router += r.linear_router_parameters()
    attention_routing = sum(p.numel() for attn in model.sparse_attention_layers() for p in attn.router.parameters())
    return {
        "total": total,
        "embedding": embedding,
        "experts": experts,
        "active": total - experts + active_experts,
        "routing": routing,
        "linear_router": linear_router,
        "attention_routing": attention_routing,
    }
