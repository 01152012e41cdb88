"""Sigmoid router with loss-free balancing (DeepSeek-V3).

Legend: T tokens, D model dim, E experts, K slots per token.

Scores s = sigmoid(W x). Experts are *chosen* by top-k of s + b, where b is a per-expert bias in a
buffer that no gradient touches; the *weights* are the raw scores of the chosen experts
(normalised to sum to 1 by default, then times ``scale``). After each optimizer step the training
loop calls :meth:`SigmoidRouter.after_optimizer_step`, which applies
b += gamma * sign(mean load - load) from the load counted since the previous update, then
centres b to mean zero (as torchtitan does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparseroute.moe.routers.base import RouterConfig, register_router
from sparseroute.moe.routers.topk import LinearRouter
from sparseroute.routing import Routing


@dataclass(frozen=True, kw_only=True)
class SigmoidConfig(RouterConfig):
    """bias_update_rate: gamma of the loss-free update (DeepSeek-V3: 1e-3).
    renormalize: normalise the chosen scores to sum to 1. scale: multiply the weights
    (DeepSeek's routed scaling factor). The Switch balance loss is off by default (loss-free)."""

    load_balance_coef: float = 0.0
    bias_update_rate: float = 1e-3
    renormalize: bool = True
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.bias_update_rate >= 0:
            raise ValueError(f"bias_update_rate must be >= 0; got {self.bias_update_rate!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0; got {self.scale!r}")


@register_router("sigmoid")
class SigmoidRouter(LinearRouter):
    Config = SigmoidConfig
    # fp32 under .to(bf16): in bf16 a 1e-3 bias step vanishes once |b| >= 0.5 and counts above 256 round
    pinned_buffers = ("selection_bias", "load_since_update")

    def __init__(self, d_model, num_experts, top_k, config=None):
        super().__init__(d_model, num_experts, top_k, config)
        self.register_buffer("selection_bias", torch.zeros(num_experts))
        self.register_buffer("load_since_update", torch.zeros(num_experts))

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        _, idx_TK = torch.topk(scores_TE.detach() + self.selection_bias, self.top_k, dim=-1)
        w_TK = scores_TE.gather(1, idx_TK)
        if self.config.renormalize:
            w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        w_TK = w_TK * self.config.scale
        routing = self.finish(
            idx_TK,
            w_TK,
            logits_TE=logits_TE,
            probs_TE=scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20),
        )
        if self.training:
            with torch.no_grad():
                self.load_since_update += routing.stats["tokens_per_expert"].to(self.load_since_update)
        return routing


    @torch.no_grad()
    def update_bias(self, load_E: Tensor | None = None) -> None:
        """b += gamma * sign(mean(load) - load), then centre b. ``load_E`` defaults to the load
        counted in training forwards since the last update (which is then reset)."""
        load = self.load_since_update if load_E is None else load_E.to(self.load_since_update)
        if load.sum() > 0:
            self.selection_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
            self.selection_bias -= self.selection_bias.mean()
        self.load_since_update.zero_()

    def after_optimizer_step(self) -> None:
        self.update_bias()
