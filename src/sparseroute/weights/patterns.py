"""Sparsity patterns of a weight matrix, and the masks that keep the highest-scoring weights.

A weight is ``W_OI`` ([out_features, in_features], as in ``nn.Linear``); a mask is a bool tensor
of the same shape, True where a weight is kept. Patterns:

- ``unstructured``: a share ``sparsity`` of the weights is zero, counted per output row
  (``scope="row"``, Wanda's comparison group) or over the whole layer (``scope="layer"``);
- ``nm``: in every group of ``m`` consecutive input weights of a row, exactly ``n`` are kept (2:4
  is what GPUs accelerate);
- ``block``: the matrix is tiled into ``rows x cols`` blocks and a share ``sparsity`` of whole
  blocks is zero.

Written forms (:func:`parse_pattern`): ``"2:4"``, ``"0.5"`` (per row), ``"0.5/layer"``,
``"block4x4:0.5"``. Legend: O output features, I input features, G groups of m.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("unstructured", "nm", "block")
SCOPES = ("row", "layer")


@dataclass(frozen=True, kw_only=True)
class Pattern:
    """Which weights of a matrix may be non-zero. See the module docstring for the kinds."""

    kind: str
    sparsity: float = 0.0
    n: int = 0
    m: int = 0
    scope: str = "row"
    block: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"pattern kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.kind == "nm":
            for name in ("n", "m"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"N:M pattern: {name} must be an int >= 1; got {v!r}")
            if self.n >= self.m:
                raise ValueError(f"N:M pattern: n must be < m (n kept of every m); got n={self.n}, m={self.m}")
            object.__setattr__(self, "sparsity", 1.0 - self.n / self.m)
        else:
            s = self.sparsity
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s < 1.0:
                raise ValueError(f"sparsity must be a number in (0, 1) (the share of zero weights); got {s!r}")
            object.__setattr__(self, "sparsity", float(s))
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {self.scope!r}")
        if self.kind == "block":
            b = tuple(self.block)
            if len(b) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in b):
                raise ValueError(f"block must be two ints >= 1 (rows, cols); got {self.block!r}")
            object.__setattr__(self, "block", b)

    @property
    def density(self) -> float:
        """The share of weights kept."""
        return 1.0 - self.sparsity

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.block[0]}x{self.block[1]}:{self.sparsity:g}"
        return f"{self.sparsity:g}" + ("" if self.scope == "row" else "/layer")

    def check_shape(self, shape: tuple[int, ...], name: str = "weight") -> None:
        """Raise ValueError when a [O, I] matrix of this shape cannot carry the pattern."""
        if len(shape) != 2:
            raise ValueError(f"{name}: a sparsity pattern applies to a 2-D [out, in] weight; got shape {tuple(shape)}")
        O, I = shape
        if self.kind == "nm" and I % self.m:
            raise ValueError(f"{name}: N:M pattern {self}: m={self.m} must divide the input dimension {I}")
        if self.kind == "block" and (O % self.block[0] or I % self.block[1]):
            raise ValueError(f"{name}: block pattern {self}: block {self.block[0]}x{self.block[1]} must divide the "
                             f"weight's shape {O}x{I}")

    def kept_per_row(self, in_features: int) -> int:
        """Weights kept in a row (row-scoped unstructured and N:M patterns)."""
        if self.kind == "nm":
            return in_features // self.m * self.n
        return in_features - int(round(self.sparsity * in_features))


_NM = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")
_UNSTRUCTURED = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(?:/\s*(row|layer))?\s*")
_BLOCK = re.compile(r"\s*block\s*(\d+)\s*x\s*(\d+)\s*:\s*([0-9]*\.?[0-9]+)\s*")


def parse_pattern(spec: str | float | Pattern) -> Pattern:
    """``"2:4"`` → N:M; ``"0.5"`` or ``0.5`` → 50% unstructured per row; ``"0.5/layer"`` → per
    layer; ``"block4x4:0.5"`` → half of the 4x4 blocks zero. A Pattern passes through."""
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Pattern(kind="unstructured", sparsity=float(spec))
    if not isinstance(spec, str):
        raise ValueError(f"pattern must be a string like 2:4, 0.5, 0.5/layer or block4x4:0.5; got {spec!r}")
    if m := _NM.fullmatch(spec):
        return Pattern(kind="nm", n=int(m.group(1)), m=int(m.group(2)))
    if m := _UNSTRUCTURED.fullmatch(spec):
        return Pattern(kind="unstructured", sparsity=float(m.group(1)), scope=m.group(2) or "row")
    if m := _BLOCK.fullmatch(spec):
        return Pattern(kind="block", sparsity=float(m.group(3)), block=(int(m.group(1)), int(m.group(2))))
    raise ValueError(f"pattern: expected N:M (e.g. 2:4), a sparsity in (0, 1) (e.g. 0.5 or 0.5/layer) or "
                     f"blockRxC:S (e.g. block4x4:0.5); got {spec!r}")


def _topk_mask(scores: Tensor, k: int, dim: int = -1) -> Tensor:
    """True at the k highest scores along ``dim`` (ties: the lower index wins, deterministically)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= scores.shape[dim]:
        return torch.ones_like(mask)
    # a stable descending sort makes the choice among equal scores independent of the backend
    idx = torch.sort(scores, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    return mask.scatter_(dim, idx, True)


def nm_mask(scores_OI: Tensor, n: int, m: int) -> Tensor:
    """Keep the n highest scores in each group of m consecutive inputs of a row."""
    O, I = scores_OI.shape
    return _topk_mask(scores_OI.reshape(O, I // m, m), n).reshape(O, I)


def mask_from_scores(scores_OI: Tensor, pattern: Pattern | str, name: str = "weight") -> Tensor:
    """The bool mask of ``pattern`` that keeps the highest ``scores_OI`` (e.g. |W| for magnitude
    pruning, |W|·‖X_j‖ for Wanda). Exactly the pattern's count is kept in every comparison group."""
    pattern = parse_pattern(pattern)
    pattern.check_shape(tuple(scores_OI.shape), name)
    scores_OI = scores_OI.detach().float()
    O, I = scores_OI.shape
    if pattern.kind == "nm":
        return nm_mask(scores_OI, pattern.n, pattern.m)
    if pattern.kind == "unstructured":
        if pattern.scope == "row":
            return _topk_mask(scores_OI, pattern.kept_per_row(I))
        keep = O * I - int(round(pattern.sparsity * O * I))
        return _topk_mask(scores_OI.reshape(-1), keep).reshape(O, I)
    r, c = pattern.block
    blocks = scores_OI.reshape(O // r, r, I // c, c).sum(dim=(1, 3))  # [O/r, I/c]
    nb = blocks.numel()
    keep = nb - int(round(pattern.sparsity * nb))
    kept = _topk_mask(blocks.reshape(-1), keep).reshape(O // r, I // c)
    return kept.repeat_interleave(r, 0).repeat_interleave(c, 1)


def pattern_violations(mask_or_weight: Tensor, pattern: Pattern | str) -> list[str]:
    """What in a mask (bool) or weight (non-zero = kept) breaks ``pattern``; empty when none.

    N:M: no group of m may hold more than n non-zeros (a pruned weight that is also zero by
    chance is fine: "at most n"). Unstructured: at least the pattern's share is zero per row (or
    per layer). Block: every block is all-zero or kept, and at least the share of blocks is zero."""
    pattern = parse_pattern(pattern)
    t = mask_or_weight.detach()
    pattern.check_shape(tuple(t.shape))
    nz = t if t.dtype == torch.bool else t != 0
    O, I = nz.shape
    out: list[str] = []
    if pattern.kind == "nm":
        per_group = nz.reshape(O, I // pattern.m, pattern.m).sum(-1)
        bad = int((per_group > pattern.n).sum())
        if bad:
            out.append(f"{bad} group(s) of {pattern.m} hold more than {pattern.n} non-zeros "
                       f"(at most {int(per_group.max())})")
    elif pattern.kind == "unstructured":
        if pattern.scope == "row":
            allowed = pattern.kept_per_row(I)
            per_row = nz.sum(-1)
            bad = int((per_row > allowed).sum())
            if bad:
                out.append(f"{bad} row(s) keep more than {allowed} of {I} weights (at most {int(per_row.max())})")
        else:
            allowed = O * I - int(round(pattern.sparsity * O * I))
            if int(nz.sum()) > allowed:
                out.append(f"the layer keeps {int(nz.sum())} weights; the pattern allows {allowed}")
    else:
        r, c = pattern.block
        per_block = nz.reshape(O // r, r, I // c, c).sum(dim=(1, 3))
        partial = int(((per_block > 0) & (per_block < r * c)).sum())
        if partial:
            out.append(f"{partial} block(s) of {r}x{c} are partly zero")
        nb = per_block.numel()
        allowed = nb - int(round(pattern.sparsity * nb))
        if int((per_block > 0).sum()) > allowed:
            out.append(f"{int((per_block > 0).sum())} blocks are non-zero; the pattern allows {allowed}")
    return out


def check_pattern(mask_or_weight: Tensor, pattern: Pattern | str, name: str = "weight") -> None:
    """Raise ValueError naming the tensor and what breaks the pattern (see :func:`pattern_violations`)."""
    bad = pattern_violations(mask_or_weight, pattern)
    if bad:
        raise ValueError(f"{name} does not satisfy pattern {parse_pattern(pattern)}: " + "; ".join(bad))


def satisfies(mask_or_weight: Tensor, pattern: Pattern | str) -> bool:
    """Whether a mask or weight satisfies the pattern."""
    return not pattern_violations(mask_or_weight, pattern)


def sparsity_of(t: Tensor) -> float:
    """The share of zeros (False in a mask) in a tensor."""
    nz = t if t.dtype == torch.bool else t != 0
    return 1.0 - float(nz.sum()) / max(1, nz.numel())

