"""Selective Sinkhorn routing (arXiv 2511.08972).

Legend: T tokens, D model dim, E experts, K slots per token.

On a training step, with probability p, experts are chosen by the top-k of a balanced entropic
transport plan Pi = argmax <Pi, C> - xi <Pi, log Pi> with rows summing to 1 and columns to T/E,
where C are the (detached) router logits; otherwise, and always at inference, by softmax top-k.
Choice made here: the weights are always the router's softmax probabilities of the chosen experts
(renormalised when k > 1), so the router keeps receiving gradient on Sinkhorn steps too; the plan
only decides *which* experts. No balance loss by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sparseroute.moe.routers.base import RouterConfig, expert_softmax, register_router, softmax_topk, topk_of
from sparseroute.moe.routers.topk import LinearRouter
from sparseroute.routing import Routing


@torch.no_grad()
def sinkhorn_plan(
    cost_TE: Tensor, xi: float = 0.5, max_iters: int = 50, tol: float = 1e-4
) -> tuple[Tensor, int, float]:
    """Log-domain Sinkhorn for max <Pi, C> + xi H(Pi), rows summing to 1, columns to T/E.

    Returns (plan [T, E], iterations used, max relative marginal error). Columns are exact after
    each iteration; iteration stops once every row sum is within ``tol`` of 1.
    """
    T, E = cost_TE.shape
    logK = cost_TE.double() / xi
    log_row = torch.zeros(T, dtype=torch.float64, device=cost_TE.device)  # log 1
    log_col = torch.full((E,), math.log(T / E), dtype=torch.float64, device=cost_TE.device)
    f = torch.zeros(T, dtype=torch.float64, device=cost_TE.device)
    g = torch.zeros(E, dtype=torch.float64, device=cost_TE.device)
    err = float("inf")
    it = 0
    for it in range(1, max_iters + 1):
        f = log_row - torch.logsumexp(logK + g.unsqueeze(0), dim=1)
        g = log_col - torch.logsumexp(logK + f.unsqueeze(1), dim=0)
        row_sums = torch.logsumexp(logK + f.unsqueeze(1) + g.unsqueeze(0), dim=1).exp()
        err = float((row_sums - 1).abs().max())
        if err <= tol:
            break
    plan = (logK + f.unsqueeze(1) + g.unsqueeze(0)).exp()
    return plan.to(cost_TE.dtype), it, err


@dataclass(frozen=True, kw_only=True)
class SinkhornConfig(RouterConfig):
    """probability: chance that a training step uses the transport plan (p). xi: entropic
    regularisation. max_iters, tol: Sinkhorn stopping rule (max relative row-marginal error)."""

    probability: float = 0.01
    xi: float = 0.5
    max_iters: int = 50
    tol: float = 1e-4
    renormalize: bool | None = None
    load_balance_coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1]; got {self.probability!r}")
        if not self.xi > 0:
            raise ValueError(f"xi must be > 0; got {self.xi!r}")
        if not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise ValueError(f"max_iters must be a positive int; got {self.max_iters!r}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0; got {self.tol!r}")


@register_router("sinkhorn")
class SinkhornRouter(LinearRouter):
    Config = SinkhornConfig

    def use_plan(self) -> bool:
        p = self.config.probability
        if not self.training or p == 0.0:
            return False
        if p == 1.0:
            return True
        return bool(torch.rand(()) < p)

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        logits_TE = self.logits(x_TD)
        renorm = self.renormalize()
        extra = {"sinkhorn_applied": torch.zeros(())}
        if self.use_plan() and x_TD.shape[0] > 0:
            probs_TE = expert_softmax(logits_TE)
            cfg = self.config
            plan_TE, iters, err = sinkhorn_plan(logits_TE.detach(), cfg.xi, cfg.max_iters, cfg.tol)
            idx_TK, w_TK = topk_of(plan_TE, self.top_k, renorm, weights_from=probs_TE)
            extra = {
                "sinkhorn_applied": torch.ones(()),
                "sinkhorn_iters": torch.tensor(float(iters)),
                "sinkhorn_marginal_error": torch.tensor(err),
            }
        else:  # plain softmax top-k, through the compiled path on the CPU
            probs_TE, idx_TK, w_TK = softmax_topk(logits_TE, self.top_k, renorm)
        return self.finish(idx_TK, w_TK, logits_TE=logits_TE, probs_TE=probs_TE, extra_stats=extra)
