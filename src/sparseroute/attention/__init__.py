"""Sparse attention: routers pick, for every query block, the key/value blocks (or tokens) it
reads; an executor computes attention over them only.

- :func:`block_sparse_attention` — the executor (CPU gather path with a flash-style backward;
  FlexAttention on CUDA); :func:`masked_reference` — the dense oracle.
- :class:`SparseAttention` — q/k/v/o projections, RoPE, a router from ``ATTENTION_ROUTERS``.
- :class:`BlockRouting` — a router's selection (``block_indices`` [B, Hkv, N, K], -1 unused).
- :class:`AttentionConfig` — a model's sparse attention layers (router, options, block size, layers).
"""

from sparseroute.attention.config import AttentionConfig
from sparseroute.attention.executor import block_sparse_attention
from sparseroute.attention.module import SparseAttention
from sparseroute.attention.reference import masked_reference
from sparseroute.attention.rope import apply_rope, rope_cos_sin
from sparseroute.attention.routers import ATTENTION_ROUTERS, AttentionRouter, build_attention_router
from sparseroute.attention.selection import BlockRouting, block_mask, selection_density, selection_stats

__all__ = [
    "ATTENTION_ROUTERS",
    "AttentionConfig",
    "AttentionRouter",
    "BlockRouting",
    "SparseAttention",
    "build_attention_router",
    "apply_rope",
    "block_mask",
    "block_sparse_attention",
    "masked_reference",
    "rope_cos_sin",
    "selection_density",
    "selection_stats",
]
