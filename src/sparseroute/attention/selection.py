"""What an attention router decides: for every (batch, kv-head, query block) the key blocks its
queries may read.

Legend: B batch, H query heads, Hkv key/value heads (H = G·Hkv, a GQA group of G query heads
shares its kv-head's selection), S sequence, Dh head dim, bs block size, N = ceil(S / bs)
query (and key) blocks, K slots per query block.

``block_indices`` [B, Hkv, N, K] int64 names key blocks; ``-1`` marks an unused slot (the
project's :class:`sparseroute.routing.Routing` convention). Key block j covers positions
``j·bs .. min(S, (j+1)·bs) - 1``. A query at position t reads key s exactly when s <= t and
block(s) is among the selected blocks of block(t): a selected future block is never read, a block
named twice counts once, and the query's own block is causal inside. A query that reads no key
at all gets a zero output. Token-level routers use ``block_size = 1`` (then N = S and the
indices name key positions).

Routers may add a per-key additive logit (``key_bias`` [B, Hkv, S], Trainable Dynamic Mask
attention); losses and statistics travel with the selection like a Routing's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = [
    "BlockRouting",
    "check_block_size",
    "num_blocks",
    "normalize_block_indices",
    "block_mask",
    "selection_density",
    "selection_recall",
    "selection_stats",
]


def check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be an integer >= 1; got {block_size!r}")
    return block_size


def num_blocks(seq_len: int, block_size: int) -> int:
    """N = ceil(S / bs)."""
    return -(-seq_len // block_size)


@dataclass
class BlockRouting:
    """A router's selection (see the module docstring).

    block_indices: [B, Hkv, N, K] int64, ``-1`` = unused slot.
    block_size: bs (1 for token-level selection).
    key_bias: optional [B, Hkv, S] additive logit per key (differentiable).
    losses: auxiliary losses (already scaled) to add to the training loss.
    stats: detached statistics (density, recall, ...); see :func:`selection_stats`.
    """

    block_indices: Tensor
    block_size: int
    key_bias: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_block_size(self.block_size)
        if self.block_indices.dim() != 4:
            raise ValueError(
                f"block_indices must be [B, Hkv, N, K]; got shape {tuple(self.block_indices.shape)}"
            )
        if self.block_indices.dtype != torch.int64:
            raise ValueError(f"block_indices must be int64; got {self.block_indices.dtype}")

    def replace(self, **changes) -> "BlockRouting":
        return replace(self, **changes)


def check_selection(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_size: int) -> tuple[int, int]:
    """Validate shapes; returns (G, N). Raises ValueError naming the argument."""
    check_block_size(block_size)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, heads, S, Dh]; got shape {tuple(t.shape)}")
    B, H, S, Dh = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != Dh:
        raise ValueError(
            f"k must be [B={B}, Hkv, S={S}, Dh={Dh}] to match q; got shape {tuple(k.shape)}"
        )
    Hkv = k.shape[1]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"n_heads={H} must be a multiple of n_kv_heads={Hkv}")
    N = num_blocks(S, block_size)
    if block_indices.dim() != 4 or tuple(block_indices.shape[:3]) != (B, Hkv, N):
        raise ValueError(
            f"block_indices must be [B={B}, Hkv={Hkv}, N=ceil(S/block_size)={N}, K]; "
            f"got shape {tuple(block_indices.shape)}"
        )
    if block_indices.dtype != torch.int64:
        raise ValueError(f"block_indices must be int64; got {block_indices.dtype}")
    if block_indices.numel():
        lo, hi = int(block_indices.min()), int(block_indices.max())
        if lo < -1 or hi >= N:
            raise ValueError(
                f"block_indices must be -1 (unused) or a key block in [0, {N}); got values in [{lo}, {hi}]"
            )
    return H // Hkv, N


def normalize_block_indices(block_indices: Tensor) -> Tensor:
    """The same selection with every slot that reads nothing set to -1: future blocks
    (j > the query block), duplicates; the kept blocks ascending in each row, -1s last."""
    N = block_indices.shape[-2]
    n_N1 = torch.arange(N, device=block_indices.device).view(N, 1)
    valid = (block_indices >= 0) & (block_indices <= n_N1)
    key = torch.where(valid, block_indices, N).sort(dim=-1).values
    dup = torch.zeros_like(valid)
    dup[..., 1:] = key[..., 1:] == key[..., :-1]
    if bool(dup.any()):  # duplicates to the end too
        key = torch.where(dup, N, key).sort(dim=-1).values
    return torch.where(key < N, key, -1)


def block_selected(block_indices: Tensor) -> Tensor:
    """[B, Hkv, N, N] bool: query block n may read key block j (j <= n, selected)."""
    N = block_indices.shape[-2]
    idx = normalize_block_indices(block_indices)
    sel = torch.zeros(*idx.shape[:3], N + 1, dtype=torch.bool, device=idx.device)
    sel.scatter_(-1, torch.where(idx >= 0, idx, N), True)
    return sel[..., :N]


def block_mask(block_indices: Tensor, seq_len: int, block_size: int) -> Tensor:
    """[B, Hkv, S, S] bool: the token mask the selection implies (query t reads key s)."""
    sel = block_selected(block_indices)
    blk_S = torch.arange(seq_len, device=block_indices.device) // block_size
    pos = torch.arange(seq_len, device=block_indices.device)
    causal_SS = pos.view(-1, 1) >= pos.view(1, -1)
    return sel[:, :, blk_S][:, :, :, blk_S] & causal_SS


@torch.no_grad()
def selection_density(block_indices: Tensor, seq_len: int, block_size: int) -> Tensor:
    """Kept fraction of the causal score matrix (S(S+1)/2 entries), averaged over batch and
    kv-heads: a scalar float tensor."""
    idx = normalize_block_indices(block_indices)
    N = idx.shape[-2]
    n_N = torch.arange(N, device=idx.device)
    rows_N = (seq_len - n_N * block_size).clamp(max=block_size).to(torch.float64)
    past_BHN = ((idx >= 0) & (idx < n_N.view(N, 1))).sum(-1).to(torch.float64)
    own_BHN = (idx == n_N.view(N, 1)).any(-1).to(torch.float64)
    kept = (rows_N * block_size * past_BHN + own_BHN * rows_N * (rows_N + 1) / 2).sum(-1)
    return (kept / (seq_len * (seq_len + 1) / 2)).mean().float()


@torch.no_grad()
def selection_recall(
    q: Tensor, k: Tensor, block_indices: Tensor, block_size: int, *, max_query_blocks: int = 8
) -> tuple[Tensor, Tensor]:
    """How well the selection covers dense causal attention, on up to ``max_query_blocks``
    evenly spaced query blocks (all when there are fewer):

    recall: share of the m heaviest key blocks of dense attention (m = the number of blocks the
        router kept for that query block; attention summed over the block's queries and the GQA
        group's heads) that the router selected.
    mass: the dense attention probability mass that falls on the selected blocks.
    Both scalar float tensors, averaged over the sampled blocks, batch and kv-heads.
    """
    B, H, S, Dh = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    idx = normalize_block_indices(block_indices)
    N = idx.shape[-2]
    picks = torch.linspace(0, N - 1, min(N, max_query_blocks)).round().long().unique()
    recalls, masses = [], []
    pos_S = torch.arange(S, device=q.device)
    blk_S = pos_S // block_size
    for n in picks.tolist():
        t0, t1 = n * block_size, min(S, (n + 1) * block_size)
        qn = q[:, :, t0:t1].float().view(B, Hkv, G, t1 - t0, Dh)
        scores = torch.einsum("bhgtd,bhsd->bhgts", qn, k[:, :, :t1].float()) * Dh**-0.5
        causal = pos_S[:t1].view(1, -1) <= pos_S[t0:t1].view(-1, 1)
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        mass_BHJ = torch.zeros(B, Hkv, n + 1, device=q.device, dtype=p.dtype)
        mass_BHJ.index_add_(2, blk_S[:t1], p.sum(dim=(2, 3)))
        mass_BHJ = mass_BHJ / (G * (t1 - t0))
        row = idx[:, :, n]
        chosen = torch.zeros(B, Hkv, n + 2, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, torch.where(row >= 0, row, n + 1), True)
        chosen = chosen[..., : n + 1]
        m = chosen.sum(-1)
        masses.append((mass_BHJ * chosen).sum(-1).flatten())
        order = mass_BHJ.argsort(-1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(n + 1, device=q.device).expand_as(order))
        top = rank < m.unsqueeze(-1)
        hit = (top & chosen).sum(-1).float()
        recalls.append(torch.where(m > 0, hit / m.clamp_min(1), 1.0).flatten())
    return torch.cat(recalls).mean(), torch.cat(masses).mean().float()


@torch.no_grad()
def selection_stats(q: Tensor, k: Tensor, block_indices: Tensor, block_size: int, *, recall: bool = True) -> dict[str, Tensor]:
    """density (kept fraction of the causal score matrix), blocks_per_query (mean kept blocks of
    a query block), and with ``recall`` the sampled ``recall`` and ``mass`` of
    :func:`selection_recall`."""
    S = q.shape[2]
    idx = normalize_block_indices(block_indices)
    out = {
        "density": selection_density(idx, S, block_size),
        "blocks_per_query": (idx >= 0).sum(-1).float().mean(),
    }
    if recall:
        out["recall"], out["mass"] = selection_recall(q, k, idx, block_size)
    return out
