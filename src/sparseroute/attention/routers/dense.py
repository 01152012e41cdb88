"""``dense``: every past block (full causal attention through the block-sparse executor), and
``window``: the last ``window`` blocks (the query's own included), with ``sink`` also the first.

Legend: B batch, Hkv kv-heads, N blocks, K slots.
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
)
from sparseroute.attention.selection import BlockRouting, num_blocks


def _expand(idx_NK: Tensor, k: Tensor) -> Tensor:
    B, Hkv = k.shape[0], k.shape[1]
    return idx_NK.view(1, 1, *idx_NK.shape).expand(B, Hkv, *idx_NK.shape).contiguous()


@ATTENTION_ROUTERS.register("dense")
class DenseRouter(AttentionRouter):
    """Every block j <= n: the dense causal baseline, run by the same executor."""

    def route(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> BlockRouting:
        N = num_blocks(q.shape[2], self.block_size)
        n = torch.arange(N, device=q.device)
        idx_NN = torch.where(n.view(1, N) <= n.view(N, 1), n.view(1, N), -1)
        return BlockRouting(_expand(idx_NN, k), self.block_size)


@dataclass(frozen=True, kw_only=True)
class WindowOptions(AttentionRouterOptions):
    """window: how many blocks a query block reads, its own included (>= 1).
    sink: also read the first block (attention sinks)."""

    window: int = 4
    sink: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("window", self.window)
        if not isinstance(self.sink, bool):
            raise ValueError(f"sink must be True or False; got {self.sink!r}")


@ATTENTION_ROUTERS.register("window")
class WindowRouter(AttentionRouter):
    """Blocks n - window + 1 .. n (sliding window at block granularity), plus block 0 with sink."""

    Options = WindowOptions

    def route(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> BlockRouting:
        o = self.options
        N = num_blocks(q.shape[2], self.block_size)
        n = torch.arange(N, device=q.device).view(N, 1)
        idx_NW = n - torch.arange(o.window, device=q.device).view(1, -1)
        if o.sink:
            idx_NW = torch.cat([idx_NW, torch.zeros(N, 1, dtype=torch.long, device=q.device)], dim=1)
        idx_NW = torch.where(idx_NW >= 0, idx_NW, -1)
        # the sink duplicates a window block for the first rows: the executor counts it once
        return BlockRouting(_expand(idx_NW, k), self.block_size)

    def density_estimate(self, seq_len: int) -> float:
        N = num_blocks(seq_len, self.block_size)
        kept = sum(min(n, self.options.window - 1) + 0.5 + (self.options.sink and n >= self.options.window) for n in range(N))
        return min(1.0, kept / (N * (N + 1) / 2))
