"""Geometric (cosine) router of *Equifinality in Mixture of Experts*.

Legend: T tokens, D model dim, E experts, K slots per token, R routing-space dim (d_space).

z = P x (P: R x D, learned); logits_e = tau * cos(z, c_e) with learned centroids c_e in R^R and a
learnable inverse temperature tau (used as |tau|, initialised at 10 as in the authors' earlier
semantic-resonance code); p = softmax(logits) over all experts; top-k, renormalised.
Routing parameters: D·R + E·R + 1 (a linear router has D·E).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseroute.kernels import gemm
from sparseroute.moe.routers.base import Router, RouterConfig, register_router, softmax_topk
from sparseroute.routing import Routing


@dataclass(frozen=True, kw_only=True)
class CosineConfig(RouterConfig):
    """d_space: routing-space dimension. temperature: initial inverse temperature tau.
    learn_temperature: tau is a parameter (else a fixed buffer). renormalize: as in topk
    (None: when k > 1)."""

    d_space: int = 64
    temperature: float = 10.0
    learn_temperature: bool = True
    renormalize: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.d_space, int) or isinstance(self.d_space, bool) or self.d_space <= 0:
            raise ValueError(f"d_space must be a positive int; got {self.d_space!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature!r}")


@register_router("cosine")
class CosineRouter(Router):
    Config = CosineConfig

    def __init__(self, d_model, num_experts, top_k, config=None):
        super().__init__(d_model, num_experts, top_k, config)
        R = self.config.d_space
        self.proj = nn.Parameter(torch.empty(R, d_model))
        nn.init.normal_(self.proj, std=d_model**-0.5)
        self.centroids = nn.Parameter(torch.empty(num_experts, R))
        nn.init.normal_(self.centroids)
        tau = torch.tensor(float(self.config.temperature))
        if self.config.learn_temperature:
            self.inv_temperature = nn.Parameter(tau)
        else:
            self.register_buffer("inv_temperature", tau)

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        z_TR = F.normalize(gemm.linear(x_TD, self.proj).float(), dim=-1)
        c_ER = F.normalize(self.centroids.float(), dim=-1)
        logits_TE = self.inv_temperature.abs() * (z_TR @ c_ER.t())
        renorm = self.top_k > 1 if self.config.renormalize is None else self.config.renormalize
        probs_TE, idx_TK, w_TK = softmax_topk(logits_TE, self.top_k, renorm)
        return self.finish(idx_TK, w_TK, logits_TE=logits_TE, probs_TE=probs_TE)

    def expert_directions(self) -> Tensor:
        """Pᵀ ĉ_e: each normalised centroid mapped back to model space."""
        return F.normalize(self.centroids.detach().float(), dim=-1) @ self.proj.detach().float()

    @classmethod
    def flops_per_token(cls, config, d_model, num_experts, seq_len):
        """Projection to the routing space and cosine against the centroids: 2·(D·R + R·E)."""
        return 2.0 * (d_model * config.d_space + config.d_space * num_experts)

    def routing_parameters(self) -> int:
        """D·R + E·R + 1 (the temperature counts whether or not it is learned)."""
        return self.proj.numel() + self.centroids.numel() + 1
