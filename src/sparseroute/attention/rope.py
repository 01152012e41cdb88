"""Rotary position embedding (rotate-half form), shared by the LM's attention and
:class:`sparseroute.attention.SparseAttention`.

Legend: S sequence, K head dim, H heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rope_cos_sin", "apply_rope"]


def rope_cos_sin(seq_len: int, head_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [S, K] (float32) for rotate-half RoPE: frequency i (of K/2) is
    ``base^(-2i/K)`` and is repeated for both halves of the head dim."""
    inv_freq_K2 = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    pos_S = torch.arange(seq_len, device=device, dtype=torch.float32)
    ang_SK2 = torch.outer(pos_S, inv_freq_K2)
    ang_SK = torch.cat([ang_SK2, ang_SK2], dim=-1)
    return ang_SK.cos(), ang_SK.sin()


def apply_rope(x_BHSK: Tensor, cos_SK: Tensor, sin_SK: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + K/2]) by the position's angles: ``x cos + rotate_half(x) sin``
    with rotate_half(x) = (-x2, x1). Works on any layout whose last two dims are [S, K] or, with
    cos/sin of shape [S, 1, K], [S, H, K]."""
    half = x_BHSK.shape[-1] // 2
    # rotate_half(x) * sin == swap_halves(x) * (-sin1, sin2): one flip instead of a negate and a cat
    swapped = x_BHSK.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    sin_signed = torch.cat([-sin_SK[..., :half], sin_SK[..., half:]], dim=-1).to(x_BHSK.dtype)
    return torch.addcmul(x_BHSK * cos_SK.to(x_BHSK.dtype), swapped, sin_signed)
