"""Random-fixed router: a fixed random projection drawn from a seed at construction.

Legend: T tokens, D model dim, E experts, K slots per token.

logits = W0 x with W0 ~ N(0, 1/D) frozen (a buffer); softmax; top-k (renormalised when k > 1).
Routing depends on the input but nothing about it is learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparseroute.kernels import gemm
from sparseroute.moe.routers.base import Router, RouterConfig, register_router, softmax_topk
from sparseroute.routing import Routing


@dataclass(frozen=True, kw_only=True)
class RandomFixedConfig(RouterConfig):
    seed: int = 0
    renormalize: bool | None = None
    load_balance_coef: float = 0.0


@register_router("random_fixed")
class RandomFixedRouter(Router):
    Config = RandomFixedConfig

    def __init__(self, d_model, num_experts, top_k, config=None):
        super().__init__(d_model, num_experts, top_k, config)
        gen = torch.Generator().manual_seed(self.config.seed)
        self.register_buffer("weight", torch.randn(num_experts, d_model, generator=gen) * d_model**-0.5)

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        logits_TE = gemm.linear(x_TD, self.weight.to(x_TD.dtype)).float()
        renorm = self.top_k > 1 if self.config.renormalize is None else self.config.renormalize
        probs_TE, idx_TK, w_TK = softmax_topk(logits_TE, self.top_k, renorm)
        return self.finish(idx_TK, w_TK, logits_TE=logits_TE, probs_TE=probs_TE)

    def expert_directions(self) -> Tensor:
        return self.weight.detach().float()

    def routing_parameters(self) -> int:
        return self.weight.numel()
