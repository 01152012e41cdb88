"""``indexer``: DeepSeek's lightning indexer (DSA), a token-level router.

A few small heads score every past token: with q_{t,j} = W_q x_t (``index_heads`` heads of
``index_dim``), one shared key k_s = W_k x_s and head weights w_{t,j} = W_w x_t,

    I(t, s) = Σ_j w_{t,j} · ReLU(q_{t,j} · k_s)        (s <= t)

and each query keeps its ``top_k`` best tokens (all its past tokens when it has fewer; of equal
scores, the later tokens). The selection is the same for every kv-head. The router always
returns a **token-level** selection, ``BlockRouting`` with ``block_size = 1`` (indices
[B, Hkv, S, K] name key positions), whatever the layer's block size.

``rope`` (default on): q_{t,j} and k_s are rotated by rotate-half RoPE of their positions (base
10000, over the whole ``index_dim``), as DeepSeek's indexer does, so that the score can depend on
the distance t - s; the layer input carries no position otherwise.

Training (``stage``):

- ``"warmup"``: the attention itself is dense (every past token, through the executor at the
  layer's block size; the caller freezes the model) and the loss ``indexer_kl`` =
  KL(p_dense ‖ softmax(I)) over all past tokens trains the indexer; p_dense is the layer's dense
  attention distribution summed over its query heads and L1-normalised, computed without
  gradient. The returned selection is still the indexer's top-k (what the sparse stage would
  read), so its statistics measure the indexer's recall of dense attention.
- ``"sparse"``: attention reads only the selected tokens, and ``indexer_kl`` is the KL restricted
  to the selected set (both distributions renormalised over it).

In both stages the indexer reads ``x.detach()`` and p_dense carries no gradient, so the KL
trains only the indexer; the top-k is not differentiable and no score enters the attention, so
the LM loss never reaches the indexer. ``indexer_kl`` (scaled by ``kl_coef``) is in
``BlockRouting.losses``; its unscaled value is in ``stats``.

The scoring, selection and KL pieces are functions here, shared with ``misa``.

Legend: B batch, H query heads, Hkv kv-heads (G = H / Hkv), S sequence (T query positions when
they differ), Dh head dim, D model dim, J indexer heads, Di indexer head dim, K kept tokens,
X candidate tokens of a query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparseroute.attention.rope import apply_rope, rope_cos_sin
from sparseroute.attention.routers.base import (
    ATTENTION_ROUTERS,
    AttentionRouter,
    AttentionRouterOptions,
    Executor,
    check_count,
)
from sparseroute.attention.selection import BlockRouting, num_blocks
from sparseroute.kernels import gemm

__all__ = [
    "IndexerOptions",
    "IndexerRouter",
    "STAGES",
    "dense_attention_distribution",
    "gather_index_scores",
    "index_scores",
    "indexer_kl",
    "top_tokens",
]

STAGES = ("warmup", "sparse")

#: elements of one chunk's [B, rows, J, S] (or [B, H, rows, S]) intermediate: bounds working memory
CHUNK_ELEMENTS = 1 << 20


def _row_step(per_row: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, per_row))


def index_scores(q_BSJD: Tensor, k_BSD: Tensor, w_BSJ: Tensor) -> Tensor:
    """I(t, s) = Σ_j w_{t,j}·ReLU(q_{t,j}·k_s) for every pair, future ones -inf; [B, S, S].
    Differentiable (query rows in chunks, each against the keys up to its last row)."""
    B, S, J, Di = q_BSJD.shape
    pos = torch.arange(S, device=q_BSJD.device)
    rows = []
    step = _row_step(B * J * S)
    for t0 in range(0, S, step):
        t1 = min(S, t0 + step)
        q_BRD = q_BSJD[:, t0:t1].reshape(B, (t1 - t0) * J, Di)
        r_BTJS = torch.relu(torch.matmul(q_BRD, k_BSD[:, :t1].transpose(1, 2))).view(B, t1 - t0, J, t1)
        s_BTS = torch.matmul(w_BSJ[:, t0:t1].unsqueeze(2), r_BTJS).squeeze(2)
        future_TS = pos[:t1].view(1, -1) > pos[t0:t1].view(-1, 1)
        s_BTS = s_BTS.masked_fill(future_TS, float("-inf"))
        rows.append(torch.nn.functional.pad(s_BTS, (0, S - t1), value=float("-inf")))
    return torch.cat(rows, dim=1) if rows else q_BSJD.new_zeros(B, 0, 0)


def gather_index_scores(q_BSJD: Tensor, k_BSD: Tensor, w_BSJ: Tensor, idx_BSX: Tensor) -> Tensor:
    """I(t, idx[t, x]) for named tokens only ([B, S, X]; ``-1`` slots give -inf). Differentiable."""
    B, S, X = idx_BSX.shape
    Di = k_BSD.shape[-1]
    valid = idx_BSX >= 0
    k_BSXD = k_BSD.gather(1, idx_BSX.clamp_min(0).reshape(B, S * X, 1).expand(B, S * X, Di)).view(B, S, X, Di)
    r_BSJX = torch.relu(torch.einsum("bsjd,bsxd->bsjx", q_BSJD, k_BSXD))
    s_BSX = torch.einsum("bsjx,bsj->bsx", r_BSJX, w_BSJ)
    return s_BSX.masked_fill(~valid, float("-inf"))


def top_tokens(scores_BSX: Tensor, k: int, pos_BSX: Tensor | None = None) -> Tensor:
    """The ``k`` best of each row (-inf = not selectable) as positions, equal scores to the later
    position; [B, S, min(k, X)] int64, ``-1`` slots (last) where a row has fewer selectable
    entries; the kept positions of a row in no particular order. ``pos`` [B, S, X] names each
    column's position (default: the column index)."""
    B, S, X = scores_BSX.shape
    k = min(k, X)
    s = scores_BSX.detach()
    if pos_BSX is None:
        pos_BSX = torch.arange(X, device=s.device).expand(B, S, X)
    if k == 0:
        return pos_BSX.new_full((B, S, 0), -1)
    top = s.topk(k, dim=-1)
    thr = top.values[..., -1:]  # the k-th best score of the row
    out = torch.where(top.values > float("-inf"), pos_BSX.gather(-1, top.indices), -1)
    # rows where more entries equal the k-th score than the top-k took: the choice among them is
    # topk's; redo those rows keeping the latest of the tied entries
    tied = (s == thr) & (thr > float("-inf"))
    rows = (tied.sum(-1) > (top.values == thr).sum(-1)).nonzero(as_tuple=True)
    if rows[0].numel():
        order = pos_BSX[rows].argsort(dim=-1, descending=True)  # later positions first
        s_r, pos_r = s[rows].gather(-1, order), pos_BSX[rows].gather(-1, order)
        thr_r = thr[rows]
        above, tie = s_r > thr_r, s_r == thr_r
        need = k - above.sum(-1, keepdim=True)
        chosen = above | (tie & (tie.cumsum(-1) <= need))
        out[rows] = torch.where(chosen, pos_r + 1, 0).topk(k, dim=-1).values - 1
    return out


@torch.no_grad()
def dense_attention_distribution(q: Tensor, k: Tensor, *, scale: float | None = None) -> Tensor:
    """The dense causal attention distribution summed over the query heads, L1-normalised:
    [B, S, S] float32 (or float64), rows sum to 1, future keys 0. Without gradient."""
    B, H, S, Dh = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    scale = Dh**-0.5 if scale is None else scale
    dt = torch.promote_types(q.dtype, torch.float32)
    q_BHGSD = q.to(dt).view(B, Hkv, G, S, Dh)
    kf = k.to(dt)
    pos = torch.arange(S, device=q.device)
    out = q.new_zeros(B, S, S, dtype=dt)
    step = _row_step(B * H * S)
    for t0 in range(0, S, step):
        t1 = min(S, t0 + step)
        q_BHRD = q_BHGSD[:, :, :, t0:t1].reshape(B, Hkv, G * (t1 - t0), Dh)
        s = torch.matmul(q_BHRD, kf[:, :, :t1].transpose(-1, -2)).mul_(scale).view(B, Hkv, G, t1 - t0, t1)
        s.masked_fill_(pos[:t1].view(1, -1) > pos[t0:t1].view(-1, 1), float("-inf"))
        out[:, t0:t1, :t1] = s.softmax(-1).sum(dim=(1, 2)).div_(H)
    return out


def indexer_kl(p_BSX: Tensor, logits_BSX: Tensor) -> Tensor:
    """mean over queries of KL(p ‖ softmax(logits)) over each row's finite logits, with p
    renormalised over them (the restriction to a selected set); rows with no finite logit count
    zero. A scalar; gradient to ``logits`` only."""
    valid = torch.isfinite(logits_BSX)
    p = torch.where(valid, p_BSX.detach().to(logits_BSX.dtype), 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    rows = valid.any(-1, keepdim=True)
    logq = torch.where(rows, logits_BSX, 0.0).log_softmax(-1)
    terms = torch.where(valid, torch.xlogy(p, p) - p * torch.where(valid, logq, 0.0), 0.0)
    return terms.sum(-1).mean() if terms.numel() else logits_BSX.sum() * 0.0


@dataclass(frozen=True, kw_only=True)
class IndexerOptions(AttentionRouterOptions):
    """index_heads: indexer heads J (>= 1). index_dim: their dimension Di (>= 1).
    top_k: tokens each query keeps (>= 1). stage: ``"warmup"`` (dense attention, full KL) or
    ``"sparse"`` (attention over the selection, KL on the selected set).
    kl_coef: scale of the ``indexer_kl`` loss (>= 0).
    rope: rotate the indexer's queries and keys by their positions (RoPE, base 10000; needs an
    even ``index_dim``)."""

    index_heads: int = 4
    index_dim: int = 32
    top_k: int = 64
    stage: str = "sparse"
    kl_coef: float = 1.0
    rope: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("index_heads", self.index_heads)
        check_count("index_dim", self.index_dim)
        check_count("top_k", self.top_k)
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {self.stage!r}")
        if isinstance(self.kl_coef, bool) or not isinstance(self.kl_coef, (int, float)) or not self.kl_coef >= 0:
            raise ValueError(f"kl_coef must be a number >= 0; got {self.kl_coef!r}")
        if not isinstance(self.rope, bool):
            raise ValueError(f"rope must be True or False; got {self.rope!r}")
        if self.rope and self.index_dim % 2:
            raise ValueError(f"index_dim must be even with rope=True (RoPE rotates pairs); got {self.index_dim}")


@ATTENTION_ROUTERS.register("indexer")
class IndexerRouter(AttentionRouter):
    """The lightning indexer (see the module docstring). Parameters: ``index_q`` (D -> J·Di),
    ``index_k`` (D -> Di), ``index_w`` (D -> J)."""

    Options = IndexerOptions

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        o = self.options
        self.index_q = gemm.Linear(self.d_model, o.index_heads * o.index_dim, bias=False)
        self.index_k = gemm.Linear(self.d_model, o.index_dim, bias=False)
        self.index_w = gemm.Linear(self.d_model, o.index_heads, bias=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q_idx [B, S, J, Di], k_idx [B, S, Di] (with RoPE when ``rope``), w [B, S, J], from
        ``x.detach()``."""
        x = x.detach()
        B, S, _ = x.shape
        o = self.options
        q_BSJD, k_BSD = self.index_q(x).view(B, S, o.index_heads, o.index_dim), self.index_k(x)
        if o.rope:
            cos_SD, sin_SD = rope_cos_sin(S, o.index_dim, 10000.0, device=x.device)
            q_BSJD = apply_rope(q_BSJD, cos_SD.unsqueeze(1), sin_SD.unsqueeze(1))
            k_BSD = apply_rope(k_BSD, cos_SD, sin_SD)
        return q_BSJD, k_BSD, self.index_w(x)

    @torch.no_grad()
    def select(self, q_BSJD: Tensor, k_BSD: Tensor, w_BSJ: Tensor) -> tuple[Tensor, Tensor | None]:
        """(kept tokens [B, S, K], the heads [B, S, J] bool of the score that ranked them — the
        score the KL trains; None = all heads)."""
        return top_tokens(index_scores(q_BSJD, k_BSD, w_BSJ), self.options.top_k), None

    def route(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> BlockRouting:
        qi, ki, wi = self.project(x)
        idx_BSK, heads_BSJ = self.select(qi, ki, wi)
        w_rank = wi if heads_BSJ is None else wi * heads_BSJ.to(wi.dtype)
        p_BSS = dense_attention_distribution(q, k)
        if self.options.stage == "warmup":
            logits = index_scores(qi, ki, w_rank)
            kl = indexer_kl(p_BSS, logits)
        else:
            logits = gather_index_scores(qi, ki, w_rank, idx_BSK)
            kl = indexer_kl(p_BSS.gather(-1, idx_BSK.clamp_min(0)), logits)
        B, S, K = idx_BSK.shape
        idx = idx_BSK.view(B, 1, S, K).expand(B, self.n_kv_heads, S, K).contiguous()
        return BlockRouting(idx, 1, losses={"indexer_kl": kl * self.options.kl_coef},
                            stats={"indexer_kl": kl.detach().float()} if self.options.stats else {})

    def attend(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, execute: Executor) -> tuple[Tensor, BlockRouting]:
        routing = self.route(q, k, v, x)
        if self.options.stage == "warmup":
            B, S = q.shape[0], q.shape[2]
            N = num_blocks(S, self.block_size)
            n = torch.arange(N, device=q.device)
            dense_NN = torch.where(n.view(1, N) <= n.view(N, 1), n.view(1, N), -1)
            dense = dense_NN.view(1, 1, N, N).expand(B, self.n_kv_heads, N, N).contiguous()
            y = execute(q, k, v, dense, self.block_size)
        else:
            y = execute(q, k, v, routing.block_indices, 1)
        return y, self.finish(routing, q, k)

    def density_estimate(self, seq_len: int) -> float:
        """The sparse stage's kept fraction: min(t + 1, top_k) keys per query t (1.0 in warmup,
        whose attention is dense)."""
        if self.options.stage == "warmup" or seq_len <= 0:
            return 1.0
        K = self.options.top_k
        kept = sum(min(t + 1, K) for t in range(seq_len))
        return kept / (seq_len * (seq_len + 1) / 2)
