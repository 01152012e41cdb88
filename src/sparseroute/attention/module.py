"""``SparseAttention``: an attention layer whose keys/values are picked by a router.

Legend: B batch, S sequence, D model dim, H query heads, Hkv kv-heads, Dh head dim.

q/k/v/o projections without bias and rotate-half RoPE as in the LM; the router (by name from
``ATTENTION_ROUTERS``) selects blocks and the executor (``backend``) computes attention over
them. ``forward(x) -> (y, routing)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from sparseroute.attention.executor import BACKENDS, block_sparse_attention
from sparseroute.attention.rope import apply_rope, rope_cos_sin
from sparseroute.attention.routers import build_attention_router
from sparseroute.attention.routers.base import check_count
from sparseroute.attention.selection import BlockRouting, check_block_size
from sparseroute.kernels import gemm

__all__ = ["SparseAttention", "check_heads"]


def check_heads(d_model: int, n_heads: int, n_kv_heads: int | None) -> tuple[int, int, int]:
    """(H, Hkv, Dh) after validation; ValueError names the field."""
    check_count("d_model", d_model)
    check_count("n_heads", n_heads)
    Hkv = n_heads if n_kv_heads is None else check_count("n_kv_heads", n_kv_heads)
    if d_model % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
    if n_heads % Hkv:
        raise ValueError(f"n_kv_heads={Hkv} must divide n_heads={n_heads}")
    Dh = d_model // n_heads
    if Dh % 2:
        raise ValueError(f"n_heads: the head dim d_model/n_heads = {Dh} must be even for RoPE")
    return n_heads, Hkv, Dh


class SparseAttention(nn.Module):
    """Multi-head (GQA when ``n_kv_heads < n_heads``) causal attention over routed blocks.

    router: a name in ``ATTENTION_ROUTERS``; router_options: its options (dict).
    block_size: positions per block (1 = token-level routing). rope_base: RoPE frequency base.
    backend: the executor's backend (``auto``, ``gather``, ``flex``, ``reference``).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        router: str = "moba",
        router_options: dict[str, Any] | None = None,
        block_size: int = 64,
        *,
        rope_base: float = 10000.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        H, Hkv, Dh = check_heads(d_model, n_heads, n_kv_heads)
        check_block_size(block_size)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if not (isinstance(rope_base, (int, float)) and rope_base > 0):
            raise ValueError(f"rope_base must be a number > 0; got {rope_base!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, Dh
        self.block_size, self.rope_base, self.backend = block_size, float(rope_base), backend
        self.q = gemm.Linear(d_model, H * Dh, bias=False)
        self.k = gemm.Linear(d_model, Hkv * Dh, bias=False)
        self.v = gemm.Linear(d_model, Hkv * Dh, bias=False)
        self.o = gemm.Linear(H * Dh, d_model, bias=False)
        self.router = build_attention_router(
            router, d_model=d_model, n_heads=H, n_kv_heads=Hkv, head_dim=Dh, block_size=block_size,
            options=router_options,
        )

    def _execute(self, q, k, v, block_indices, block_size, *, key_bias=None):
        return block_sparse_attention(q, k, v, block_indices, block_size, key_bias=key_bias, backend=self.backend)

    def project(self, x_BSD: Tensor, cos_SK: Tensor | None = None, sin_SK: Tensor | None = None):
        """q [B, H, S, Dh], k, v [B, Hkv, S, Dh] with RoPE on q and k."""
        B, S, _ = x_BSD.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        if cos_SK is None or sin_SK is None:
            cos_SK, sin_SK = rope_cos_sin(S, Dh, self.rope_base, device=x_BSD.device)
        cos_S1K, sin_S1K = cos_SK.unsqueeze(1), sin_SK.unsqueeze(1)
        q = apply_rope(self.q(x_BSD).view(B, S, H, Dh), cos_S1K, sin_S1K).transpose(1, 2)
        k = apply_rope(self.k(x_BSD).view(B, S, Hkv, Dh), cos_S1K, sin_S1K).transpose(1, 2)
        v = self.v(x_BSD).view(B, S, Hkv, Dh).transpose(1, 2)
        return q, k, v

    def forward(
        self, x_BSD: Tensor, cos_SK: Tensor | None = None, sin_SK: Tensor | None = None
    ) -> tuple[Tensor, BlockRouting]:
        if x_BSD.dim() != 3:
            raise ValueError(f"x must be [B, S, D]; got shape {tuple(x_BSD.shape)}")
        B, S, _ = x_BSD.shape
        q, k, v = self.project(x_BSD, cos_SK, sin_SK)
        y_BHSD, routing = self.router.attend(q, k, v, x_BSD, self._execute)
        return self.o(y_BHSD.transpose(1, 2).reshape(B, S, -1)), routing
