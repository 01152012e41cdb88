"""Hash routing (Roller et al. 2021): a fixed, non-learned expert choice from the token id.

Legend: T tokens, D model dim, E experts, K slots per token.

For each (token id, expert) pair a 32-bit integer hash (seeded) gives a pseudo-random score; the
token goes to the k experts with the highest scores, so the k experts are distinct and each id is
spread uniformly. Weights are 1/k. Nothing is learned and the route of an id never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparseroute.moe.routers.base import Router, RouterConfig, register_router
from sparseroute.routing import Routing

_MASK32 = 0xFFFFFFFF


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (murmur3 finaliser) on int64 tensors; values stay in [0, 2^32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


@dataclass(frozen=True, kw_only=True)
class HashConfig(RouterConfig):
    seed: int = 0
    load_balance_coef: float = 0.0


@register_router("hash")
class HashRouter(Router):
    Config = HashConfig
    needs_token_ids = True

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        assert token_ids_T is not None
        E = self.num_experts
        ids = token_ids_T.to(torch.int64).to(x_TD.device)
        experts = torch.arange(E, device=x_TD.device, dtype=torch.int64)
        key_TE = hash32(ids.unsqueeze(1) * 0x9E3779B1 + self.config.seed) * 131 + experts
        scores_TE = hash32(key_TE)
        _, idx_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        w_TK = torch.full(idx_TK.shape, 1.0 / self.top_k, device=x_TD.device)
        return self.finish(idx_TK, w_TK)

    @classmethod
    def flops_per_token(cls, config, d_model, num_experts, seq_len):
        """Hashing token ids costs no matmul."""
        return 0.0

    def routing_parameters(self) -> int:
        return 0
