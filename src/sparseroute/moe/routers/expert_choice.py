"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

Legend: T tokens, D model dim, E experts, K slots per token (here K = E: slot e is expert e).

p = softmax(W x) over experts; expert e takes the C tokens with the largest p[:, e], where
C = ceil(capacity_factor * T * k / E) (clipped to [1, T]). A token may be taken by 0..E experts;
its weights are the probabilities of the experts that took it. The choice looks at the whole
batch, so in a causal LM it lets later tokens influence earlier ones' routing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparseroute.moe.routers.base import RouterConfig, expert_softmax, register_router
from sparseroute.moe.routers.topk import LinearRouter
from sparseroute.routing import Routing, capacity_for


@dataclass(frozen=True, kw_only=True)
class ExpertChoiceConfig(RouterConfig):
    capacity_factor: float = 1.0
    load_balance_coef: float = 0.0  # balanced by construction

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0; got {self.capacity_factor!r}")


@register_router("expert_choice")
class ExpertChoiceRouter(LinearRouter):
    Config = ExpertChoiceConfig
    variable_k = True

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, capacity_for(self.config.capacity_factor, num_tokens, self.top_k, self.num_experts))

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = expert_softmax(logits_TE)
        if T == 0:
            idx = torch.empty(0, E, dtype=torch.long, device=x_TD.device)
            return self.finish(idx, probs_TE[:, :E] * 0, logits_TE=logits_TE, probs_TE=probs_TE)
        C = self.capacity(T)
        _, tok_EC = torch.topk(probs_TE.detach().t(), C, dim=-1)  # [E, C]
        chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device)
        chosen_TE.scatter_(0, tok_EC.t(), True)
        experts = torch.arange(E, device=x_TD.device).expand(T, E)
        idx_TE = torch.where(chosen_TE, experts, torch.full_like(experts, -1))
        w_TE = torch.where(chosen_TE, probs_TE, torch.zeros_like(probs_TE))
        return self.finish(idx_TE, w_TE, logits_TE=logits_TE, probs_TE=probs_TE)
