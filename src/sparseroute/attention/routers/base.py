"""The attention router contract and its registry.

Legend: B batch, H query heads, Hkv kv-heads (G = H / Hkv), S sequence, Dh head dim, D model dim,
bs block size, N = ceil(S / bs) blocks, J key blocks.

A router is an ``nn.Module`` built from the attention layer's shape and its own ``Options`` (a
frozen dataclass; an unknown option raises ValueError naming it). ``route(q, k, v, x)`` returns a
:class:`BlockRouting` (q [B, H, S, Dh] after RoPE, k/v [B, Hkv, S, Dh], x [B, S, D] the layer's
input). ``attend`` runs the executor on that selection; routers whose attention is more than one
selection (NSA's three branches) or that change the keys they route on (MoBA's key convolution)
override it. Every causal router must never select a block after the query's own; the executor
would ignore one anyway, but the statistics would count it.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from sparseroute.attention.selection import BlockRouting, check_block_size, selection_stats
from sparseroute.registry import Registry

__all__ = [
    "ATTENTION_ROUTERS",
    "AttentionRouter",
    "AttentionRouterOptions",
    "build_attention_router",
    "check_count",
    "causal_block_scores",
    "select_blocks",
    "pool_blocks",
    "causal_block_means",
]

ATTENTION_ROUTERS: Registry[type["AttentionRouter"]] = Registry("attention router")

#: ``execute(q, k, v, block_indices, block_size, key_bias=None) -> [B, H, S, Dh]``
Executor = Callable[..., Tensor]


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """An int >= minimum, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class AttentionRouterOptions:
    """Options every attention router accepts.

    stats: compute the selection's statistics (density, blocks per query, and on a few query
        blocks the recall and mass of dense attention) at every forward.
    """

    stats: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.stats, bool):
            raise ValueError(f"stats must be True or False; got {self.stats!r}")


class AttentionRouter(nn.Module, metaclass=abc.ABCMeta):
    """Picks, for each (batch, kv-head, query block), the key blocks its queries read."""

    Options: ClassVar[type[AttentionRouterOptions]] = AttentionRouterOptions
    #: False for routers over 2-D grids or whole sequences (BiFormer regions)
    causal: ClassVar[bool] = True

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        block_size: int,
        options: AttentionRouterOptions | None = None,
    ) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.block_size = check_block_size(block_size)
        self.options = self.Options() if options is None else options

    @abc.abstractmethod
    def route(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> BlockRouting: ...

    def attend(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, execute: Executor) -> tuple[Tensor, BlockRouting]:
        """The layer's attention output [B, H, S, Dh] under this router, and its selection."""
        routing = self.route(q, k, v, x)
        y = execute(q, k, v, routing.block_indices, routing.block_size, key_bias=routing.key_bias)
        return y, self.finish(routing, q, k)

    def finish(self, routing: BlockRouting, q: Tensor, k: Tensor) -> BlockRouting:
        """Add the selection statistics (unless ``options.stats`` is off)."""
        if not self.options.stats:
            return routing
        stats = dict(routing.stats)
        stats.update(selection_stats(q.detach(), k.detach(), routing.block_indices, routing.block_size))
        return routing.replace(stats=stats)

    def density_estimate(self, seq_len: int) -> float:
        """The kept fraction of the causal score matrix this router will select at ``seq_len``
        (for FLOPs accounting before a run); routers whose count depends on the data return
        their expected or maximum value."""
        return 1.0


def build_attention_router(
    name: str,
    *,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    block_size: int,
    options: dict[str, Any] | AttentionRouterOptions | None = None,
) -> AttentionRouter:
    """The router registered as ``name`` with its options (a dict of ``Options`` fields; an
    unknown name or option raises ValueError naming it)."""
    cls = ATTENTION_ROUTERS.get(name)
    if isinstance(options, AttentionRouterOptions):
        opts = options
    else:
        options = dict(options or {})
        names = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for attention router {name!r}; allowed: {', '.join(names)}"
            )
        opts = cls.Options(**options)
    return cls(
        d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, block_size=block_size, options=opts
    )


# -- helpers shared by the block routers -----------------------------------------------------------


def pool_blocks(x_BHSD: Tensor, block_size: int) -> Tensor:
    """Mean over each block of positions: [B, H, S, Dh] -> [B, H, N, Dh] (the last block averages
    only the positions it has)."""
    B, H, S, Dh = x_BHSD.shape
    N = -(-S // block_size)
    pad = N * block_size - S
    if pad:
        x_BHSD = torch.nn.functional.pad(x_BHSD, (0, 0, 0, pad))
    sums = x_BHSD.view(B, H, N, block_size, Dh).sum(3)
    counts = torch.full((N,), float(block_size), device=x_BHSD.device, dtype=sums.dtype)
    counts[-1] = block_size - pad
    return sums / counts.view(N, 1)


def causal_block_means(x_BHSX: Tensor, block_size: int) -> Tensor:
    """[B, H, S, X] -> [B, H, N, X]: for block n, the mean of x over the ``block_size`` positions
    up to and including the block's first, n·bs - bs + 1 .. n·bs (fewer at the start): what every
    query of the block may already see. A block router that summarises a query block by this
    (rather than by all its positions) decides before any of the block's later queries exist, so
    changing a token never changes the selection of an earlier query."""
    B, H, S, X = x_BHSX.shape
    N = -(-S // block_size)
    acc = torch.promote_types(x_BHSX.dtype, torch.float64)
    cs = torch.nn.functional.pad(x_BHSX.to(acc).cumsum(2), (0, 0, 1, 0))  # cs[t] = sum of x[< t]
    first = torch.arange(N, device=x_BHSX.device) * block_size
    lo = (first - block_size + 1).clamp_min(0)
    sums = cs[:, :, first + 1] - cs[:, :, lo]
    return (sums / (first - lo + 1).view(N, 1).to(acc)).to(x_BHSX.dtype)


def causal_block_scores(scores_BHNJ: Tensor, *, strict: bool = False) -> Tensor:
    """``scores`` with every future key block (j > n; with ``strict`` also j = n) set to -inf."""
    N, J = scores_BHNJ.shape[-2:]
    n = torch.arange(N, device=scores_BHNJ.device).view(N, 1)
    j = torch.arange(J, device=scores_BHNJ.device).view(1, J)
    future = j >= n if strict else j > n
    return scores_BHNJ.masked_fill(future, float("-inf"))


def select_blocks(scores_BHNJ: Tensor, k: int, forced_BHNJ: Tensor | None = None) -> Tensor:
    """The top-``k`` key blocks of each row by score (-inf = not selectable), with the ``forced``
    blocks always among them (ahead of the rest); [B, Hkv, N, min(k, J)] int64, -1 where a row
    has fewer than k selectable blocks."""
    J = scores_BHNJ.shape[-1]
    k = min(k, J)
    s = scores_BHNJ.detach().float()
    if forced_BHNJ is not None:
        s = torch.where(forced_BHNJ & torch.isfinite(s), float("inf"), s)
    top = s.topk(k, dim=-1)
    return torch.where(top.values > float("-inf"), top.indices, -1)
