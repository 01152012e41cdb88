"""BiFormer bi-level routing attention over a 2-D token grid (non-causal): regions pick regions,
tokens attend to the tokens of the picked regions.

``RegionAttention(d_model, n_heads, region_size=r, top_k=k, lce=...)``: for x [B, Hg, Wg, D]
(Hg, Wg multiples of r) the grid is cut into R = (Hg/r)·(Wg/r) regions of r x r tokens.
Per head:

1. q, k, v projections (no bias); region-pooled q_r, k_r (mean over the region's tokens).
2. Region adjacency A = q_r · k_rᵀ [R, R]; each region keeps its top-``top_k`` regions
   (not differentiable, as in BiFormer; ``top_k`` larger than R keeps all R).
3. Token attention: every token of a region attends, softmax(q kᵀ / √Dh), to all tokens of the
   kept regions (the region itself only if it picked itself).
4. With ``lce``: a depthwise 3 x 3 convolution of v over the grid (local context enhancement,
   zero-padded) is added to the attention output; then the output projection.

``forward(x) -> (y [B, Hg, Wg, D], info)``; info holds ``region_indices`` [B, H, R, k] (regions
numbered row-major over the region grid), ``regions`` (Hg/r, Wg/r), ``region_size`` and
``density`` (k / R, the kept fraction of the token score matrix).

Legend: B batch, Hg x Wg token grid, D model dim, H heads, Dh head dim, r region side,
R regions, T = r² tokens per region, k kept regions, M = k·T gathered keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparseroute.attention.routers.base import check_count
from sparseroute.kernels import gemm

__all__ = ["RegionAttention", "RegionOptions", "region_mask"]


@dataclass(frozen=True, kw_only=True)
class RegionOptions:
    """region_size: side r of a square region (>= 1; must divide both grid dims at forward).
    top_k: regions each region attends to (>= 1; capped at the number of regions).
    lce: add the depthwise 3 x 3 convolution of v (local context enhancement)."""

    region_size: int = 7
    top_k: int = 4
    lce: bool = False

    def __post_init__(self) -> None:
        check_count("region_size", self.region_size)
        check_count("top_k", self.top_k)
        if not isinstance(self.lce, bool):
            raise ValueError(f"lce must be True or False; got {self.lce!r}")


def to_regions(x_BHgWgC: Tensor, r: int) -> Tensor:
    """[B, Hg, Wg, C] -> [B, R, T, C] (regions row-major, tokens row-major inside a region)."""
    B, Hg, Wg, C = x_BHgWgC.shape
    x = x_BHgWgC.view(B, Hg // r, r, Wg // r, r, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (Hg // r) * (Wg // r), r * r, C)


def from_regions(x_BRTC: Tensor, Hg: int, Wg: int, r: int) -> Tensor:
    """Inverse of :func:`to_regions`: [B, R, T, C] -> [B, Hg, Wg, C]."""
    B, _, _, C = x_BRTC.shape
    x = x_BRTC.view(B, Hg // r, Wg // r, r, r, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hg, Wg, C)


def region_mask(region_indices_BHRK: Tensor, Hg: int, Wg: int, r: int) -> Tensor:
    """[B, H, Hg·Wg, Hg·Wg] bool over row-major grid tokens: token i may read token j (the
    region of j is among the kept regions of the region of i). For tests and inspection."""
    B, H, R, _ = region_indices_BHRK.shape
    sel_BHRR = torch.zeros(B, H, R, R, dtype=torch.bool, device=region_indices_BHRK.device)
    sel_BHRR.scatter_(-1, region_indices_BHRK, True)
    rows = torch.arange(Hg, device=sel_BHRR.device).view(Hg, 1) // r
    cols = torch.arange(Wg, device=sel_BHRR.device).view(1, Wg) // r
    region_of = (rows * (Wg // r) + cols).reshape(-1)  # [Hg·Wg]
    return sel_BHRR[:, :, region_of][:, :, :, region_of]


class RegionAttention(nn.Module):
    """Bi-level routing attention (BiFormer) over a 2-D grid; see the module docstring."""

    def __init__(self, d_model: int, n_heads: int, *, region_size: int = 7, top_k: int = 4, lce: bool = False) -> None:
        super().__init__()
        check_count("d_model", d_model)
        check_count("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        self.options = RegionOptions(region_size=region_size, top_k=top_k, lce=lce)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.q = gemm.Linear(d_model, d_model, bias=False)
        self.k = gemm.Linear(d_model, d_model, bias=False)
        self.v = gemm.Linear(d_model, d_model, bias=False)
        self.o = gemm.Linear(d_model, d_model, bias=False)
        self.lce: nn.Conv2d | None = None
        if lce:
            self.lce = nn.Conv2d(d_model, d_model, 3, padding=1, groups=d_model)

    def check_grid(self, x: Tensor) -> tuple[int, int]:
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, Hgrid, Wgrid, D={self.d_model}]; got shape {tuple(x.shape)}")
        r = self.options.region_size
        Hg, Wg = x.shape[1], x.shape[2]
        if Hg % r or Wg % r or Hg == 0 or Wg == 0:
            raise ValueError(
                f"region_size={r} must divide both grid dims; got a {Hg} x {Wg} grid "
                f"(pad the grid or choose a region_size dividing {Hg} and {Wg})"
            )
        return Hg, Wg

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, Hg, Wg, Dh]."""
        B, Hg, Wg, _ = x.shape
        H, Dh = self.n_heads, self.head_dim
        return tuple(p(x).view(B, Hg, Wg, H, Dh).permute(0, 3, 1, 2, 4) for p in (self.q, self.k, self.v))

    def local_context(self, v_BHHgWgDh: Tensor) -> Tensor:
        """The depthwise 3 x 3 convolution of v over the grid, [B, Hg, Wg, D]."""
        B, H, Hg, Wg, Dh = v_BHHgWgDh.shape
        v_BDHgWg = v_BHHgWgDh.permute(0, 1, 4, 2, 3).reshape(B, H * Dh, Hg, Wg)
        return self.lce(v_BDHgWg).permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
        Hg, Wg = self.check_grid(x)
        B = x.shape[0]
        H, Dh, r = self.n_heads, self.head_dim, self.options.region_size
        q, k, v = self.project(x)  # [B, H, Hg, Wg, Dh]
        BH = B * H
        q_r = to_regions(q.reshape(BH, Hg, Wg, Dh), r)  # [BH, R, T, Dh]
        k_r = to_regions(k.reshape(BH, Hg, Wg, Dh), r)
        v_r = to_regions(v.reshape(BH, Hg, Wg, Dh), r)
        R, T = q_r.shape[1], q_r.shape[2]
        kk = min(self.options.top_k, R)
        # level 1: region to region
        adj_BRR = torch.einsum("brd,bsd->brs", q_r.detach().mean(2), k_r.detach().mean(2))
        idx_BRK = adj_BRR.topk(kk, dim=-1).indices  # [BH, R, k]
        # level 2: tokens over the gathered regions
        gather = idx_BRK.reshape(BH, R * kk, 1, 1).expand(BH, R * kk, T, Dh)
        k_g = k_r.gather(1, gather).view(BH, R, kk * T, Dh)
        v_g = v_r.gather(1, gather).view(BH, R, kk * T, Dh)
        p = torch.matmul(q_r, k_g.transpose(-1, -2)).mul_(Dh**-0.5).softmax(-1)  # [BH, R, T, M]
        y_r = torch.matmul(p, v_g)  # [BH, R, T, Dh]
        y = from_regions(y_r, Hg, Wg, r).view(B, H, Hg, Wg, Dh).permute(0, 2, 3, 1, 4).reshape(B, Hg, Wg, H * Dh)
        if self.lce is not None:
            y = y + self.local_context(v)
        info = {
            "region_indices": idx_BRK.view(B, H, R, kk),
            "regions": (Hg // r, Wg // r),
            "region_size": r,
            "density": kk / R,
        }
        return self.o(y), info
