"""Which library runs the CPU matrix products: ``aten`` (torch's matmul) or ``onednn``.

torch's CPU matmul goes to MKL. On CPUs that MKL does not recognise as Intel's (AMD's EPYC among
them) it runs its AVX2 code even where the CPU has AVX-512; oneDNN, which torch also ships, picks
its kernels from the CPU's feature flags. On Intel CPUs both run AVX-512 code, and MKL is at
least as fast for these products. docs/RESULTS.md has the measurements on both kinds of CPU.

Backends (:func:`set_backend`, :func:`use_backend` for a block, or the ``SPARSEROUTE_GEMM``
environment variable, read once):

  auto     oneDNN on x86-64 CPUs other than Intel's where torch has it, else ATen (the default)
  aten     torch's own matmul (MKL or whatever BLAS torch was built with)
  onednn   oneDNN (an error where this torch lacks it)

:mod:`sparseroute.kernels.gemm` runs the routers' and the LM's products on the resolved backend;
:mod:`sparseroute.kernels.plan` decides, from it, where each product of the expert kernel runs.
The two libraries sum in different orders, so their results differ in the last bits; with one
backend and one thread count, results are reproducible.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator

import torch

__all__ = ["BACKENDS", "MIN_DIM", "onednn_available", "set_backend", "use_backend", "get_backend", "resolved_backend"]

BACKENDS = ("auto", "aten", "onednn")
#: products with a dimension below this run on ATen (oneDNN's per-call set-up costs more than it saves)
MIN_DIM = 4
_ENV = "SPARSEROUTE_GEMM"
_state: dict[str, str] = {}


def onednn_available() -> bool:
    """Whether this torch was built with oneDNN (``torch.backends.mkldnn``)."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    return bool(mkldnn is not None and mkldnn.is_available())


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown GEMM backend {name!r}; known: {list(BACKENDS)}")
    if name == "onednn" and not onednn_available():
        raise ValueError(f"{source}: GEMM backend 'onednn' asked for, but this torch build has no oneDNN")
    return name


def set_backend(name: str) -> None:
    """Use backend ``name`` (one of :data:`BACKENDS`) from now on, in this process."""
    _state["backend"] = _check(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, use backend ``name``; the previous one afterwards."""
    before = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = before


def get_backend() -> str:
    """The backend as set (``auto`` unless :func:`set_backend` or ``SPARSEROUTE_GEMM`` said otherwise)."""
    if "backend" not in _state:
        _state["backend"] = _check(os.environ.get(_ENV, "auto") or "auto", f"${_ENV}")
    return _state["backend"]


@torch.compiler.assume_constant_result
def _auto() -> str:
    """What ``auto`` means on this machine (a constant for torch.compile): oneDNN where MKL would
    not run its best code (x86-64 CPUs that are not Intel's), else ATen."""
    from sparseroute.kernels.cpuinfo import cpu_vendor

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "onednn" if x86 and cpu_vendor() != "GenuineIntel" and onednn_available() else "aten"


def resolved_backend() -> str:
    """``aten`` or ``onednn``: what the backend means on this machine."""
    name = get_backend()
    return _auto() if name == "auto" else name
