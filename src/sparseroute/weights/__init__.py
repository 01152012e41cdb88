"""Weight sparsity: which weights a layer keeps.

- :mod:`.patterns`: unstructured (per row or layer), N:M and block patterns, the masks that keep
  the highest scores, and validators (:func:`check_pattern`);
- :mod:`.linear`: :class:`SparseLinear` (a mask buffer, a masked forward) put into a model by
  :func:`sparsify` and taken out by :func:`densify`.
"""

from sparseroute.weights.linear import (
    SparseLinear,
    densify,
    masks_of,
    model_sparsity,
    sparse_layers,
    sparse_targets,
    sparsify,
)
from sparseroute.weights.patterns import (
    Pattern,
    check_pattern,
    mask_from_scores,
    nm_mask,
    parse_pattern,
    pattern_violations,
    satisfies,
    sparsity_of,
)

__all__ = [
    "Pattern",
    "SparseLinear",
    "check_pattern",
    "densify",
    "mask_from_scores",
    "masks_of",
    "model_sparsity",
    "nm_mask",
    "parse_pattern",
    "pattern_violations",
    "satisfies",
    "sparse_layers",
    "sparse_targets",
    "sparsify",
    "sparsity_of",
]
