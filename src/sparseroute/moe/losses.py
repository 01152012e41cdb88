"""Auxiliary router losses. Legend: T tokens, E experts, K slots, B sequences, S sequence length, N chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparseroute.routing import expert_load


def load_balance_loss(probs_TE: Tensor, indices_TK: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer load-balancing loss: E * sum_e f_e * P_e.

    f_e is the fraction of routed (token, slot) pairs sent to expert e (not differentiable),
    P_e the mean router probability of e over tokens. Equals 1 for a perfectly uniform router.
    """
    T = probs_TE.shape[0]
    if T == 0:
        return probs_TE.sum() * 0
    counts = expert_load(indices_TK, num_experts).to(probs_TE.dtype)
    f_E = counts / counts.sum().clamp_min(1)
    P_E = probs_TE.mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def activation_locality_loss(a0_TE: Tensor, seq_len: int, alpha: float = 100.0) -> Tensor:
    """BlockFFN activation-locality loss (arXiv 2507.08771), unscaled by its coefficient.

    Mean over the (token, expert) pairs of every token that has a predecessor *in its own
    sequence* of BCE-with-logits(alpha · a0[prev], sigmoid(alpha · a0[cur])): a0_TE are the raw
    (pre-ReLU) router scores and the T tokens are T / seq_len sequences of consecutive tokens, so
    the first token of each sequence is masked. The target is *not* detached, as in the authors'
    code (thunlp/BlockFFN ``transfer_regularization``): both tokens of a pair get gradient.
    Zero (with a graph) when no token has a predecessor.
    """
    T, E = a0_TE.shape
    if not isinstance(seq_len, int) or seq_len < 1 or T % seq_len:
        raise ValueError(f"seq_len must be a positive int that divides the {T} tokens; got {seq_len!r}")
    if seq_len < 2 or T == 0:
        return a0_TE.sum() * 0
    z_BSE = alpha * _at_least_fp32(a0_TE).reshape(T // seq_len, seq_len, E)
    return F.binary_cross_entropy_with_logits(z_BSE[:, :-1], torch.sigmoid(z_BSE[:, 1:]))


def chunk_sparsity_loss(act_TE: Tensor, seq_len: int, chunk: int, eps: float = 1e-5) -> Tensor:
    """BlockFFN chunk-sparsification loss (arXiv 2507.08771), unscaled by its coefficient.

    act_TE >= 0 are the router activations; p_ik = act_ik / (sum_e act_ie + eps) (0 for a token with
    no active expert). Each sequence of seq_len consecutive tokens is cut into chunks of ``chunk``
    tokens; a trailing partial chunk is *included* (shorter, so every token is regularised even
    when seq_len < chunk). For chunk c and expert k, P_ck = 1 - exp(sum_{i in c} log(1 - p_ik + eps))
    ≈ the probability that k is used somewhere in the chunk; the loss is the mean of P over chunks
    and experts. Both eps placements follow the authors' code (thunlp/BlockFFN
    ``chunk_regularization`` and the ``rms`` branch of ``BLockFeedForward``).
    """
    T, E = act_TE.shape
    if not isinstance(seq_len, int) or seq_len < 1 or T % seq_len:
        raise ValueError(f"seq_len must be a positive int that divides the {T} tokens; got {seq_len!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int; got {chunk!r}")
    if T == 0:
        return act_TE.sum() * 0
    act_TE = _at_least_fp32(act_TE)
    p_TE = act_TE / (act_TE.sum(dim=-1, keepdim=True) + eps)
    n = -(-seq_len // chunk)  # chunks per sequence, the last one possibly partial
    logq_BSE = torch.log(1 - p_TE + eps).reshape(T // seq_len, seq_len, E)
    logq_BSE = F.pad(logq_BSE, (0, 0, 0, n * chunk - seq_len))  # padding adds log 1 = 0
    logq_NE = logq_BSE.reshape(-1, chunk, E).sum(dim=1)
    return (1 - torch.exp(logq_NE)).mean()
