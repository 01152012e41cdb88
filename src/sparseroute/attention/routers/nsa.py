"""``nsa``: Native Sparse Attention. Three attention branches over the same queries, mixed by
learned per-head sigmoid gates computed from the layer input (a Linear D -> 3·H):

- compressed: every query attends over mean-pooled K/V blocks of ``compress_block`` positions
  (stride = length, non-overlapping); a query at t reads compressed block c only when the block
  ends at or before t (``(c+1)·lc - 1 <= t``, fully past keys), so a partial last block is never
  read, and a query with no complete block before it gets zero from this branch. Plain PyTorch
  (S x Nc scores).
- selected: the ``top_n`` key blocks (of the layer's block size) with the most compressed-branch
  attention probability, summed over the query block's queries and its GQA group's heads (one
  selection per (batch, kv-head, query block)); block 0 and the query's own block are always
  among them (``top_n`` counts them). Scored on detached probabilities: the selection is not
  differentiable; gradients reach the router through the compressed branch and the gates. Run by
  the block-sparse executor.
- window: the last ``window_blocks`` blocks (the query's own included), by the executor.

output = g_cmp·o_cmp + g_sel·o_sel + g_win·o_win, g = sigmoid(Linear(x)) per (position, head).
The returned :class:`BlockRouting` is the selected branch's selection.

When ``compress_block`` differs from the block size, a compressed block's probability is shared
among the selection blocks it overlaps, in proportion to the overlap.

Causality: the compressed and window branches are causal per token. The selection is shared by
a query block, so it depends on all of that block's queries (as for ``moba``): perturbing
positions >= t changes nothing before t when t starts a block.

Legend: B batch, H query heads, Hkv kv-heads (G = H / Hkv), S sequence, Dh head dim, D model dim,
bs block size, N = ceil(S / bs) blocks, lc compression length, Nc = floor(S / lc) complete
compressed blocks, K slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparseroute.attention.routers.base import (
    ATTENTION_ROUTERS,
    AttentionRouter,
    AttentionRouterOptions,
    Executor,
    causal_block_scores,
    check_count,
    causal_block_means,
    pool_blocks,
    select_blocks,
)
from sparseroute.attention.selection import BlockRouting, num_blocks
from sparseroute.kernels import gemm

__all__ = ["NSAOptions", "NSARouter", "compressed_attention", "nsa_block_importance", "window_block_indices"]


@dataclass(frozen=True, kw_only=True)
class NSAOptions(AttentionRouterOptions):
    """top_n: blocks the selected branch keeps per query block, block 0 and the query's own
    block included (>= 2).
    window_blocks: blocks the sliding-window branch reads, the query's own included (>= 1).
    compress_block: positions per compressed block (and stride); None = the layer's block size."""

    top_n: int = 4
    window_blocks: int = 2
    compress_block: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("top_n", self.top_n, minimum=2)
        check_count("window_blocks", self.window_blocks)
        if self.compress_block is not None:
            check_count("compress_block", self.compress_block)


def compressed_attention(q: Tensor, k: Tensor, v: Tensor, compress_block: int, *, scale: float | None = None
                         ) -> tuple[Tensor, Tensor]:
    """The compressed branch: (output [B, H, S, Dh], probabilities [B, H, S, Nc]).

    K/V are mean-pooled over the Nc = floor(S / lc) complete blocks of lc = ``compress_block``
    positions; query t reads block c when (c+1)·lc - 1 <= t. A query that reads no block gets a
    zero output and zero probabilities (and passes no gradient)."""
    B, H, S, Dh = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    scale = Dh**-0.5 if scale is None else scale
    Nc = S // compress_block
    if Nc == 0:
        return q.new_zeros(q.shape), q.new_zeros(B, H, S, 0)
    kc_BHCD = pool_blocks(k[:, :, : Nc * compress_block], compress_block)
    vc_BHCD = pool_blocks(v[:, :, : Nc * compress_block], compress_block)
    q_BHGSD = q.view(B, Hkv, G, S, Dh)
    scores = torch.einsum("bhgsd,bhcd->bhgsc", q_BHGSD, kc_BHCD) * scale
    t_S1 = torch.arange(S, device=q.device).view(S, 1)
    ends_1C = (torch.arange(Nc, device=q.device).view(1, Nc) + 1) * compress_block - 1
    allowed_SC = ends_1C <= t_S1
    reads_S1 = allowed_SC.any(-1, keepdim=True)
    # rows that read nothing: finite logits (no NaN), probabilities zeroed
    scores = torch.where(allowed_SC, scores, torch.where(reads_S1, float("-inf"), 0.0))
    p = torch.where(reads_S1, scores.softmax(-1), 0.0)
    out = torch.einsum("bhgsc,bhcd->bhgsd", p, vc_BHCD)
    return out.reshape(B, H, S, Dh), p.reshape(B, H, S, Nc)


def _overlap(Nc: int, compress_block: int, N: int, block_size: int, device) -> Tensor:
    """[Nc, N]: the share of compressed block c's positions that lie in selection block j."""
    c0 = torch.arange(Nc, device=device, dtype=torch.float64).view(Nc, 1) * compress_block
    j0 = torch.arange(N, device=device, dtype=torch.float64).view(1, N) * block_size
    lo = torch.maximum(c0, j0)
    hi = torch.minimum(c0 + compress_block, j0 + block_size)
    return (hi - lo).clamp_min(0) / compress_block


def nsa_block_importance(p_BHSC: Tensor, n_kv_heads: int, block_size: int, compress_block: int) -> Tensor:
    """[B, Hkv, N, N] (query block, key block): compressed attention probability averaged over the
    positions up to the query block's first (:func:`causal_block_means`: no later token changes a
    selection) and summed over its GQA group's heads, carried to selection blocks by overlap;
    future key blocks -inf. Detached, float32."""
    B, H, S, Nc = p_BHSC.shape
    G = H // n_kv_heads
    N = num_blocks(S, block_size)
    p = p_BHSC.detach().float()
    # over the queries every query of the block can already see (up to its first position)
    per_block_BHNC = causal_block_means(p, block_size).view(B, n_kv_heads, G, N, Nc).sum(2)
    share_CN = _overlap(Nc, compress_block, N, block_size, p.device).float()
    return causal_block_scores(per_block_BHNC @ share_CN)


def window_block_indices(B: int, Hkv: int, N: int, window: int, device) -> Tensor:
    """[B, Hkv, N, window]: blocks n - window + 1 .. n (-1 before block 0)."""
    n_N1 = torch.arange(N, device=device).view(N, 1)
    idx_NW = n_N1 - torch.arange(window, device=device).view(1, window)
    idx_NW = torch.where(idx_NW >= 0, idx_NW, -1)
    return idx_NW.view(1, 1, N, window).expand(B, Hkv, N, window).contiguous()


@ATTENTION_ROUTERS.register("nsa")
class NSARouter(AttentionRouter):
    """Compressed + selected + sliding-window attention with per-head sigmoid gates (see the module
    docstring). Parameters: ``gate`` (Linear D -> 3·H, rows ordered (branch, head))."""

    Options = NSAOptions

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.compress_block = self.options.compress_block or self.block_size
        self.gate = gemm.Linear(self.d_model, 3 * self.n_heads, bias=True)

    def select(self, p_BHSC: Tensor) -> BlockRouting:
        """The selected branch's blocks from the compressed probabilities."""
        scores = nsa_block_importance(p_BHSC, self.n_kv_heads, self.block_size, self.compress_block)
        N = scores.shape[-1]
        n = torch.arange(N, device=scores.device)
        forced_NN = (n.view(1, N) == 0) | (n.view(1, N) == n.view(N, 1))
        return BlockRouting(select_blocks(scores, self.options.top_n, forced_NN.expand_as(scores)), self.block_size)

    def route(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> BlockRouting:
        with torch.no_grad():
            _, p = compressed_attention(q, k, v, self.compress_block)
        return self.select(p)

    def gates(self, x: Tensor) -> Tensor:
        """[3, B, H, S, 1]: sigmoid gates of the compressed, selected and window branches."""
        B, S, _ = x.shape
        g_BS3H = torch.sigmoid(self.gate(x)).view(B, S, 3, self.n_heads)
        return g_BS3H.permute(2, 0, 3, 1).unsqueeze(-1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, execute: Executor) -> tuple[Tensor, BlockRouting]:
        B, H, S, Dh = q.shape
        o_cmp, p = compressed_attention(q, k, v, self.compress_block)
        routing = self.select(p)
        o_sel = execute(q, k, v, routing.block_indices, self.block_size)
        win = window_block_indices(B, self.n_kv_heads, num_blocks(S, self.block_size), self.options.window_blocks,
                                   q.device)
        o_win = execute(q, k, v, win, self.block_size)
        g = self.gates(x).to(q.dtype)
        y = g[0] * o_cmp + g[1] * o_sel + g[2] * o_win
        if self.options.stats:
            gd = g.detach().float()
            names = ("gate_cmp", "gate_sel", "gate_win")
            routing = routing.replace(stats={name: gd[i].mean() for i, name in enumerate(names)})
        return y, self.finish(routing, q, k)

    def density_estimate(self, seq_len: int) -> float:
        """Score entries of all three branches (selected and window blocks, the own block causal
        half; compressed blocks per query) over the S(S+1)/2 of dense causal attention, capped at 1
        (at short sequences the branches together would cost more than dense attention)."""
        bs, lc, o = self.block_size, self.compress_block, self.options
        S = seq_len
        if S <= 0:
            return 0.0
        kept = 0.0
        for n in range(num_blocks(S, bs)):
            rows = min(bs, S - n * bs)
            past = min(n, o.top_n - 1) + min(n, o.window_blocks - 1)
            kept += rows * bs * past + 2 * rows * (rows + 1) / 2
        kept += sum((t + 1) // lc for t in range(S))
        return min(1.0, kept / (S * (S + 1) / 2))
