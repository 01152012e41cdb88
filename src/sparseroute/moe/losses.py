"""Auxiliary router losses. Legend: T tokens, E experts, K slots."""

from __future__ import annotations

import torch
from torch import Tensor


def load_balance_loss(probs_TE: Tensor, indices_TK: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer load-balancing loss: E * sum_e f_e * P_e.

    f_e is the fraction of routed (token, slot) pairs sent to expert e (not differentiable),
    P_e the mean router probability of e over tokens. Equals 1 for a perfectly uniform router.
    """
    T = probs_TE.shape[0]
    if T == 0:
        return probs_TE.sum() * 0
    flat = indices_TK.reshape(-1)
    valid = flat[flat >= 0]
    counts = torch.bincount(valid, minlength=num_experts)[:num_experts].to(probs_TE.dtype)
    f_E = counts / counts.sum().clamp_min(1)
    P_E = probs_TE.mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
