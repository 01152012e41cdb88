"""Softmax top-k router (k=1: Switch; k=2 with renormalisation: Mixtral).

Legend: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparseroute.kernels import gemm
from sparseroute.moe.routers.base import Router, RouterConfig, register_router, softmax_topk
from sparseroute.routing import Routing


@dataclass(frozen=True, kw_only=True)
class TopKConfig(RouterConfig):
    """renormalize: rescale the k chosen probabilities to sum to 1; ``None`` means "when k > 1"
    (with k = 1 renormalising would make every weight 1 and starve the router of gradient).
    jitter: Switch-style multiplicative noise on the router input, U(1-jitter, 1+jitter), in
    training only (the experts see the clean input).
    """

    renormalize: bool | None = None
    jitter: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1); got {self.jitter!r}")


class LinearRouter(Router):
    """Shared base: a linear projection to expert logits."""

    def __init__(self, d_model, num_experts, top_k, config=None):
        super().__init__(d_model, num_experts, top_k, config)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def logits(self, x_TD: Tensor) -> Tensor:
        jitter = getattr(self.config, "jitter", 0.0)
        if self.training and jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - jitter, 1.0 + jitter)
        return gemm.linear(x_TD, self.weight).float()

    def expert_directions(self) -> Tensor:
        return self.weight.detach().float()

    def renormalize(self) -> bool:
        r = getattr(self.config, "renormalize", None)
        return self.top_k > 1 if r is None else r


@register_router("topk")
class TopKRouter(LinearRouter):
    """logits = W x; p = softmax(logits); the k largest p, optionally renormalised."""

    Config = TopKConfig

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE, idx_TK, w_TK = softmax_topk(logits_TE, self.top_k, self.renormalize())
        return self.finish(idx_TK, w_TK, logits_TE=logits_TE, probs_TE=probs_TE)
