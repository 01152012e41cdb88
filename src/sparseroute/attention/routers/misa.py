"""``misa``: MISA, the lightning indexer with routed heads.

The indexer's heads and scoring (:mod:`sparseroute.attention.routers.indexer`), but each query
first picks the ``route_heads`` indexer heads (of ``index_heads``) that look most useful to it,
from block-pooled key statistics, and only those heads score tokens:

- the indexer keys are mean-pooled over blocks of ``pool_block`` positions; head j's logits for
  query t are q_{t,j}·k̄_c over the complete blocks before t's block and over the running mean of
  t's own block up to t (so every query has at least one block, and nothing after t is read);
  the head's score is the max of these logits;
- the chosen heads score tokens: I_h(t, s) = Σ_{j chosen} w_{t,j}·ReLU(q_{t,j}·k_s); each query
  keeps its ``top_k`` tokens as in the indexer.

``two_stage``: the routed score keeps ``candidates`` tokens (default 4·top_k) and the full
indexer (all heads) re-ranks them to ``top_k``.

The indexer's queries and keys (RoPE included, ``rope``) are routed on and scored with.
Training is the indexer's (``stage``, ``indexer_kl``); the KL trains the score that made the
final ranking: the routed heads' score, or with ``two_stage`` the full indexer's. Head routing
itself is a discrete choice without gradient.

Legend: B batch, S sequence, J indexer heads, Di indexer head dim, Nb key blocks of
``pool_block`` positions, K kept tokens, X candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparseroute.attention.routers.base import ATTENTION_ROUTERS, check_count, pool_blocks
from sparseroute.attention.routers.indexer import (
    IndexerOptions,
    IndexerRouter,
    gather_index_scores,
    index_scores,
    top_tokens,
)
from sparseroute.attention.selection import num_blocks

__all__ = ["MISAOptions", "MISARouter", "routed_heads"]


@dataclass(frozen=True, kw_only=True)
class MISAOptions(IndexerOptions):
    """The indexer's options (here ``index_heads`` defaults to 8), and
    route_heads: indexer heads each query uses (1 .. index_heads).
    pool_block: positions per pooled key block for head routing (>= 1).
    two_stage: routed heads keep ``candidates`` tokens, the full indexer re-ranks them.
    candidates: tokens kept by the first stage (>= top_k; None = 4·top_k); only with two_stage."""

    index_heads: int = 8
    route_heads: int = 2
    pool_block: int = 64
    two_stage: bool = False
    candidates: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("route_heads", self.route_heads)
        if self.route_heads > self.index_heads:
            raise ValueError(
                f"route_heads must be at most index_heads={self.index_heads}; got {self.route_heads!r}"
            )
        check_count("pool_block", self.pool_block)
        if not isinstance(self.two_stage, bool):
            raise ValueError(f"two_stage must be True or False; got {self.two_stage!r}")
        if self.candidates is not None:
            if not self.two_stage:
                raise ValueError("candidates is used only with two_stage=True; set two_stage=True or drop candidates")
            check_count("candidates", self.candidates, minimum=self.top_k)


def routed_heads(q_BSJD: Tensor, k_BSD: Tensor, pool_block: int, route_heads: int) -> Tensor:
    """[B, S, J] bool: the ``route_heads`` heads of each query with the largest max block logit
    q_{t,j}·k̄ over the complete key blocks before t's block and the mean of t's own block up to
    t (see the module docstring)."""
    B, S, J, Di = q_BSJD.shape
    Nb = num_blocks(S, pool_block)
    pos = torch.arange(S, device=q_BSJD.device)
    blk_S = pos // pool_block
    kp_BND = pool_blocks(k_BSD.unsqueeze(1), pool_block).squeeze(1)
    logits_BSJN = torch.einsum("bsjd,bnd->bsjn", q_BSJD, kp_BND)
    past_SN = torch.arange(Nb, device=q_BSJD.device).view(1, Nb) < blk_S.view(S, 1)
    logits_BSJN = logits_BSJN.masked_fill(~past_SN.view(1, S, 1, Nb), float("-inf"))
    # running mean of the own block: cumulative sums inside each block
    pad = Nb * pool_block - S
    k_pad = torch.nn.functional.pad(k_BSD, (0, 0, 0, pad)) if pad else k_BSD
    csum_BSD = k_pad.view(B, Nb, pool_block, Di).cumsum(2).view(B, Nb * pool_block, Di)[:, :S]
    own_BSD = csum_BSD / (pos - blk_S * pool_block + 1).view(1, S, 1).to(k_BSD.dtype)
    own_BSJ = torch.einsum("bsjd,bsd->bsj", q_BSJD, own_BSD)
    score_BSJ = torch.maximum(logits_BSJN.amax(-1), own_BSJ) if Nb else own_BSJ
    top = score_BSJ.topk(route_heads, dim=-1).indices
    return torch.zeros(B, S, J, dtype=torch.bool, device=q_BSJD.device).scatter_(-1, top, True)


@ATTENTION_ROUTERS.register("misa")
class MISARouter(IndexerRouter):
    """The indexer with per-query routed heads (see the module docstring); the indexer's
    parameters and training."""

    Options = MISAOptions

    @torch.no_grad()
    def select(self, q_BSJD: Tensor, k_BSD: Tensor, w_BSJ: Tensor) -> tuple[Tensor, Tensor | None]:
        o = self.options
        chosen_BSJ = routed_heads(q_BSJD, k_BSD, o.pool_block, o.route_heads)
        routed = index_scores(q_BSJD, k_BSD, w_BSJ * chosen_BSJ.to(w_BSJ.dtype))
        if not o.two_stage:
            return top_tokens(routed, o.top_k), chosen_BSJ
        cand_BSX = top_tokens(routed, o.candidates or 4 * o.top_k)
        full_BSX = gather_index_scores(q_BSJD, k_BSD, w_BSJ, cand_BSX)
        return top_tokens(full_BSX, o.top_k, pos_BSX=cand_BSX), None
