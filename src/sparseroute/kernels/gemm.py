"""Which library runs the CPU matrix products of the MoE kernel, the routers and the LM: ``aten``
or ``onednn``.

torch's CPU matmul goes to MKL. On CPUs that MKL does not recognise as Intel's (AMD's EPYC
among them) it runs its AVX2 code even where the CPU has AVX-512: on a 2-core AMD EPYC (Zen 5)
one core gets ~105–110 GFLOP/s in fp32 from it, where the core's peak is ~260. oneDNN, which torch also ships, picks its kernels from the CPU's feature flags and runs
the same products at 170–250 GFLOP/s there (docs/RESULTS.md, run K). On Intel CPUs both run
AVX-512 code.

Backends (``set_backend``, ``use_backend`` for a block, or the ``SPARSEROUTE_GEMM`` environment
variable, read once):

  auto     oneDNN on x86-64 where torch has it, else ATen (the default)
  aten     torch's own matmul (MKL or whatever BLAS torch was built with)
  onednn   oneDNN, an error where torch lacks it: its matmul primitive through the compiled
           kernels (sparseroute.kernels.extension) where they are built and it runs on the CPU
           (float32 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT), else torch's oneDNN linear op
           (``mkldnn::_linear_pointwise``), which copies a transposed left operand first

:func:`linear` and :func:`matmul` take float32 CPU tensors to oneDNN; other dtypes and devices,
products under a Python dispatch mode (FlopCounterMode, torch.compile's fake tensors), and
products with fewer than :data:`MIN_DIM` rows, columns or summed terms (where oneDNN's per-call
set-up costs more than it saves), always run on ATen. The compiled kernel also runs bfloat16 on
oneDNN where oneDNN's bfloat16 matmul runs on the CPU (:func:`kernel_code`); and with the
backend ``onednn``, in float32 on CPUs with AVX-512, it runs the products of small experts
(per-expert matrices that fit in half a core's L2) on its own loops, which read the routed rows
in place (``csrc/row_gemm.h``, docs/moe.md). The two libraries sum in different orders, so their results differ
in the last bits; with one backend and one thread count, results are reproducible.

:func:`linear` and :func:`matmul` are the products with autograd; the compiled MoE kernel takes
the backend as an argument (:func:`kernel_code`).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from sparseroute.kernels import extension

BACKENDS = ("auto", "aten", "onednn")
#: products with a dimension below this run on ATen (oneDNN's set-up costs ~15 µs a call)
MIN_DIM = 4
_ENV = "SPARSEROUTE_GEMM"
_state: dict[str, str] = {}
_matmul: dict[str, Callable[[Tensor, Tensor, Tensor], None] | None] = {}


def onednn_available() -> bool:
    """Whether this torch has oneDNN and its linear op."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


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


def resolved_backend() -> str:
    """``aten`` or ``onednn``: what the backend means on this machine."""
    name = get_backend()
    if name == "auto":
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        return "onednn" if x86 and onednn_available() else "aten"
    return name


def _on_onednn(x: Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """A CPU tensor of one of ``dtypes``, the backend resolved to ``onednn``, outside Python
    dispatch modes (under FlopCounterMode or torch.compile's fake tensors the products stay
    aten.mm, which such modes know)."""
    return (
        x.device.type == "cpu"
        and x.dtype in dtypes
        and resolved_backend() == "onednn"
        and not is_in_torch_dispatch_mode()
    )


def uses_onednn(x: Tensor) -> bool:
    """Whether products with inputs like ``x`` run on oneDNN: float32 on the CPU with the
    backend resolved to ``onednn``, outside Python dispatch modes."""
    return _on_onednn(x, (torch.float32,))


#: dtypes the compiled MoE kernel runs on oneDNN (each where oneDNN's matmul runs on the CPU)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def kernel_code(x: Tensor) -> int:
    """The backend code the compiled kernel takes for inputs like ``x``: 0 ATen, 1 oneDNN. Unlike
    :func:`linear` and :func:`matmul`, the kernel also runs bfloat16 on oneDNN, where oneDNN's
    bfloat16 matmul runs on this CPU (the kernel asks; elsewhere it stays on ATen): there it pads
    each expert's rows as in float32, so that the changing loads of training reuse oneDNN's
    built kernels (torch's own bfloat16 matmul also runs on oneDNN, at the exact shapes)."""
    return int(_on_onednn(x, KERNEL_DTYPES))


def kernel_on_onednn(x: Tensor) -> bool:
    """Whether the compiled MoE kernel's products run on oneDNN for inputs like ``x``: backend
    code 1 (:func:`kernel_code`), the kernels built, and oneDNN's matmul running on this CPU for
    ``x``'s dtype."""
    if not kernel_code(x):
        return False
    kernels = extension.load()
    return kernels is not None and bool(kernels.onednn_usable_for(x))


def _onednn_matmul():
    """oneDNN's matmul through the compiled kernels (``onednn_mm(a, b, out)``), where they are built
    and it runs on this CPU (float32 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT); else None, and the
    products use torch's oneDNN linear op. Decided once per process."""
    if "fn" not in _matmul:
        kernels = extension.load()
        _matmul["fn"] = kernels.onednn_mm if kernels is not None and kernels.onednn_usable() else None
    return _matmul["fn"]


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 2-D float32 CPU tensors: oneDNN unless a dimension is below MIN_DIM. oneDNN's
    matmul takes an operand that is the transpose of a dense matrix as it is and writes into the
    output it is given; torch's oneDNN linear op, the fallback, copies a transposed left operand."""
    if min(a.shape[0], a.shape[1], b.shape[1]) < MIN_DIM:
        return a @ b
    matmul = _onednn_matmul()
    if matmul is None:
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], None)
    out = a.new_empty(a.shape[0], b.shape[1])
    matmul(a, b, out)
    return out


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ w^T on oneDNN, x [N, in], w [out, in], and its backward on oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return _mm(x, w.t())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        g = g.contiguous()  # an expanded (stride-0) gradient, e.g. from .sum()
        gx = _mm(g, w) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            out_f, in_f = g.shape[1], x.shape[1]
            if _onednn_matmul() is not None:
                # oneDNN's matmul sums over N faster into more output rows: a router's [64, 512]
                # gradient at N = 8192 takes 1.5 ms as (x^T g)^T and 2.7 ms as g^T x
                via_x = 16 <= out_f < in_f
            else:
                # the linear op copies a transposed left operand into a dense one: the narrower
                # of g [N, out] and x [N, in] is transposed
                via_x = out_f > in_f
            gw = _mm(x.t(), g).t().contiguous() if via_x else _mm(g.t(), x)
        return gx, gw


def linear(x: Tensor, w: Tensor) -> Tensor:
    """``F.linear(x, w)`` (no bias) on the chosen backend; x [..., in], w [out, in]."""
    if not (uses_onednn(x) and w.dtype == x.dtype and w.device == x.device) or x.numel() == 0:
        return F.linear(x, w)
    if x.dim() == 2:
        return _OneDNNLinear.apply(x, w)
    lead = x.shape[:-1]
    return _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[0])


def matmul(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w`` on the chosen backend; x [..., in], w [in, out]."""
    return linear(x, w.t())


class Linear(nn.Linear):
    """``nn.Linear`` whose product runs on the chosen backend (:func:`linear`); the same
    parameters and state dict."""

    def forward(self, x: Tensor) -> Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias
