"""``kmeans``: the Routing Transformer's online k-means routing, at block granularity.

Queries and keys are L2-normalised per head; every query block and key block is represented by
its mean-pooled normalised vector (re-normalised; a query block also averages its GQA group's
heads). Each kv-head keeps ``n_clusters`` unit centroids (buffers, so ``state_dict`` saves them).

Selection (no gradient): a query block joins its nearest centroid; that centroid takes its
top-``blocks_per_cluster`` (w) nearest key blocks among the query block's past blocks (j < n),
and the query block reads them plus its own block (causal inside). A centroid therefore never
hands a query block more than w blocks (the balanced clusters of the Routing Transformer, made
causal: the competition for a centroid's w places is among past blocks only, so a future block
can neither be selected nor change a selection).

Training: in ``training`` mode, after the selection (which uses the centroids as they were),
one k-means step under ``no_grad`` moves the centroids: every pooled query and key block is
assigned to its nearest centroid, and each centroid with assigned points becomes
``normalise(decay · mu + (1 - decay) · mean(points))``; a centroid without points stays. Eval mode
never changes them. The commitment loss ``kmeans_commit = commit_coef · mean ||x - mu(x)||²``
over the pooled query and key blocks (centroids detached) pulls q and k toward their centroids.

Init: the centroids are drawn once, at construction, as normalised Gaussian vectors from a
``torch.Generator`` seeded with ``seed`` (the same centroids for the same seed, independent of
the global RNG).

Legend: B batch, H heads, Hkv kv-heads (G = H / Hkv), S sequence, Dh head dim, N blocks,
C clusters, P pooled points of a kv-head (2·B·N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparseroute.attention.routers.base import (
    ATTENTION_ROUTERS,
    AttentionRouter,
    AttentionRouterOptions,
    causal_block_scores,
    check_count,
    causal_block_means,
    pool_blocks,
    select_blocks,
)
from sparseroute.attention.routers.topp import block_density_cap
from sparseroute.attention.selection import BlockRouting

__all__ = ["KMeansOptions", "KMeansRouter"]


@dataclass(frozen=True, kw_only=True)
class KMeansOptions(AttentionRouterOptions):
    """n_clusters: centroids per kv-head (>= 1).
    blocks_per_cluster: w, past key blocks a centroid hands a query block (>= 1).
    decay: EMA decay of the centroid update, in [0, 1).
    commit_coef: weight of the commitment loss (>= 0; 0 leaves it out).
    seed: seed of the centroids' initial draw."""

    n_clusters: int = 4
    blocks_per_cluster: int = 2
    decay: float = 0.999
    commit_coef: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("n_clusters", self.n_clusters)
        check_count("blocks_per_cluster", self.blocks_per_cluster)
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 <= self.decay < 1:
            raise ValueError(f"decay must be a number in [0, 1); got {self.decay!r}")
        c = self.commit_coef
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0:
            raise ValueError(f"commit_coef must be a number >= 0; got {self.commit_coef!r}")
        check_count("seed", self.seed, minimum=0)


def pooled_unit_blocks(x_BHSD: Tensor, n_kv_heads: int, block_size: int, *, causal: bool = False) -> Tensor:
    """[B, H, S, Dh] -> [B, Hkv, N, Dh]: the normalised mean of each block's normalised vectors
    over its positions (``causal``: over the positions up to its first, what every query of the
    block can see) and its GQA group's heads (H = Hkv for keys)."""
    B, H, S, Dh = x_BHSD.shape
    unit = F.normalize(x_BHSD, dim=-1)
    pooled = causal_block_means(unit, block_size) if causal else pool_blocks(unit, block_size)
    pooled = pooled.view(B, n_kv_heads, H // n_kv_heads, -1, Dh).mean(2)
    return F.normalize(pooled, dim=-1)


@ATTENTION_ROUTERS.register("kmeans")
class KMeansRouter(AttentionRouter):
    """Routing Transformer k-means routing over blocks (see the module docstring)."""

    Options = KMeansOptions

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        o = self.options
        g = torch.Generator().manual_seed(o.seed)
        mu_HCD = torch.randn(self.n_kv_heads, o.n_clusters, self.head_dim, generator=g)
        self.register_buffer("centroids", F.normalize(mu_HCD, dim=-1))

    def assign(self, x_BHND: Tensor) -> Tensor:
        """[B, Hkv, N] int64: each (unit) vector's nearest centroid of its kv-head (largest
        cosine; ties to the lower index)."""
        dt = torch.promote_types(self.centroids.dtype, torch.float32)
        sim_BHNC = torch.einsum("bhnd,hcd->bhnc", x_BHND.detach().to(dt), self.centroids.to(dt))
        return sim_BHNC.argmax(-1)

    def select(self, qb_BHND: Tensor, kb_BHND: Tensor) -> tuple[Tensor, Tensor]:
        """(block_indices [B, Hkv, N, min(w + 1, N)], the query blocks' clusters [B, Hkv, N])."""
        c_BHN = self.assign(qb_BHND)
        dt = torch.promote_types(self.centroids.dtype, torch.float32)
        mu = self.centroids.to(dt)
        Hkv = mu.shape[0]
        mu_BHND = mu[torch.arange(Hkv, device=mu.device).view(1, Hkv, 1), c_BHN]
        sim_BHNJ = torch.einsum("bhnd,bhjd->bhnj", mu_BHND, kb_BHND.detach().to(dt))
        scores = causal_block_scores(sim_BHNJ)
        N = scores.shape[-1]
        own = torch.eye(N, dtype=torch.bool, device=scores.device).expand_as(scores)
        return select_blocks(scores, self.options.blocks_per_cluster + 1, own), c_BHN

    @torch.no_grad()
    def update(self, points_BHPD: Tensor) -> None:
        """One EMA k-means step of the centroids on unit points [B, Hkv, P, Dh]."""
        Hkv, C, Dh = self.centroids.shape
        dt = torch.promote_types(self.centroids.dtype, torch.float32)
        mu_HCD = self.centroids.to(dt)
        pts_HPD = points_BHPD.detach().to(dt).transpose(0, 1).reshape(Hkv, -1, Dh)
        a_HP = torch.einsum("hpd,hcd->hpc", pts_HPD, mu_HCD).argmax(-1)
        onehot_HPC = F.one_hot(a_HP, C).to(pts_HPD.dtype)
        sums_HCD = torch.einsum("hpc,hpd->hcd", onehot_HPC, pts_HPD)
        counts_HC1 = onehot_HPC.sum(1).unsqueeze(-1)
        means_HCD = sums_HCD / counts_HC1.clamp_min(1)
        d = self.options.decay
        moved = F.normalize(d * mu_HCD + (1 - d) * means_HCD, dim=-1)
        self.centroids.copy_(torch.where(counts_HC1 > 0, moved, mu_HCD))

    def route(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> BlockRouting:
        bs = self.block_size
        qb = pooled_unit_blocks(q, self.n_kv_heads, bs, causal=True)  # [B, Hkv, N, Dh], differentiable
        kb = pooled_unit_blocks(k, self.n_kv_heads, bs)
        idx, c_BHN = self.select(qb, kb)
        points = torch.cat([qb, kb], dim=2)  # [B, Hkv, 2N, Dh]
        a_BHP = self.assign(points)
        mu = self.centroids.to(points.dtype)
        Hkv = mu.shape[0]
        mu_BHPD = mu[torch.arange(Hkv, device=mu.device).view(1, Hkv, 1), a_BHP]
        losses = {}
        if self.options.commit_coef > 0:
            losses["kmeans_commit"] = self.options.commit_coef * (points - mu_BHPD).pow(2).sum(-1).mean()
        # the largest share of query blocks one cluster draws, averaged over kv-heads
        usage_HC = F.one_hot(c_BHN, self.options.n_clusters).float().mean(dim=(0, 2))
        stats = {"cluster_usage_max": usage_HC.max(-1).values.mean()}
        if self.training:
            self.update(points)
        return BlockRouting(idx, bs, losses=losses, stats=stats)

    def density_estimate(self, seq_len: int) -> float:
        """The maximum: every query block with w past blocks (fewer at the start)."""
        return block_density_cap(seq_len, self.block_size, self.options.blocks_per_cluster)
