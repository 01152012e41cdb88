"""Dense matrix products with autograd on the chosen backend (:mod:`sparseroute.kernels.backend`):
what the routers and the LM's linear layers use.

:func:`linear` and :func:`matmul` take float32 CPU tensors to oneDNN when the backend resolves to
``onednn``, through the custom op ``torch.ops.sparseroute.mm`` (oneDNN's matmul primitive through
the compiled kernels where they are built and it runs on this CPU; else torch's oneDNN linear op;
see :mod:`sparseroute.kernels.ops`). Being a registered op with a fake implementation and a FLOP
formula, it is traced by ``torch.compile`` and counted by ``FlopCounterMode`` like ``aten.mm``.
Other dtypes and devices, and products with fewer than :data:`MIN_DIM` rows, columns or summed
terms, run on ATen (``F.linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseroute.kernels import ops
from sparseroute.kernels.backend import (
    BACKENDS,
    MIN_DIM,
    get_backend,
    onednn_available,
    resolved_backend,
    set_backend,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "MIN_DIM",
    "Linear",
    "get_backend",
    "linear",
    "matmul",
    "onednn_available",
    "resolved_backend",
    "set_backend",
    "use_backend",
    "uses_onednn",
]


def uses_onednn(x: Tensor) -> bool:
    """Whether products with inputs like ``x`` run on oneDNN: float32 on the CPU with the backend
    resolved to ``onednn``."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and resolved_backend() == "onednn"


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 2-D float32 CPU tensors: oneDNN unless a dimension is below MIN_DIM."""
    if min(a.shape[0], a.shape[1], b.shape[1]) < MIN_DIM:
        return a @ b
    return ops.onednn_mm(a, b)


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
            if ops.onednn_mm_is_direct():
                # oneDNN's matmul sums over N faster into more output rows: for a narrow output (a
                # router's [E, D] gradient) (x^T g)^T beats g^T x
                via_x = 16 <= out_f < in_f
            else:
                # torch's oneDNN linear op copies a transposed left operand into a dense one: the
                # narrower of g [N, out] and x [N, in] is transposed
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
