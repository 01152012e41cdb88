"""Online k-means router (*Routers Learn the Geometry of Their Experts*, arXiv 2605.12476).

Legend: T tokens, D model dim, E experts, K slots per token.

A parameter-free router: each expert e keeps a centroid c_e (a buffer [E, D], float32, on the
unit sphere). Scores s_te = cos(x_t, c_e), computed in float32. Experts are *chosen* by top-k of
s + b (b: an optional loss-free balancing bias, a buffer); the *weights* are
softmax(temperature * s) over all experts gathered at the chosen slots (renormalised when k > 1
unless ``renormalize`` says otherwise). No gradient reaches the centroids; the gradient to x flows
through the weights. Logits (temperature * s) and probabilities go to :meth:`Router.finish`, so
the load-balance and z-loss options behave as for the other routers.

Design decisions:

- Forward in training mode accumulates, under no_grad, the sum of the *normalised* inputs routed
  to each expert and the per-expert counts. **All k slots count, weighted equally** (each token
  adds its unit vector to each of its k experts): an expert's centroid follows every token it
  actually processes. Eval mode accumulates nothing. The routing never reads the accumulators,
  so forward is a pure function of (x, centroids, bias): calling it twice gives the same Routing.
- :meth:`KMeansRouter.after_optimizer_step` applies c_e <- normalise((1 - ema) c_e + ema m_e),
  m_e = mean of the normalised inputs routed to e since the last update, for experts that
  received tokens (the others keep their centroid; so does one whose update would be ~0); an
  update with nothing counted changes nothing (not even the drift statistic). With
  ema = 1 the centroid becomes the normalised mean of its routed inputs. Then, if balance > 0,
  b += balance * sign(mean load - load), centred to mean 0 (as the sigmoid router's loss-free
  bias), with load = the counts; finally the accumulators are cleared.
- Centroids live on the unit sphere (init "random": unit-normal draws from the global torch RNG
  at construction, like ``nn.init``, projected to the sphere), so the EMA mixes vectors of
  comparable length; the cosine scores do not depend on the centroid norm anyway.
- Every piece of state (centroids, sums, counts, bias, last drift) is a buffer kept in float32
  under ``.to(bf16)``: a checkpoint taken between forward and update resumes exactly.
- Routing parameters: 0 (nothing is learned by gradient); the state is an E·D centroid buffer
  (+ E·D sums, 2E + 1 scalars).
- Stats: ``centroid_drift`` = mean over experts of 1 - cos(old, new) in the last update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparseroute.moe.routers.base import Router, RouterConfig, expert_softmax, register_router
from sparseroute.routing import Routing

_STATE = ("centroids", "sum_since_update", "count_since_update", "selection_bias", "last_drift")
_EPS = 1e-12


def _number(cfg: object, name: str) -> float:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class KMeansConfig(RouterConfig):
    """ema: EMA rate of the centroid update, in (0, 1]. temperature: inverse temperature of the
    softmax over cosine scores (> 0). renormalize: as in topk (None: when k > 1). balance:
    step of the loss-free selection bias per update (>= 0; 0 = off). init: "random"."""

    ema: float = 0.05
    temperature: float = 10.0
    renormalize: bool | None = None
    balance: float = 0.0
    init: str = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < _number(self, "ema") <= 1.0:
            raise ValueError(f"ema must be in (0, 1]; got {self.ema!r}")
        if not _number(self, "temperature") > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature!r}")
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise ValueError(f"renormalize must be None, True or False; got {self.renormalize!r}")
        if not _number(self, "balance") >= 0:
            raise ValueError(f"balance must be >= 0 (0 turns balancing off); got {self.balance!r}")
        if self.init not in ("random",):
            raise ValueError(f"init must be one of 'random'; got {self.init!r}")


@register_router("kmeans")
class KMeansRouter(Router):
    Config = KMeansConfig
    pinned_buffers = _STATE  # fp32 under .to(bf16): EMA steps and counts would round away

    def __init__(self, d_model, num_experts, top_k, config=None):
        super().__init__(d_model, num_experts, top_k, config)
        E, D = num_experts, d_model
        self.register_buffer("centroids", F.normalize(torch.randn(E, D), dim=-1))
        self.register_buffer("sum_since_update", torch.zeros(E, D))
        self.register_buffer("count_since_update", torch.zeros(E))
        self.register_buffer("selection_bias", torch.zeros(E))
        self.register_buffer("last_drift", torch.zeros(()))

    def expert_directions(self) -> Tensor:
        """The centroids, which live in model space."""
        return self.centroids.detach().float()

    def scores(self, x_TD: Tensor) -> Tensor:
        """[T, E] cos(x_t, c_e) in float32; differentiable in x, not in the centroids."""
        x_TD = F.normalize(x_TD.float(), dim=-1)
        return x_TD @ F.normalize(self.centroids.detach(), dim=-1).t()

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        scores_TE = self.scores(x_TD)
        logits_TE = self.config.temperature * scores_TE
        probs_TE = expert_softmax(logits_TE)
        select_TE = scores_TE.detach()
        if self.config.balance > 0:
            select_TE = select_TE + self.selection_bias
        _, idx_TK = torch.topk(select_TE, self.top_k, dim=-1)
        w_TK = probs_TE.gather(1, idx_TK)
        renorm = self.top_k > 1 if self.config.renormalize is None else self.config.renormalize
        if renorm:
            w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.training:
            self._accumulate(x_TD, idx_TK)
        return self.finish(
            idx_TK, w_TK, logits_TE=logits_TE, probs_TE=probs_TE,
            extra_stats={"centroid_drift": self.last_drift.clone()},
        )

    @torch.no_grad()
    def _accumulate(self, x_TD: Tensor, idx_TK: Tensor) -> None:
        K = idx_TK.shape[1]
        xn_TD = F.normalize(x_TD.detach().float(), dim=-1)
        flat = idx_TK.reshape(-1)
        self.sum_since_update.index_add_(0, flat, xn_TD.repeat_interleave(K, dim=0))
        self.count_since_update += torch.bincount(flat, minlength=self.num_experts).to(self.count_since_update)

    @torch.no_grad()
    def update_centroids(self) -> None:
        """Apply the EMA step from the accumulated inputs, update the bias, clear the accumulators."""
        counts_E = self.count_since_update
        got_E = counts_E > 0
        if not bool(got_E.any()):  # nothing routed in training since the last update: no-op
            return
        old_ED = self.centroids.clone()
        mean_ED = self.sum_since_update / counts_E.clamp_min(1).unsqueeze(1)
        ema = self.config.ema
        new_ED = (1.0 - ema) * old_ED + ema * mean_ED
        norm_E = new_ED.norm(dim=-1)
        keep_E = ~got_E | (norm_E <= 1e-6)
        self.centroids.copy_(torch.where(keep_E.unsqueeze(1), old_ED, new_ED / norm_E.clamp_min(_EPS).unsqueeze(1)))
        drift_E = (1.0 - F.cosine_similarity(old_ED, self.centroids, dim=-1, eps=_EPS)).clamp_min(0)
        self.last_drift.copy_(drift_E.mean())
        if self.config.balance > 0:
            self.selection_bias += self.config.balance * torch.sign(counts_E.mean() - counts_E)
            self.selection_bias -= self.selection_bias.mean()
        self.sum_since_update.zero_()
        self.count_since_update.zero_()

    def after_optimizer_step(self) -> None:
        self.update_centroids()


    def routing_parameters(self) -> int:
        """0: nothing is learned by gradient (the state is the E·D centroid buffer)."""
        return 0
