"""DSnoT (Zhang et al., 2024, "Dynamic Sparse No Training"): a training-free repair of a pruning
mask by swapping pruned and kept weights of the same row.

Each output row o tracks the expected change of its output caused by pruning,
r_o = Σ_j (W_oj − Ŵ_oj·m_oj)·E[x_j], with W the dense weight, Ŵ the pruning method's weight
(equal to W for magnitude and Wanda, reconstructed for SparseGPT) and m the mask. A cycle, per
row still above the threshold:

- regrow the pruned weight whose contribution c_j = W_oj·E[x_j] has the sign of r and the largest
  |c_j| / Var(x_j)^p (a steady input channel is the safest one to bring back), at its dense value;
  only weights whose regrowth alone reduces |r| (|c_j| < 2|r|) are candidates;
- prune the kept weight with the lowest Wanda score |Ŵ_ok|·‖X_k‖ among those whose contribution
  has the sign opposite to r (N:M: those of the regrown weight's group of m, so every group keeps
  n) and that leave |r| smaller after the swap;
- accept the swap only when it makes |r_o| smaller (and, with ``same_sign``, keeps r_o's initial
  sign); a rejected row stops, as does a row whose |r_o| ≤ ``threshold``.

Each weight moves at most once (a regrown weight is never pruned again and vice versa), and the
loop ends after ``max_cycles``. Row counts (and N:M group counts) are unchanged, so the repaired
mask satisfies the same pattern. Legend: O output features, I input features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparseroute.weights.patterns import Pattern, check_pattern, parse_pattern

__all__ = ["DSnoTConfig", "dsnot_objective", "dsnot_repair"]


@dataclass(frozen=True, kw_only=True)
class DSnoTConfig:
    """``threshold``: a row stops once |r| ≤ threshold (r in the units of the layer's output);
    ``max_cycles``: at most this many swaps per row; ``pow_var``: the power p of the variance
    that divides the regrowth score; ``same_sign``: also reject swaps that flip r's initial sign
    (the paper's rule; the authors' scripts run without it)."""

    threshold: float = 0.1
    max_cycles: int = 50
    pow_var: float = 1.0
    same_sign: bool = False

    def __post_init__(self) -> None:
        for field in ("threshold", "pow_var"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"DSnoTConfig.{field} must be a number >= 0; got {v!r}")
        c = self.max_cycles
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"DSnoTConfig.max_cycles must be an int >= 0; got {c!r}")
        if not isinstance(self.same_sign, bool):
            raise ValueError(f"DSnoTConfig.same_sign must be True or False; got {self.same_sign!r}")


def dsnot_objective(dense_OI: Tensor, weight_OI: Tensor, mask_OI: Tensor, mean_I: Tensor) -> Tensor:
    """r_O = Σ_j (dense − weight⊙mask)_oj·E[x_j] (float64): the expected change of each output
    caused by pruning; DSnoT drives |r_o| down and never raises it."""
    diff_OI = dense_OI.double() - weight_OI.double() * mask_OI
    return diff_OI @ mean_I.to(device=diff_OI.device, dtype=torch.float64)


@torch.no_grad()
def dsnot_repair(dense_OI: Tensor, weight_OI: Tensor, mask_OI: Tensor, mean_I: Tensor, var_I: Tensor,
                 sq_norm_I: Tensor, pattern: Pattern | str, config: DSnoTConfig | None = None,
                 name: str = "weight") -> tuple[Tensor, Tensor]:
    """Repair ``mask_OI`` (True = kept) as in the module docstring; returns (new mask, weight)
    where the weight is ``weight_OI`` on the initially kept entries and ``dense_OI`` on the
    initially pruned ones (the values regrown weights take); apply the mask to it.

    ``mean_I``, ``var_I``: E[x_j], Var(x_j) of the layer's inputs; ``sq_norm_I``: ‖X_j‖² (Wanda)."""
    pattern = parse_pattern(pattern)
    config = config or DSnoTConfig()
    if pattern.kind == "block":
        raise ValueError(f"repair 'dsnot' does not support block pattern {pattern}: it swaps single weights "
                         "within a row; use an unstructured or N:M pattern")
    pattern.check_shape(tuple(dense_OI.shape), name)
    if tuple(weight_OI.shape) != tuple(dense_OI.shape) or tuple(mask_OI.shape) != tuple(dense_OI.shape):
        raise ValueError(f"dsnot: {name}: dense {tuple(dense_OI.shape)}, weight {tuple(weight_OI.shape)} and "
                         f"mask {tuple(mask_OI.shape)} must have one shape")
    O, I = dense_OI.shape
    dev = dense_OI.device
    mask0_OI = mask_OI.to(device=dev, dtype=torch.bool)
    W_OI = torch.where(mask0_OI, weight_OI.to(dev), dense_OI).double()
    mean_I = mean_I.to(device=dev, dtype=torch.float64)
    contrib_OI = W_OI * mean_I  # what keeping each weight adds to the expected output
    rank_OI = contrib_OI / var_I.to(device=dev, dtype=torch.float64).clamp_min(1e-12).pow(config.pow_var)
    wanda_OI = W_OI.abs() * sq_norm_I.to(device=dev, dtype=torch.float64).sqrt()

    r_O = dsnot_objective(dense_OI, W_OI, mask0_OI, mean_I)
    sign0_O = torch.sign(r_O)
    kept_OI = mask0_OI.clone()
    can_regrow_OI = ~mask0_OI
    can_prune_OI = mask0_OI.clone()
    active_O = r_O.abs() > config.threshold
    rows_O = torch.arange(O, device=dev)
    group_I = torch.arange(I, device=dev) // pattern.m if pattern.kind == "nm" else None
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)

    for _ in range(config.max_cycles):
        if not bool(active_O.any()):
            break
        pos_O1 = (r_O > 0)[:, None]
        # regrow: a pruned weight whose contribution has r's sign without overshooting past -r,
        # the largest |c|/Var^p first
        toward_OI = torch.where(pos_O1, contrib_OI > 0, contrib_OI < 0)
        regrow_ok_OI = can_regrow_OI & toward_OI & (contrib_OI.abs() < 2 * r_O.abs()[:, None])
        key_OI = torch.where(regrow_ok_OI, torch.where(pos_O1, rank_OI, -rank_OI), -inf)
        j_O = key_OI.argmax(1)
        has_j_O = regrow_ok_OI.any(1)
        c_j_O = contrib_OI[rows_O, j_O]
        # prune: the lowest-Wanda kept weight whose removal, with the regrowth, leaves |r| smaller;
        # one pushing r toward 0 (unstructured) or one of the regrown weight's group (N:M)
        after_OI = (r_O - c_j_O)[:, None] + contrib_OI
        prune_ok_OI = can_prune_OI & (after_OI.abs() < r_O.abs()[:, None])
        if group_I is not None:
            prune_ok_OI &= group_I[None, :] == group_I[j_O][:, None]
        else:
            prune_ok_OI &= ~toward_OI & (contrib_OI != 0)
        k_O = torch.where(prune_ok_OI, wanda_OI, inf).argmin(1)
        has_k_O = prune_ok_OI.any(1)
        r_after_O = r_O - c_j_O + contrib_OI[rows_O, k_O]
        accept_O = active_O & has_j_O & has_k_O & (r_after_O.abs() < r_O.abs())
        if config.same_sign:
            accept_O &= torch.sign(r_after_O) == sign0_O
        rows = rows_O[accept_O]
        j, k = j_O[accept_O], k_O[accept_O]
        kept_OI[rows, j] = True
        kept_OI[rows, k] = False
        can_regrow_OI[rows, j] = False
        can_prune_OI[rows, k] = False
        r_O = torch.where(accept_O, r_after_O, r_O)
        active_O = accept_O & (r_O.abs() > config.threshold)

    check_pattern(kept_OI, pattern, name)
    return kept_OI, W_OI.to(dense_OI.dtype)
