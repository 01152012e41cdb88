"""Weight sparsity: which weights a layer keeps.

- :mod:`.patterns`: unstructured (per row or layer), N:M and block patterns, the masks that keep
  the highest scores, and validators (:func:`check_pattern`);
- :mod:`.linear`: :class:`SparseLinear` (a mask buffer, a masked forward) put into a model by
  :func:`sparsify` and taken out by :func:`densify`;
- :mod:`.prune` (+ :mod:`.calibration`, :mod:`.sparsegpt`, :mod:`.dsnot`): one-shot pruning of a
  trained model, layer by layer on calibration batches (magnitude, Wanda, SparseGPT; DSnoT's
  training-free mask repair);
- :mod:`.training` and :mod:`.dynamic`: sparse training from scratch (STE, SR-STE and progressive
  schedules for N:M; RigL and SET drop-and-grow; Sparse Architecture Divergence);
- :mod:`.export`: packed N:M safetensors files restored bit-exactly, and 2:4 semi-structured
  weights on CUDA.
"""

from sparseroute.weights.calibration import find_blocks

from sparseroute.weights.dynamic import (
    DynamicSparseLinear,
    TrackedSparseLinear,
    erk_densities,
    layer_densities,
    sad_record,
    sparse_summary,
)
from sparseroute.weights.export import (
    PackedFileError,
    load_packed,
    load_packed_into,
    save_packed,
    to_semi_structured,
)
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
from sparseroute.weights.prune import (
    PRUNERS,
    REPAIRS,
    PruneReport,
    layer_reconstruction_error,
    prune,
    wanda_scores,
)
from sparseroute.weights.training import (
    SPARSE_METHODS,
    NMSparseLinear,
    SparseTraining,
    SparseTrainingConfig,
    sparsify_for_training,
)

__all__ = [
    "SPARSE_METHODS",
    "DynamicSparseLinear",
    "NMSparseLinear",
    "SparseTraining",
    "SparseTrainingConfig",
    "TrackedSparseLinear",
    "erk_densities",
    "layer_densities",
    "sad_record",
    "save_packed",
    "sparse_summary",
    "sparsify_for_training",
    "PRUNERS",
    "REPAIRS",
    "PackedFileError",
    "Pattern",
    "PruneReport",
    "SparseLinear",
    "check_pattern",
    "densify",
    "find_blocks",
    "layer_reconstruction_error",
    "load_packed",
    "load_packed_into",
    "mask_from_scores",
    "masks_of",
    "model_sparsity",
    "nm_mask",
    "parse_pattern",
    "pattern_violations",
    "prune",
    "satisfies",
    "sparse_layers",
    "sparse_targets",
    "sparsify",
    "sparsity_of",
    "to_semi_structured",
    "wanda_scores",
]
