"""The GPU executor: a block selection as a FlexAttention ``BlockMask``.

Legend: B batch, H query heads, Hkv kv-heads (G = H / Hkv), S sequence, bs block size,
N blocks, K slots.

Past selected blocks (j < n) become *full* blocks (no mask function evaluated inside them); the
query's own block, when selected, is a *partial* block whose ``mask_mod`` is causal. On CUDA
``flex_attention`` is compiled (its Triton kernel skips every block the mask leaves out); on
other devices it runs eagerly (correct, but it materialises the full score matrix: use it only
to test the conversion).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sparseroute.attention.selection import normalize_block_indices

__all__ = ["selection_to_block_mask", "flex_block_sparse_attention"]


def selection_to_block_mask(block_indices: Tensor, seq_len: int, block_size: int, n_heads: int):
    """The ``BlockMask`` of a selection [B, Hkv, N, K], expanded to the H query heads."""
    from torch.nn.attention.flex_attention import BlockMask

    idx = normalize_block_indices(block_indices)
    G = n_heads // idx.shape[1]
    if G > 1:
        idx = idx.repeat_interleave(G, dim=1)
    N = idx.shape[2]
    n_N1 = torch.arange(N, device=idx.device).view(N, 1)
    past = (idx >= 0) & (idx < n_N1)
    own = idx == n_N1
    big = N  # sorts unused slots last
    full_idx = torch.where(past, idx, big).sort(-1).values
    full_num = past.sum(-1).to(torch.int32)
    full_idx = torch.where(full_idx == big, 0, full_idx).to(torch.int32)
    # BlockMask wants N columns of indices per row (the first *_num of them are read)
    pad = N - full_idx.shape[-1]
    full_idx = torch.nn.functional.pad(full_idx, (0, pad)) if pad > 0 else full_idx[..., :N]
    part_num = own.any(-1).to(torch.int32)
    part_idx = torch.zeros_like(full_idx)
    part_idx[..., 0] = torch.where(part_num.bool(), torch.arange(N, device=idx.device).view(1, 1, N), 0)
    # the mask function holds the whole selection too: compiled kernels evaluate it only in
    # partial blocks, while eager flex_attention evaluates it everywhere (and ignores the blocks)
    sel_BHNN = torch.zeros(*idx.shape[:3], N + 1, dtype=torch.bool, device=idx.device)
    sel_BHNN.scatter_(-1, torch.where(idx >= 0, idx, N), True)
    sel_BHNN = sel_BHNN[..., :N].contiguous()

    def selected_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & sel_BHNN[b, h, q_idx // block_size, kv_idx // block_size]

    return BlockMask.from_kv_blocks(
        part_num.contiguous(),
        part_idx,
        full_num.contiguous(),
        full_idx.contiguous(),
        BLOCK_SIZE=block_size,
        mask_mod=selected_causal,
        seq_lengths=(seq_len, seq_len),
    )


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_size: int, *, scale: float | None = None,
    compiled: bool | None = None,
) -> Tensor:
    """FlexAttention over the selection's ``BlockMask``; compiled on CUDA unless ``compiled`` says
    otherwise. Rows that read no key give zeros (FlexAttention's convention, as the reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    S = q.shape[2]
    mask = selection_to_block_mask(block_indices, S, block_size, q.shape[1])
    compiled = q.device.type == "cuda" if compiled is None else compiled
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
