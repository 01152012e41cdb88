"""SparseGPT (Frantar & Alistarh, 2023): one-shot OBS pruning with weight reconstruction.

For a linear layer with weight ``W_OI`` and calibration inputs X, the layer-wise objective is
‖(W − Ŵ)Xᵀ‖², whose Hessian is H = 2XᵀX/n. Columns are visited left to right in blocks; when a
weight is pruned, its error is spread over the columns not yet visited through the upper
Cholesky factor of H⁻¹ (the optimal OBS update restricted to the remaining columns), so the
kept weights compensate for the pruned ones. Which weights are pruned is decided by the saliency
w²/[H⁻¹]_jj², per block of columns (unstructured) or at the start of each group of m columns (N:M).

Legend: O output features (rows), I input features (columns), B columns of one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparseroute.weights.patterns import Pattern, check_pattern, parse_pattern

__all__ = ["SparseGPTConfig", "sparsegpt_prune"]


@dataclass(frozen=True, kw_only=True)
class SparseGPTConfig:
    """``blocksize``: columns per block (lazy batch updates; for N:M it is rounded down to a multiple
    of m, at least m); ``percdamp``: dampening added to H's diagonal, as a share of its mean."""

    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        b = self.blocksize
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"SparseGPTConfig.blocksize must be an int >= 1; got {b!r}")
        d = self.percdamp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not d >= 0:
            raise ValueError(f"SparseGPTConfig.percdamp must be a number >= 0; got {d!r}")


def _lowest(scores: Tensor, k: int) -> Tensor:
    """True at the k lowest entries along the last dim (ties: the lower index first)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return out
    idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
    return out.scatter_(-1, idx, True)


def _prune_count(share: float, c0: int, c1: int, scale: int = 1) -> int:
    """Weights pruned among columns [c0, c1): cumulative rounding, so blocks add up to the
    pattern's exact total (round(share·I) per row, or round(share·O·I) per layer)."""
    return int(round(share * scale * c1)) - int(round(share * scale * c0))


def _inverse_cholesky(h_II: Tensor, percdamp: float, name: str) -> Tensor:
    """The upper Cholesky factor U of (H + damp·I)⁻¹ (H⁻¹ = UᵀU)."""
    damp = percdamp * torch.mean(torch.diag(h_II))
    h_II = h_II + damp * torch.eye(h_II.shape[0], dtype=h_II.dtype, device=h_II.device)
    lower, info = torch.linalg.cholesky_ex(h_II)
    if int(info) != 0:
        raise ValueError(f"sparsegpt: {name}: the Hessian is not positive definite after dampening "
                         f"(percdamp={percdamp}); raise percdamp (e.g. 0.1) or use more calibration tokens")
    hinv_II = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(hinv_II, upper=True)
    if int(info) != 0:
        raise ValueError(f"sparsegpt: {name}: the inverse Hessian is not positive definite "
                         f"(percdamp={percdamp}); raise percdamp (e.g. 0.1)")
    return upper


@torch.no_grad()
def sparsegpt_prune(weight_OI: Tensor, hessian_II: Tensor, pattern: Pattern | str,
                    config: SparseGPTConfig | None = None, name: str = "weight") -> tuple[Tensor, Tensor]:
    """Prune ``weight_OI`` to ``pattern`` with SparseGPT; returns (mask_OI kept, reconstructed
    weight_OI in float32, zero where pruned). ``hessian_II`` is H = 2XᵀX/n of the layer's inputs.

    Unstructured, per row: each column block [c0, c1) prunes round(s·c1) − round(s·c0) weights
    of every row; per layer: round(s·O·c1) − round(s·O·c0) of the block's O·B weights. N:M: m − n
    of every group of m. Block patterns are refused (SparseGPT prunes single weights)."""
    pattern = parse_pattern(pattern)
    config = config or SparseGPTConfig()
    if pattern.kind == "block":
        raise ValueError(f"method 'sparsegpt' does not support block pattern {pattern}; use an unstructured "
                         "(e.g. 0.5) or N:M (e.g. 2:4) pattern, or method 'wanda'/'magnitude' for blocks")
    pattern.check_shape(tuple(weight_OI.shape), name)
    O, I = weight_OI.shape
    if tuple(hessian_II.shape) != (I, I):
        raise ValueError(f"sparsegpt: {name}: Hessian shape {tuple(hessian_II.shape)}; expected ({I}, {I})")

    W = weight_OI.detach().to(torch.float32).clone()
    H = hessian_II.detach().to(device=W.device, dtype=torch.float32).clone()
    # an input that is always zero carries no information: its weights go first, H stays invertible
    dead_I = torch.diag(H) == 0
    H[dead_I, dead_I] = 1.0
    W[:, dead_I] = 0.0
    U = _inverse_cholesky(H, float(config.percdamp), name)

    bs = config.blocksize
    if pattern.kind == "nm":
        bs = max(pattern.m, bs - bs % pattern.m)  # every group of m lies inside one block
    pruned_OI = torch.zeros(O, I, dtype=torch.bool, device=W.device)
    for c0 in range(0, I, bs):
        c1 = min(c0 + bs, I)
        W1_OB = W[:, c0:c1].clone()
        Q1_OB = torch.zeros_like(W1_OB)
        err1_OB = torch.zeros_like(W1_OB)
        U1_BB = U[c0:c1, c0:c1]
        d1_B = torch.diag(U1_BB)
        P1_OB = torch.zeros_like(W1_OB, dtype=torch.bool)
        if pattern.kind == "unstructured":
            score_OB = W1_OB.square() / d1_B.square()
            if pattern.scope == "row":
                P1_OB = _lowest(score_OB, _prune_count(pattern.sparsity, c0, c1))
            else:
                k = _prune_count(pattern.sparsity, c0, c1, scale=O)
                P1_OB = _lowest(score_OB.reshape(-1), k).reshape(score_OB.shape)
        for i in range(c1 - c0):
            if pattern.kind == "nm" and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                score_OM = W1_OB[:, g].square() / d1_B[g].square()
                P1_OB[:, g] = _lowest(score_OM, pattern.m - pattern.n)
            w_O = W1_OB[:, i]
            q_O = torch.where(P1_OB[:, i], torch.zeros_like(w_O), w_O)
            Q1_OB[:, i] = q_O
            e_O = (w_O - q_O) / U1_BB[i, i]
            # the pruned weight's error, spread over this block's later columns
            W1_OB[:, i:] -= e_O[:, None] * U1_BB[i, i:][None, :]
            err1_OB[:, i] = e_O
        W[:, c0:c1] = Q1_OB
        pruned_OI[:, c0:c1] = P1_OB
        # and over the columns of the later blocks, at once
        W[:, c1:] -= err1_OB @ U[c0:c1, c1:]
    mask_OI = ~pruned_OI
    check_pattern(mask_OI, pattern, name)
    return mask_OI, W * mask_OI
