"""``moba``: Mixture of Block Attention. A key block's score for a query block is
⟨q̄, mean K_block⟩, where q̄ is the mean query of the GQA group's heads over the ``block_size``
positions up to and including the block's first (MoBA scores per token; here the block's queries
share one selection, so it is made from what all of them can see: a change at position t never
changes the selection of a query before t); the query block keeps its own block (causal inside)
and its ``top_k`` best past blocks, which are complete. No router parameters and no auxiliary
loss.

``key_conv = w > 0`` adds FlashMoBA's short causal depthwise convolution on the keys
(k + conv_w(k), per channel, over the previous w positions, initialised to zero so the layer
starts as plain MoBA); the convolved keys are both routed on and attended to, so the
convolution trains through attention.

Legend: B batch, H heads, Hkv kv-heads (G = H / Hkv), S sequence, Dh head dim, N blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseroute.attention.routers.base import (
    ATTENTION_ROUTERS,
    AttentionRouter,
    AttentionRouterOptions,
    Executor,
    causal_block_means,
    causal_block_scores,
    check_count,
    pool_blocks,
    select_blocks,
)
from sparseroute.attention.selection import BlockRouting, num_blocks


@dataclass(frozen=True, kw_only=True)
class MoBAOptions(AttentionRouterOptions):
    """top_k: past blocks kept per query block, beside its own (>= 1).
    key_conv: width of the causal depthwise key convolution (0 = none)."""

    top_k: int = 3
    key_conv: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("top_k", self.top_k)
        check_count("key_conv", self.key_conv, minimum=0)


def group_mean_queries(q: Tensor, n_kv_heads: int, block_size: int) -> Tensor:
    """[B, H, S, Dh] -> [B, Hkv, N, Dh]: each query block's causal summary query
    (:func:`causal_block_means`), averaged over its GQA group's heads."""
    B, H, S, Dh = q.shape
    pooled = causal_block_means(q, block_size)  # [B, H, N, Dh]
    return pooled.view(B, n_kv_heads, H // n_kv_heads, -1, Dh).mean(2)


@ATTENTION_ROUTERS.register("moba")
class MoBARouter(AttentionRouter):
    Options = MoBAOptions

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        w = self.options.key_conv
        self.key_conv: nn.Parameter | None = None
        if w:
            self.key_conv = nn.Parameter(torch.zeros(self.n_kv_heads * self.head_dim, 1, w))

    def convolve_keys(self, k: Tensor) -> Tensor:
        """k + causal depthwise conv(k) when ``key_conv`` is set, else k."""
        if self.key_conv is None:
            return k
        B, Hkv, S, Dh = k.shape
        w = self.key_conv.shape[-1]
        x = k.permute(0, 1, 3, 2).reshape(B, Hkv * Dh, S)
        y = F.conv1d(F.pad(x, (w - 1, 0)), self.key_conv.to(k.dtype), groups=Hkv * Dh)
        return k + y.view(B, Hkv, Dh, S).permute(0, 1, 3, 2)

    def route(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> BlockRouting:
        bs = self.block_size
        qm = group_mean_queries(q.detach(), self.n_kv_heads, bs)
        km = pool_blocks(k.detach(), bs)
        scores = causal_block_scores(torch.einsum("bhnd,bhjd->bhnj", qm.float(), km.float()))
        N = scores.shape[-1]
        own = torch.eye(N, dtype=torch.bool, device=q.device).expand_as(scores)
        return BlockRouting(select_blocks(scores, self.options.top_k + 1, own), bs)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, execute: Executor) -> tuple[Tensor, BlockRouting]:
        return super().attend(q, self.convolve_keys(k), v, x, execute)

    def density_estimate(self, seq_len: int) -> float:
        N = num_blocks(seq_len, self.block_size)
        kept = sum(min(n, self.options.top_k) + 0.5 for n in range(N))
        return min(1.0, kept / (N * (N + 1) / 2))
