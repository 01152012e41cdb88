"""Similarity-aware routing after *Graph of Tokens* (Nguyen et al., arXiv 2505.00792).

Legend: T tokens, D model dim, E experts, K slots per token, R routing-feature dim (d_feat),
N sequences, S sequence length (T = N·S).

The paper makes a token's expert choice depend on the choices of similar tokens (and, in its
attention-aware form, on the preceding attention matrix) to lower the entropy of expert selection
and reduce late-training routing fluctuation. Its exact gating formula was not found; this is our
design, built so that it reduces to plain softmax top-k routing as the temperature goes to 0:

    p_i   = softmax(W x_i)                                     base distribution over E experts
    f_i   = normalise(P x_i)   (features="projection", P: R x D learned)
          | normalise(W x_i)   (features="logits": the router logits themselves)
    a_ij  = softmax_{j <= i, same sequence}( cos(f_i, f_j) / temperature )     causal
          | token_mixing[n, i, j]   (features="attention": given, see below)
    p~_i  = sum_j a_ij p_j
    p^_i  = (1 - mix) p_i + mix p~_i
    experts = top-k of p^_i; weights = p^_i at those experts (renormalised when k > 1 unless
    ``renormalize`` says otherwise).

Self-similarity cos(f_i, f_i) = 1 is the largest possible score, so as temperature -> 0 all of
a_i. goes to the token itself (or to exact duplicates of it, which have the same p), and p^ -> p:
plain top-k routing. ``mix = 0`` is plain routing exactly. Only earlier tokens of the same
sequence (and the token itself) are mixed in, so the router is causal and usable in a decoder LM.

Mixing alone cannot sharpen a distribution (entropy is concave: H(sum_j a_ij p_j) >=
sum_j a_ij H(p_j)); what it does is let an uncertain token borrow the confident, consistent choice
of similar tokens, so similar tokens agree on their experts. ``selection_entropy`` in the stats
(mean entropy of p^) and :func:`sparseroute.routing.routing_fluctuation` measure the effect.

Cost: per sequence an S x S similarity matrix ([N, S, S] batched matmuls with a causal mask), i.e.
O(S^2 (R + E)) time and S^2 floats of memory per sequence (plus the softmax and its gradient):
16 MiB per sequence in fp32 at S = 2048, fine up to there; longer sequences want a blocked form.

The attention-aware form (``features="attention"``) reuses the preceding attention layer's
(row-stochastic, causal) weights as a instead of computing it: no feature projection and no
temperature (``d_feat`` and ``temperature`` are unused). The router then needs ``token_mixing``
([N, S, S]) at every call; :class:`sparseroute.models.TransformerLM` passes the head-averaged
attention probabilities of the same block's attention layer (see ``Block.forward``), with
gradients. The router itself costs no S x S work then; the attention layer pays one extra S x S
matmul per head to materialise its probabilities. :func:`attention_mixed_probs` is the shared step.
With the other features ``token_mixing`` is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseroute.kernels import gemm
from sparseroute.moe.routers.base import RouterConfig, expert_softmax, register_router, softmax_topk, topk_of
from sparseroute.moe.routers.topk import LinearRouter
from sparseroute.routing import Routing, mean_entropy

FEATURES = ("projection", "logits", "attention")


@dataclass(frozen=True, kw_only=True)
class SimilarityConfig(RouterConfig):
    """features: what similarity is measured on, "projection" (learned P x, d_feat dims) or
    "logits" (the router logits); or "attention": no similarity, the given ``token_mixing`` (the
    preceding attention layer's weights) are the mixing weights. d_feat: R, the projection's
    output dim (unused with "logits" and "attention").
    temperature: tau of the similarity softmax (-> 0: plain routing; unused with "attention").
    mix: weight of the mixed distribution, in [0, 1] (0: plain routing). renormalize: as in topk (None: when k > 1)."""

    features: str = "projection"
    d_feat: int = 32
    temperature: float = 0.1
    mix: float = 1.0
    renormalize: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {', '.join(FEATURES)}; got {self.features!r}")
        if not isinstance(self.d_feat, int) or isinstance(self.d_feat, bool) or self.d_feat < 1:
            raise ValueError(f"d_feat must be a positive int; got {self.d_feat!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0; got {self.temperature!r}")
        if not (isinstance(self.mix, (int, float)) and 0.0 <= self.mix <= 1.0):
            raise ValueError(f"mix must be a number in [0, 1]; got {self.mix!r}")
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise ValueError(f"renormalize must be True, False or None (when k > 1); got {self.renormalize!r}")


def _check_mix(mix: float) -> None:
    if not (isinstance(mix, (int, float)) and 0.0 <= mix <= 1.0):
        raise ValueError(f"mix must be a number in [0, 1]; got {mix!r}")


def attention_mixed_probs(probs_TE: Tensor, attn_NSS: Tensor, seq_len: int, mix: float = 1.0) -> Tensor:
    """(1 - mix) p_i + mix sum_j attn[n, i, j] p_j for the T = N·S tokens, per sequence.

    ``attn_NSS`` must be row-stochastic and causal (each row sums to 1, zero above the diagonal),
    as an attention layer's softmax weights are; this is not checked (it would cost a device
    sync). For multi-head attention pass the mean over heads (still row-stochastic). The result
    rows sum to 1. The similarity router uses the same step with its own similarity matrix.
    """
    if probs_TE.dim() != 2:
        raise ValueError(f"probs must be [T, E]; got shape {tuple(probs_TE.shape)}")
    T, E = probs_TE.shape
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1 or T % seq_len:
        raise ValueError(f"seq_len must be a positive int that divides the {T} tokens; got {seq_len!r}")
    N = T // seq_len
    if tuple(attn_NSS.shape) != (N, seq_len, seq_len):
        raise ValueError(
            f"attn must be [N, S, S] = [{N}, {seq_len}, {seq_len}] for {T} tokens in sequences of "
            f"{seq_len}; got shape {tuple(attn_NSS.shape)}"
        )
    _check_mix(mix)
    if mix == 0:
        return probs_TE
    p_NSE = probs_TE.reshape(N, seq_len, E)
    mixed_NSE = torch.bmm(attn_NSS.to(probs_TE.dtype), p_NSE)
    if mix == 1:
        return mixed_NSE.reshape(T, E)
    return ((1.0 - mix) * p_NSE + mix * mixed_NSE).reshape(T, E)


@register_router("similarity")
class SimilarityRouter(LinearRouter):
    """Softmax router whose distributions are mixed with those of similar earlier tokens."""

    Config = SimilarityConfig
    sequence_aware = True
    uses_token_mixing = True

    def __init__(self, d_model, num_experts, top_k, config=None):
        super().__init__(d_model, num_experts, top_k, config)
        if self.config.features == "projection":
            self.proj = nn.Parameter(torch.empty(self.config.d_feat, d_model))
            nn.init.normal_(self.proj, std=d_model**-0.5)
        else:
            self.proj = None

    @property
    def needs_token_mixing(self) -> bool:
        return self.config.features == "attention"

    @classmethod
    def flops_per_token(cls, config, d_model, num_experts, seq_len):
        """Logits 2·D·E, plus per token a row of the [S, S] mixing product 2·E·S, plus for the
        similarity features their projection 2·D·R (R = E for "logits") and a row of the [S, S]
        score product 2·R·S. The batched products run over the full S x S square (the causal mask
        is applied after), so S, not the mean causal context, is what they cost."""
        flops = 2.0 * d_model * num_experts + 2.0 * num_experts * seq_len
        if config.features == "projection":
            flops += 2.0 * d_model * config.d_feat + 2.0 * config.d_feat * seq_len
        elif config.features == "logits":
            flops += 2.0 * num_experts * seq_len
        return flops

    @classmethod
    def attention_flops_per_token(cls, config, d_model, seq_len):
        """The attention-aware form makes the attention layer materialise its probabilities: one
        more full q kᵀ product, 2·D·S per token."""
        return 2.0 * d_model * seq_len if config.features == "attention" else 0.0

    def similarity(self, x_TD: Tensor, logits_TE: Tensor, seq_len: int) -> Tensor:
        """[N, S, S] causal, row-stochastic a_ij = softmax_{j <= i}(cos(f_i, f_j) / temperature)."""
        feats = logits_TE if self.proj is None else gemm.linear(x_TD, self.proj).float()
        f_NSR = F.normalize(feats, dim=-1).reshape(-1, seq_len, feats.shape[-1])
        scores_NSS = torch.bmm(f_NSR, f_NSR.transpose(1, 2)) / self.config.temperature
        causal_SS = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x_TD.device).tril()
        return scores_NSS.masked_fill(~causal_SS, float("-inf")).softmax(dim=-1)

    def _require_token_mixing(self, token_mixing: Tensor | None) -> None:
        if self.needs_token_mixing and token_mixing is None:
            raise ValueError(
                "token_mixing: features='attention' needs the attention weights of the preceding attention "
                "layer: use it inside TransformerLM, or pass token_mixing (an [N, S, S] row-stochastic, "
                "causal matrix) to the router / MoE layer"
            )

    def mixed_probs(
        self, x_TD: Tensor, seq_len: int, token_mixing: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, base p, mixed p^), each [T, E]. ``token_mixing`` ([N, S, S]) is used (and
        required) with features="attention" only."""
        self._require_token_mixing(token_mixing)
        logits_TE = self.logits(x_TD)
        probs_TE = expert_softmax(logits_TE)
        if self.config.mix == 0:
            return logits_TE, probs_TE, probs_TE
        if self.needs_token_mixing:
            attn_NSS = token_mixing
        else:
            attn_NSS = self.similarity(x_TD, logits_TE, seq_len)
        return logits_TE, probs_TE, attention_mixed_probs(probs_TE, attn_NSS, seq_len, self.config.mix)

    def route(
        self, x_TD: Tensor, token_ids_T: Tensor | None, *, seq_len: int, token_mixing: Tensor | None = None
    ) -> Routing:
        if self.config.mix == 0:  # exactly the topk router, through the same (compiled) path
            self._require_token_mixing(token_mixing)
            logits_TE = self.logits(x_TD)
            probs_TE, idx_TK, w_TK = softmax_topk(logits_TE, self.top_k, self.renormalize())
            mixed_TE = probs_TE
        else:
            logits_TE, probs_TE, mixed_TE = self.mixed_probs(x_TD, seq_len, token_mixing)
            idx_TK, w_TK = topk_of(mixed_TE, self.top_k, self.renormalize())
        with torch.no_grad():
            stats = {"selection_entropy": mean_entropy(mixed_TE.detach()), "base_entropy": mean_entropy(probs_TE.detach())}
        return self.finish(idx_TK, w_TK, logits_TE=logits_TE, probs_TE=mixed_TE, extra_stats=stats)
