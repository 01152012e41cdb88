"""The routing contract shared by every mechanism: a router decides, an executor computes.

Legend: T tokens, D model dim, E candidates (experts), K slots per token.

A router returns a :class:`Routing`; an executor consumes it and never re-decides. Slots that a
token does not use hold index ``-1`` and weight ``0``. Auxiliary losses travel in
``Routing.losses`` (already multiplied by their coefficients, so a training loop adds
``sum(routing.losses.values())``); cheap, detached statistics travel in ``Routing.stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = [
    "Routing",
    "expert_keys",
    "expert_load",
    "routing_stats",
    "apply_capacity",
    "capacity_for",
    "routing_fluctuation",
]


def expert_keys(indices: Tensor, num_experts: int) -> Tensor:
    """The flattened ``indices`` (any shape, ``-1`` = unused) with unused entries mapped to E, so
    that they count in (or sort into) an extra last bin instead of being removed by a boolean
    mask (which costs a nonzero and an index kernel)."""
    flat = indices.reshape(-1)
    return torch.where(flat >= 0, flat, num_experts)


def expert_load(indices: Tensor, num_experts: int) -> Tensor:
    """[E] int64: how many entries of ``indices`` (any shape, ``-1`` = unused) name each expert."""
    return torch.bincount(expert_keys(indices, num_experts), minlength=num_experts + 1)[:num_experts]


@dataclass
class Routing:
    """Which candidates each item uses, with what weight.

    indices: [T, K] int64, ``-1`` marks an unused slot.
    weights: [T, K] floating; ``0`` where the slot is unused.
    losses: auxiliary losses to add to the training loss (name -> scalar tensor).
    stats: detached statistics (name -> tensor); see :func:`routing_stats`.
    num_experts: E, the number of candidates the indices refer to.
    """

    indices: Tensor
    weights: Tensor
    num_experts: int
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.indices.dim() != 2:
            raise ValueError(f"Routing.indices must be [T, K]; got shape {tuple(self.indices.shape)}")
        if self.indices.dtype != torch.int64:
            raise ValueError(f"Routing.indices must be int64; got {self.indices.dtype}")
        if self.weights.shape != self.indices.shape:
            raise ValueError(
                f"Routing.weights shape {tuple(self.weights.shape)} must equal indices shape "
                f"{tuple(self.indices.shape)}"
            )

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def slots(self) -> int:
        return self.indices.shape[1]

    def tokens_per_expert(self) -> Tensor:
        """[E] int64: how many (token, slot) pairs each expert receives."""
        return expert_load(self.indices, self.num_experts)

    def active_slots(self) -> Tensor:
        """[T] int64: how many experts each token uses."""
        return (self.indices >= 0).sum(dim=1)

    def replace(self, **changes) -> "Routing":
        return replace(self, **changes)


def mean_entropy(p: Tensor) -> Tensor:
    """Mean over the rows of ``p`` (distributions over the last dimension) of their entropy in
    nats, with 0 log 0 = 0; 0 when there are no rows."""
    if p.numel() == 0:
        return torch.zeros((), device=p.device)
    # (torch.special.entr is one pass but not vectorised on the CPU: slower than these four)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1).mean()


@torch.no_grad()
def routing_stats(
    indices_TK: Tensor,
    num_experts: int,
    probs_TE: Tensor | None = None,
    weights_TK: Tensor | None = None,
) -> dict[str, Tensor]:
    """Statistics every router reports.

    tokens_per_expert: [E] pairs routed to each expert.
    imbalance: max load / mean load (1.0 is perfectly balanced; 0 when nothing is routed).
    entropy: mean per-token entropy (nats) of the routing distribution: ``probs_TE`` when the
        router has one, otherwise the token's normalised slot weights.
    dropped_fraction: 0 here; capacity dropping (:func:`apply_capacity`) overwrites it.
    active_per_token: mean number of experts a token uses.
    """
    load = expert_load(indices_TK, num_experts)
    mean_load = load.double().mean()
    # branchless (torch.compile traces it): 0 when nothing is routed
    imbalance = torch.where(mean_load > 0, load.max().double() / mean_load.clamp_min(1e-300), 0.0)
    if probs_TE is not None:
        p = probs_TE.float()
    elif weights_TK is not None:
        w = weights_TK.float().clamp_min(0)
        p = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        p = None
    entropy = mean_entropy(p) if p is not None else torch.zeros(())
    active = (indices_TK >= 0).sum(dim=1).float()
    return {
        "tokens_per_expert": load,
        "imbalance": imbalance.float(),
        "entropy": entropy.float(),
        "dropped_fraction": torch.zeros(()),
        "active_per_token": active.mean() if active.numel() else torch.zeros(()),
    }


def capacity_for(capacity_factor: float, num_tokens: int, top_k: float, num_experts: int) -> int:
    """Per-expert capacity C = ceil(capacity_factor * T * k / E), at least 1, at most T·k."""
    if capacity_factor < 0 or not math.isfinite(capacity_factor):
        raise ValueError(f"capacity_factor must be a finite number >= 0; got {capacity_factor}")
    cap = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    return max(1, min(cap, max(1, int(num_tokens * top_k))))


def apply_capacity(routing: Routing, capacity: int) -> Routing:
    """Drop (token, slot) pairs beyond each expert's capacity and report the dropped fraction.

    Priority follows GShard/Switch: all first choices (slot 0) before second choices, and within a
    slot, earlier tokens first. Dropped slots become index -1 with weight 0 (the token keeps its
    other experts; a token that loses all of them passes through as zero, as in Switch).
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0; got {capacity}")
    idx_TK = routing.indices
    T, K = idx_TK.shape
    E = routing.num_experts
    # Priority order: slot-major, then token.
    idx_KT = idx_TK.t().reshape(-1)
    valid = idx_KT >= 0
    one_hot = torch.zeros(idx_KT.numel(), E + 1, dtype=torch.int32, device=idx_TK.device)
    one_hot.scatter_(1, torch.where(valid, idx_KT, E).unsqueeze(1), 1)
    position = (one_hot.cumsum(dim=0) - 1).gather(1, torch.where(valid, idx_KT, E).unsqueeze(1)).squeeze(1)
    keep_KT = valid & (position < capacity)
    keep_TK = keep_KT.reshape(K, T).t()
    new_idx = torch.where(keep_TK, idx_TK, torch.full_like(idx_TK, -1))
    new_w = torch.where(keep_TK, routing.weights, torch.zeros_like(routing.weights))
    n_valid = int(valid.sum())
    n_dropped = n_valid - int(keep_KT.sum())
    stats = dict(routing.stats)
    stats.update(routing_stats(new_idx, E, weights_TK=new_w.detach()))
    if "entropy" in routing.stats:
        stats["entropy"] = routing.stats["entropy"]
    stats["dropped_fraction"] = torch.tensor(n_dropped / n_valid if n_valid else 0.0)
    return routing.replace(indices=new_idx, weights=new_w, stats=stats)


def routing_fluctuation(idx_a_TK: Tensor, idx_b_TK: Tensor) -> float:
    """Share of tokens whose top-1 expert differs between two routings of the same T tokens
    (e.g. the same batch routed by two checkpoints). Top-1 is slot 0 (the highest-scoring choice
    of a top-k router); a slot holding -1 compares like any other index. 0.0 when T = 0."""
    for name, idx in (("idx_a", idx_a_TK), ("idx_b", idx_b_TK)):
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"{name} must be [T, K] with K >= 1; got shape {tuple(idx.shape)}")
    if idx_a_TK.shape[0] != idx_b_TK.shape[0]:
        raise ValueError(
            f"idx_a and idx_b must route the same tokens; got {idx_a_TK.shape[0]} and {idx_b_TK.shape[0]} tokens"
        )
    if idx_a_TK.shape[0] == 0:
        return 0.0
    return float((idx_a_TK[:, 0] != idx_b_TK[:, 0].to(idx_a_TK.device)).float().mean())
