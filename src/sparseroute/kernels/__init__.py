"""Kernels under the routing families: which library runs each matrix product
(:mod:`~sparseroute.kernels.backend`, :mod:`~sparseroute.kernels.gemm`,
:mod:`~sparseroute.kernels.plan`), the compiled CPU kernels (``csrc/``, built and loaded by
:mod:`~sparseroute.kernels.extension`) and the torch operators over them
(:mod:`~sparseroute.kernels.ops`, ``torch.ops.sparseroute.*``)."""

from __future__ import annotations

import sys

__all__ = ["ensure_built"]


def ensure_built(*, progress: bool = True) -> bool:
    """Build the compiled kernels when they are missing, before any model runs (so that no forward
    stalls on a compiler); where they cannot be built, say why once on stderr and go on without
    them (the pure-PyTorch path). Returns whether they are loaded. Does nothing under
    ``SPARSEROUTE_NO_EXTENSIONS=1``."""
    from sparseroute.kernels import extension

    if extension.load() is not None:
        return True
    if extension.disabled():
        return False
    try:
        extension.build(progress=progress)
    except extension.KernelBuildError as e:
        print(f"sparseroute: warning: the compiled CPU kernels are unavailable ({e}); running on the slower "
              "pure-PyTorch path", file=sys.stderr)
        return False
    return True
