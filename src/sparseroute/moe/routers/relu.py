"""BlockFFN router (arXiv 2507.08771): ReLU then RMSNorm over experts, no top-k.

Legend: T tokens, D model dim, E experts, K slots per token (here K = E: slot e is expert e).

A0 = W x; A1 = ReLU(A0); A = g * A1 / sqrt(mean_e(A1^2) + eps), g a learnable per-expert gain.
Expert e is active for a token exactly when A[e] > 0, so the number of active experts varies per
token. Statistics: TLS (fraction of inactive experts per token, averaged) and CLS_L (fraction of
experts inactive for every token of a window of L consecutive tokens, averaged over the
non-overlapping windows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparseroute.moe.routers.base import RouterConfig, register_router
from sparseroute.moe.routers.topk import LinearRouter
from sparseroute.routing import Routing


@torch.no_grad()
def token_level_sparsity(active_TE: Tensor) -> Tensor:
    """TLS: mean fraction of experts a token leaves inactive."""
    if active_TE.shape[0] == 0:
        return torch.zeros(())
    return 1.0 - active_TE.float().mean()


@torch.no_grad()
def chunk_level_sparsity(active_TE: Tensor, window: int) -> Tensor:
    """CLS_L: mean over non-overlapping windows of L tokens of the fraction of experts inactive for
    every token of the window (a trailing partial window is ignored; 0 if there is no full one)."""
    T, E = active_TE.shape
    n = T // window
    if n == 0:
        return torch.zeros(())
    used_NE = active_TE[: n * window].reshape(n, window, E).any(dim=1)
    return 1.0 - used_NE.float().mean()


@dataclass(frozen=True, kw_only=True)
class ReLUConfig(RouterConfig):
    """eps: RMSNorm epsilon. cls_window: L of the CLS statistic (BlockFFN reports CLS8)."""

    eps: float = 1e-6
    cls_window: int = 8
    load_balance_coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0; got {self.eps!r}")
        if not isinstance(self.cls_window, int) or self.cls_window < 1:
            raise ValueError(f"cls_window must be a positive int; got {self.cls_window!r}")


@register_router("relu")
class ReLURouter(LinearRouter):
    Config = ReLUConfig
    variable_k = True

    def __init__(self, d_model, num_experts, top_k, config=None):
        super().__init__(d_model, num_experts, top_k, config)
        self.gain = nn.Parameter(torch.ones(num_experts))

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        a0_TE = self.logits(x_TD)
        a1_TE = torch.relu(a0_TE)
        rms_T1 = torch.sqrt(a1_TE.square().mean(dim=-1, keepdim=True) + self.config.eps)
        a_TE = self.gain.float() * a1_TE / rms_T1
        active_TE = a_TE.detach() != 0
        experts = torch.arange(self.num_experts, device=x_TD.device).expand_as(active_TE)
        idx_TE = torch.where(active_TE, experts, torch.full_like(experts, -1))
        w_TE = torch.where(active_TE, a_TE, torch.zeros_like(a_TE))
        extra = {
            "tls": token_level_sparsity(active_TE),
            f"cls{self.config.cls_window}": chunk_level_sparsity(active_TE, self.config.cls_window),
        }
        return self.finish(idx_TE, w_TE, logits_TE=a0_TE, extra_stats=extra)
