"""The configuration of a model's sparse attention: :class:`AttentionConfig`, one validated frozen
dataclass that the LM config holds for its block-sparse attention layers (the counterpart of
:class:`sparseroute.moe.MoEConfig` for the FFNs).

A model with ``attention=AttentionConfig(...)`` replaces the attention of the layers in
``layers`` by :class:`sparseroute.attention.SparseAttention` with this router; the other layers
keep the model's dense attention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseroute.attention.executor import BACKENDS
from sparseroute.attention.routers import (
    ATTENTION_ROUTERS,
    AttentionRouter,
    AttentionRouterOptions,
    build_attention_router,
)
from sparseroute.attention.selection import check_block_size
from sparseroute.moe.config import LayerConfigDict, check_layer_selection, selected_layers

__all__ = ["AttentionConfig", "check_router_options"]

def check_router_options(router: str, options: dict[str, Any]) -> AttentionRouterOptions:
    """The validated ``Options`` of the attention router registered as ``router``; an unknown
    router (ValueError listing the known ones), an unknown option or a bad value raises ValueError
    naming it."""
    cls = ATTENTION_ROUTERS.get(router)
    names = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(
            f"router_options: unknown option(s) {', '.join(unknown)} for attention router {router!r}; "
            f"allowed: {', '.join(names)}"
        )
    try:
        return cls.Options(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"router_options of attention router {router!r}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class AttentionConfig(LayerConfigDict):
    """Block-sparse attention layers of a model (everything but the model's width and heads).

    router, router_options: a name registered in ``sparseroute.attention.ATTENTION_ROUTERS`` and
        the options of its ``Options`` dataclass (a plain dict, validated here: an unknown router
        or option raises ValueError naming it).
    block_size: positions per key/value block (1 = token-level routing).
    layers: which layers get sparse attention: ``"all"``, ``"every_other"`` (1, 3, 5, ...), or a
        tuple of layer indices.
    n_kv_heads: key/value heads of the sparse layers (GQA; ``None`` = as many as query heads).
    backend: the executor's backend (``auto``, ``gather``, ``flex``, ``reference``).
    """

    router: str = "moba"
    router_options: dict[str, Any] = field(default_factory=dict)
    block_size: int = 64
    layers: str | tuple[int, ...] = "all"
    n_kv_heads: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.router, str):
            raise ValueError(
                f"router must be an attention router name ({', '.join(ATTENTION_ROUTERS.names())}); got {self.router!r}"
            )
        ATTENTION_ROUTERS.get(self.router)  # unknown name -> ValueError listing the known ones
        if not isinstance(self.router_options, dict):
            raise ValueError(f"router_options must be a dict of option name -> value; got {self.router_options!r}")
        object.__setattr__(self, "router_options", dict(self.router_options))
        check_router_options(self.router, self.router_options)
        check_block_size(self.block_size)
        if self.n_kv_heads is not None and (
            isinstance(self.n_kv_heads, bool) or not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1
        ):
            raise ValueError(
                f"n_kv_heads must be None (as many as the query heads) or an int >= 1; got {self.n_kv_heads!r}"
            )
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        object.__setattr__(
            self, "layers", check_layer_selection(self.layers, "use attention=None for dense attention")
        )

    def layer_indices(self, n_layers: int) -> tuple[int, ...]:
        """Sorted indices of the layers of an ``n_layers`` model that get sparse attention."""
        return selected_layers(self.layers, n_layers)

    def kv_heads(self, n_heads: int) -> int:
        """The key/value heads of a sparse layer with ``n_heads`` query heads."""
        return n_heads if self.n_kv_heads is None else self.n_kv_heads

    def build_router(self, d_model: int, n_heads: int, *, device: str | torch.device = "meta") -> AttentionRouter:
        """This config's router for a layer of width ``d_model`` and ``n_heads`` query heads, built on
        ``device`` (by default ``meta``: nothing is allocated; for accounting, e.g.
        :meth:`density_estimate` or counting its parameters)."""
        with torch.device(device):
            return build_attention_router(
                self.router, d_model=d_model, n_heads=n_heads, n_kv_heads=self.kv_heads(n_heads),
                head_dim=d_model // n_heads, block_size=self.block_size, options=self.router_options,
            )

    def density_estimate(self, seq_len: int, *, d_model: int, n_heads: int) -> float:
        """The router's ``density_estimate(seq_len)``: the kept fraction of the causal score matrix
        (its router built on the meta device; see :meth:`AttentionRouter.density_estimate`)."""
        return float(self.build_router(d_model, n_heads).density_estimate(seq_len))
