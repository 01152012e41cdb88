"""Executors: compute the experts a Routing chose, and nothing else.

Legend: T tokens, D model dim, E experts, K slots per token, S routed (token, slot) pairs, F hidden.

Dropless dispatch: the (token, slot) pairs are stably sorted by expert (unused slots, index -1,
sort last and are cut off), per-expert counts give the group offsets, each projection is one
grouped matmul over all experts, and the weighted rows are added back to their tokens with
``index_add_``. Experts that receive nothing cost nothing; variable-count routings (relu,
expert_choice, capacity drops) use the same path.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparseroute.moe.experts import Experts
from sparseroute.routing import Registry, Routing

Executor = Callable[[Tensor, Routing, Experts], Tensor]
EXECUTORS: Registry[Executor] = Registry("dispatch")


def sort_by_expert(routing: Routing) -> tuple[Tensor, Tensor, Tensor]:
    """Return (order_S, token_S, counts_E): flat (token·K + slot) positions of the used slots,
    stably sorted by expert; the token of each; and how many rows each expert gets."""
    idx_TK = routing.indices
    E, K = routing.num_experts, idx_TK.shape[1]
    flat = idx_TK.reshape(-1)
    key = torch.where(flat >= 0, flat, torch.full_like(flat, E))
    counts = torch.bincount(key, minlength=E + 1)
    order = torch.argsort(key, stable=True)
    used = flat.numel() - int(counts[E])
    order_S = order[:used]
    return order_S, torch.div(order_S, K, rounding_mode="floor"), counts[:E]


def _combine(x_TD: Tensor, routing: Routing, order_S: Tensor, tok_S: Tensor, y_SD: Tensor) -> Tensor:
    w_S = routing.weights.reshape(-1).index_select(0, order_S).to(y_SD.dtype)
    out = x_TD.new_zeros(x_TD.shape)
    return out.index_add_(0, tok_S, y_SD * w_S.unsqueeze(1))


@EXECUTORS.register("grouped")
def grouped_dispatch(x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """One ``F.grouped_mm`` per projection over all experts."""
    order_S, tok_S, counts_E = sort_by_expert(routing)
    if order_S.numel() == 0:
        return x_TD.new_zeros(x_TD.shape)
    offs_E = torch.cumsum(counts_E, dim=0).to(torch.int32)
    x_SD = x_TD.index_select(0, tok_S)
    h_SF = experts.act(F.grouped_mm(x_SD, experts.w_in, offs=offs_E))
    y_SD = F.grouped_mm(h_SF, experts.w_out, offs=offs_E)
    return _combine(x_TD, routing, order_S, tok_S, y_SD)


@EXECUTORS.register("loop")
def loop_dispatch(x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """The same sort, then a plain matmul per contiguous expert segment (portable fallback)."""
    order_S, tok_S, counts_E = sort_by_expert(routing)
    if order_S.numel() == 0:
        return x_TD.new_zeros(x_TD.shape)
    x_SD = x_TD.index_select(0, tok_S)
    pieces = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            pieces.append(experts.expert(e, x_SD[start : start + n]))
            start += n
    return _combine(x_TD, routing, order_S, tok_S, torch.cat(pieces))
