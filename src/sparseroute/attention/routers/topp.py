"""``topp``: S2O-style early stop — a variable number of blocks per query block, chosen until
the estimated attention mass they hold reaches ``1 - epsilon``.

Scores as MoBA's (:mod:`sparseroute.attention.routers.moba`): ⟨q̄, mean K_block⟩ · Dh^-0.5,
per kv-head, q̄ the query block's causal summary (the mean over the positions up to its first and
the GQA group); the own block is scored by its keys up to its first position, so that no
selection depends on a later token. The estimated attention
mass of key block j for query block n is a softmax over the blocks j <= n of

    score(n, j) + log len(n, j)

(each key of a block taken to carry the block's mean logit, so a block weighs in proportion to
its size): len is the block's number of keys, and for the own block the mean number of keys a
query of the block sees causally, (r + 1) / 2 for a block of r rows. The blocks are visited in
descending estimated mass, the own block first, and kept while the mass kept before them is
below ``1 - epsilon``: the kept mass reaches ``1 - epsilon`` unless ``max_blocks`` (own included)
stops the visit first. Slots past a row's count are -1; K is the largest count in the batch.
No router parameters and no auxiliary loss.

Legend: B batch, H heads, Hkv kv-heads (G = H / Hkv), S sequence, Dh head dim, N query blocks,
J key blocks (= N), K slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparseroute.attention.routers.base import (
    ATTENTION_ROUTERS,
    AttentionRouter,
    AttentionRouterOptions,
    check_count,
    causal_block_means,
    pool_blocks,
)
from sparseroute.attention.routers.moba import group_mean_queries
from sparseroute.attention.selection import BlockRouting, num_blocks

__all__ = ["TopPOptions", "TopPRouter", "block_density_cap", "block_lengths"]


@dataclass(frozen=True, kw_only=True)
class TopPOptions(AttentionRouterOptions):
    """epsilon: the estimated attention mass a query block may leave out, in (0, 1).
    max_blocks: most blocks a query block reads, its own included (None = no cap)."""

    epsilon: float = 0.1
    max_blocks: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must be a number in (0, 1); got {self.epsilon!r}")
        if self.max_blocks is not None:
            check_count("max_blocks", self.max_blocks)


def block_density_cap(seq_len: int, block_size: int, max_past: int | None) -> float:
    """The density (:func:`sparseroute.attention.selection.selection_density`) of a selection
    that gives every query block its own block and min(n, ``max_past``) past blocks (all past
    blocks for None): the most a router with that cap can keep."""
    N = num_blocks(seq_len, block_size)
    if N == 0:
        return 1.0
    kept = 0.0
    for n in range(N):
        rows = min(block_size, seq_len - n * block_size)
        past = n if max_past is None else min(n, max_past)
        kept += rows * block_size * past + rows * (rows + 1) / 2
    return min(1.0, kept / (seq_len * (seq_len + 1) / 2))


def block_lengths(seq_len: int, block_size: int, device=None) -> Tensor:
    """[N, J] float64: the keys of block j a mean query of block n sees (j < n: the block's
    length; j = n: (r + 1) / 2 for r rows; j > n: 0)."""
    N = num_blocks(seq_len, block_size)
    n = torch.arange(N, device=device)
    rows_N = (seq_len - n * block_size).clamp(max=block_size).to(torch.float64)
    len_NJ = rows_N.view(1, N).expand(N, N).clone()
    len_NJ[n, n] = (rows_N + 1) / 2
    return torch.where(n.view(1, N) <= n.view(N, 1), len_NJ, 0.0)


@ATTENTION_ROUTERS.register("topp")
class TopPRouter(AttentionRouter):
    """Blocks in descending estimated mass until ``1 - epsilon`` is kept (module docstring)."""

    Options = TopPOptions

    def block_mass(self, q: Tensor, k: Tensor) -> Tensor:
        """[B, Hkv, N, J] float64: the estimated attention mass of each key block (0 for future
        blocks; rows sum to 1)."""
        bs = self.block_size
        qm = group_mean_queries(q.detach(), self.n_kv_heads, bs).double()
        km = pool_blocks(k.detach(), bs).double()
        scores = torch.einsum("bhnd,bhjd->bhnj", qm, km)
        # the own block by its keys up to its first position (the rest are later than some queries)
        own_BHN = (qm * causal_block_means(k.detach(), bs).double()).sum(-1)
        scores = torch.diagonal_scatter(scores, own_BHN, dim1=-2, dim2=-1) * q.shape[-1] ** -0.5
        len_NJ = block_lengths(q.shape[2], bs, device=q.device)
        logits = torch.where(len_NJ > 0, scores + len_NJ.clamp_min(1e-300).log(), float("-inf"))
        return logits.softmax(-1)

    def route(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> BlockRouting:
        mass_BHNJ = self.block_mass(q, k)
        B, Hkv, N, J = mass_BHNJ.shape
        own = torch.eye(N, dtype=torch.bool, device=q.device)
        # visiting order: own block first, then descending mass (stable: ties to the lower block)
        key = torch.where(own, 2.0, mass_BHNJ)
        order = key.sort(dim=-1, descending=True, stable=True).indices
        mass_sorted = mass_BHNJ.gather(-1, order)
        before = mass_sorted.cumsum(-1) - mass_sorted  # mass kept before visiting each slot
        keep = (before < 1 - self.options.epsilon) & (mass_sorted > 0)
        keep[..., 0] = True  # the own block (its mass can underflow to 0)
        cap = self.options.max_blocks
        if cap is not None:
            keep[..., cap:] = False
        K = max(1, int(keep.sum(-1).max())) if keep.numel() else 1
        idx = torch.where(keep, order, -1)[..., :K].contiguous()
        kept = (mass_sorted * keep).sum(-1)
        stats = {"kept_mass": kept.mean().float(), "blocks_max": torch.tensor(float(K))}
        return BlockRouting(idx, self.block_size, stats=stats)

    def density_estimate(self, seq_len: int) -> float:
        """The maximum: every past block without ``max_blocks``; with it, own + (max_blocks - 1)."""
        cap = self.options.max_blocks
        return block_density_cap(seq_len, self.block_size, None if cap is None else cap - 1)
