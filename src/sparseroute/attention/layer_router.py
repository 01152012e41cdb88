"""Flux Attention-style layer-level routing: per input sequence, which attention layers run
sparse and which run dense.

:class:`LayerRouter` (``n_layers`` L, ``d_model`` D): the sequence's mean-pooled input -> Linear ->
one logit per layer, p = sigmoid(logit) the probability that the layer runs sparse.

- Inference (``eval``): exactly m = round(target_sparse · L) layers (half rounds up) run sparse,
  and they are contiguous: the run [i, i + m) of largest summed logit (the first on ties). A
  contiguous run keeps the dense layers together, so a deployment switches attention kernels
  (and KV-cache layouts) at most twice per sequence.
- Training: each layer independently, by a straight-through Gumbel-sigmoid:
  p̃ = sigmoid((logit + logistic noise) / temperature), sparse = p̃ > 0.5, and the gate
  ``gate = hard + p̃ - p̃.detach()`` of the chosen path (hard = 1; p̃ for sparse, 1 - p̃ for
  dense). Its forward value is exactly 1; multiplying the chosen path's output by it gives the
  router a gradient as if the unexecuted path's output were zero (only one path runs, so the
  full straight-through difference y_sparse - y_dense is not available). The loss
  ``flux_target = loss_coef · (mean p - target_sparse)²`` (noise-free p, over batch and layers)
  pulls the sparse fraction to the target. ``noise=False`` drops the noise (deterministic).

:class:`FluxAttention` wraps one :class:`SparseAttention` and runs, per sample, either dense
causal attention (``F.scaled_dot_product_attention(is_causal=True)`` on the dense samples only)
or the layer's router and block-sparse executor (on the sparse samples only): the saving is
real, each sample pays for one path. Both paths share the layer's q/k/v/o projections and RoPE.

How a decoder LM uses it (the LM owns the loop; nothing here depends on the LM)::

    router = LayerRouter(n_layers=L, d_model=D)
    layers = [FluxAttention(SparseAttention(D, H, router="moba", block_size=64)) for _ in range(L)]
    decision = router(h0_BSD)                    # once per forward, from the embeddings
    for l, (attn, mlp) in enumerate(blocks):
        a, routing = layers[l](norm(h), decision.sparse_BL[:, l], gate_B=decision.gate_BL[:, l])
        h = h + a; ...
    loss = lm_loss + sum(decision.losses.values()) + (routing losses of the sparse layers)

Legend: B batch, S sequence, D model dim, L layers, H heads, Hkv kv-heads, Dh head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseroute.attention.module import SparseAttention
from sparseroute.attention.routers.base import check_count
from sparseroute.attention.selection import BlockRouting

__all__ = ["FluxAttention", "LayerDecision", "LayerRouter", "LayerRouterOptions", "best_contiguous_run"]


@dataclass(frozen=True, kw_only=True)
class LayerRouterOptions:
    """target_sparse: fraction of layers that run sparse, in [0, 1].
    temperature: of the Gumbel-sigmoid in training (> 0).
    loss_coef: weight of the ``flux_target`` loss (>= 0).
    noise: add logistic (Gumbel-difference) noise in training."""

    target_sparse: float = 0.5
    temperature: float = 1.0
    loss_coef: float = 1.0
    noise: bool = True

    def __post_init__(self) -> None:
        t = self.target_sparse
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise ValueError(f"target_sparse must be a number in [0, 1]; got {t!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"temperature must be a number > 0; got {t!r}")
        c = self.loss_coef
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0:
            raise ValueError(f"loss_coef must be a number >= 0; got {c!r}")
        if not isinstance(self.noise, bool):
            raise ValueError(f"noise must be True or False; got {self.noise!r}")


@dataclass
class LayerDecision:
    """sparse_BL: bool [B, L], the layers each sequence runs sparse.
    gate_BL: [B, L], forward value 1; in training it carries the router's gradient (multiply
        the chosen path's output of layer l by ``gate_BL[:, l]``).
    probs_BL: sigmoid(logits), the noise-free sparse probabilities.
    losses / stats: as a routing's (``flux_target``; ``sparse_fraction``)."""

    sparse_BL: Tensor
    gate_BL: Tensor
    probs_BL: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


def best_contiguous_run(logits_BL: Tensor, m: int) -> Tensor:
    """bool [B, L]: for each row the run of m consecutive layers with the largest summed logit
    (the first such run on ties); all False for m = 0."""
    B, L = logits_BL.shape
    out = torch.zeros(B, L, dtype=torch.bool, device=logits_BL.device)
    if m <= 0:
        return out
    m = min(m, L)
    c = F.pad(logits_BL.detach().double().cumsum(-1), (1, 0))
    sums_BI = c[:, m:] - c[:, :-m]  # [B, L - m + 1]: run starting at i
    start_B1 = sums_BI.argmax(-1, keepdim=True)
    pos = torch.arange(L, device=logits_BL.device).view(1, L)
    return (pos >= start_B1) & (pos < start_B1 + m)


class LayerRouter(nn.Module):
    """Per sequence and layer: sparse or dense attention (see the module docstring)."""

    def __init__(self, n_layers: int, d_model: int, options: LayerRouterOptions | None = None, **kw) -> None:
        super().__init__()
        check_count("n_layers", n_layers)
        check_count("d_model", d_model)
        if options is not None and kw:
            raise ValueError("give either options or keyword options, not both")
        self.options = options if options is not None else LayerRouterOptions(**kw)
        self.n_layers = n_layers
        self.proj = nn.Linear(d_model, n_layers)

    @property
    def n_sparse(self) -> int:
        """round(target_sparse · L), half up: the sparse layers at inference."""
        return int(math.floor(self.options.target_sparse * self.n_layers + 0.5))

    def forward(self, x_BSD: Tensor) -> LayerDecision:
        if x_BSD.dim() != 3:
            raise ValueError(f"x must be [B, S, D]; got shape {tuple(x_BSD.shape)}")
        o = self.options
        logits_BL = self.proj(x_BSD.mean(1))
        probs_BL = logits_BL.sigmoid()
        losses = {"flux_target": o.loss_coef * (probs_BL.mean() - o.target_sparse) ** 2}
        if self.training:
            z = logits_BL
            if o.noise:
                u = torch.rand_like(logits_BL).clamp(1e-6, 1 - 1e-6)
                z = z + u.log() - (-u).log1p()
            soft = (z / o.temperature).sigmoid()
            sparse_BL = soft.detach() > 0.5
            chosen = torch.where(sparse_BL, soft, 1 - soft)
            gate_BL = 1.0 + chosen - chosen.detach()
        else:
            sparse_BL = best_contiguous_run(logits_BL, self.n_sparse)
            gate_BL = torch.ones_like(logits_BL).detach()
        stats = {"sparse_fraction": sparse_BL.float().mean().detach()}
        return LayerDecision(sparse_BL, gate_BL, probs_BL, losses=losses, stats=stats)


class FluxAttention(nn.Module):
    """One attention layer that runs dense or sparse per sample.

    ``forward(x, sparse_B, cos, sin, gate_B=None) -> (y [B, S, D], routing)``: ``sparse_B`` bool
    [B] picks the path of each sample; ``routing`` is the sparse samples' :class:`BlockRouting`
    (its batch dim counts only them, in batch order), None when no sample runs sparse. ``gate_B``
    (e.g. ``LayerDecision.gate_BL[:, l]``) multiplies each sample's output.
    """

    def __init__(self, attention: SparseAttention) -> None:
        super().__init__()
        if not isinstance(attention, SparseAttention):
            raise ValueError(f"attention must be a SparseAttention; got {type(attention).__name__}")
        self.attention = attention

    def dense(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal SDPA, [B, H, S, Dh] (GQA: a kv-head serves its group of query heads)."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    def forward(
        self,
        x_BSD: Tensor,
        sparse_B: Tensor,
        cos_SK: Tensor | None = None,
        sin_SK: Tensor | None = None,
        *,
        gate_B: Tensor | None = None,
    ) -> tuple[Tensor, BlockRouting | None]:
        if x_BSD.dim() != 3:
            raise ValueError(f"x must be [B, S, D]; got shape {tuple(x_BSD.shape)}")
        B, S, _ = x_BSD.shape
        if sparse_B.shape != (B,) or sparse_B.dtype != torch.bool:
            raise ValueError(
                f"sparse_B must be a bool tensor of shape [{B}]; got {sparse_B.dtype} {tuple(sparse_B.shape)}"
            )
        if gate_B is not None and gate_B.shape != (B,):
            raise ValueError(f"gate_B must have shape [{B}]; got {tuple(gate_B.shape)}")
        attn = self.attention
        q, k, v = attn.project(x_BSD, cos_SK, sin_SK)
        sp = sparse_B.nonzero().flatten()
        de = (~sparse_B).nonzero().flatten()
        n_sp = sp.numel()
        routing = None
        if n_sp == B:
            y_BHSD, routing = attn.router.attend(q, k, v, x_BSD, attn._execute)
        elif n_sp == 0:
            y_BHSD = self.dense(q, k, v)
        else:
            y_sp, routing = attn.router.attend(q[sp], k[sp], v[sp], x_BSD[sp], attn._execute)
            y_de = self.dense(q[de], k[de], v[de])
            y_BHSD = torch.zeros(B, *y_sp.shape[1:], dtype=y_sp.dtype, device=y_sp.device)
            y_BHSD = y_BHSD.index_copy(0, sp, y_sp).index_copy(0, de, y_de.to(y_sp.dtype))
        y = attn.o(y_BHSD.transpose(1, 2).reshape(B, S, -1))
        if gate_B is not None:
            y = y * gate_B.to(y.dtype).view(B, 1, 1)
        return y, routing
