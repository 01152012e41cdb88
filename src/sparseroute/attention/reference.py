"""The oracle of the attention family: dense attention under the boolean mask a selection
implies. Slow (S x S scores per head) and obviously correct; every executor and router is tested
against it, outputs and gradients.

Legend: B batch, H query heads, Hkv kv-heads (G = H / Hkv), S sequence, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseroute.attention.selection import block_mask, check_selection

__all__ = ["masked_reference"]


def masked_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    key_bias: Tensor | None = None,
) -> Tensor:
    """softmax(q kᵀ · scale + key_bias, masked) v with the selection's mask
    (:func:`sparseroute.attention.selection.block_mask`); [B, H, S, Dh]. A query that reads no
    key gets zeros (and passes no gradient). ``scale`` defaults to Dh^-0.5; ``key_bias``
    [B, Hkv, S] is added to every query's logit of that key."""
    G, _ = check_selection(q, k, v, block_indices, block_size)
    B, H, S, Dh = q.shape
    scale = Dh**-0.5 if scale is None else scale
    mask_BHSS = block_mask(block_indices, S, block_size).repeat_interleave(G, dim=1)
    k_r = k.repeat_interleave(G, dim=1)
    v_r = v.repeat_interleave(G, dim=1)
    scores = torch.matmul(q, k_r.transpose(-1, -2)) * scale
    if key_bias is not None:
        if key_bias.shape != (B, k.shape[1], S):
            raise ValueError(f"key_bias must be [B, Hkv, S] = {(B, k.shape[1], S)}; got {tuple(key_bias.shape)}")
        scores = scores + key_bias.repeat_interleave(G, dim=1).unsqueeze(2).to(scores.dtype)
    reads_BHS1 = mask_BHSS.any(-1, keepdim=True)
    # rows that read nothing: finite logits (no NaN in softmax or its gradient), output zeroed
    scores = torch.where(mask_BHSS, scores, torch.where(reads_BHS1, float("-inf"), 0.0))
    p = torch.where(reads_BHS1, scores.softmax(-1), 0.0)
    return torch.matmul(p, v_r)
