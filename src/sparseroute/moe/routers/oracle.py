"""Debug/oracle routers for timing executors apart from learned skew.

Legend: T tokens, D model dim, E experts, K slots per token.

round_robin: token t uses experts (t·k + j) mod E for j < k: perfectly balanced when E divides T·k.
all_to_one: every token uses experts 0..k-1: the worst possible skew.
Weights are 1/k; nothing is learned and the input is ignored (gradients reach only the experts).
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from sparseroute.moe.routers.base import Router, register_router
from sparseroute.routing import Routing


class _OracleRouter(Router):
    @classmethod
    def flops_per_token(cls, config, d_model, num_experts, seq_len):
        """A fixed pattern costs no matmul."""
        return 0.0

    @abc.abstractmethod
    def pattern(self, T: int, device) -> Tensor:
        """[T, K] expert indices."""

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        idx_TK = self.pattern(x_TD.shape[0], x_TD.device)
        w_TK = torch.full(idx_TK.shape, 1.0 / self.top_k, device=x_TD.device)
        return self.finish(idx_TK, w_TK)


@register_router("round_robin")
class RoundRobinRouter(_OracleRouter):
    def pattern(self, T: int, device) -> Tensor:
        t = torch.arange(T, device=device).unsqueeze(1)
        j = torch.arange(self.top_k, device=device).unsqueeze(0)
        return (t * self.top_k + j) % self.num_experts


@register_router("all_to_one")
class AllToOneRouter(_OracleRouter):
    def pattern(self, T: int, device) -> Tensor:
        return torch.arange(self.top_k, device=device).expand(T, self.top_k).contiguous()
