"""Stacked expert weights. Legend: E experts, D model dim, F expert hidden, S routed rows.

``w_in`` is [E, D, F] (non-gated activations) or [E, D, 2F] for SwiGLU, whose first F columns
are the gate and the last F the up projection; ``w_out`` is [E, F, D]. Row-major inputs times
these give ``x_SD @ w_in[e]`` without transposes, which is the layout ``F.grouped_mm`` wants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _swiglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rowdot(a_NF: Tensor, b_NF: Tensor, scratch_NF: Tensor) -> Tensor:
    """Row-wise dot products [N] through a scratch buffer (faster than a batched [1, F] @ [F, 1]
    matmul on CPU, and no fresh [N, F] temporary)."""
    return torch.mul(a_NF, b_NF, out=scratch_NF).sum(dim=-1)


def _swiglu_forward(h_N2F: Tensor, w_N1: Tensor, out_NF: Tensor) -> Tensor:
    gate, up = h_N2F.chunk(2, dim=-1)
    silu = F.silu(gate)
    torch.mul(silu, up, out=out_NF).mul_(w_N1)
    return silu


def _swiglu_backward(h_N2F: Tensor, silu: Tensor, g_NF: Tensor, w_N1: Tensor, out_N2F: Tensor, scratch_NF: Tensor) -> Tensor:
    """Gradients through a = silu(gate) * up scaled by w, given g = dL/d(a·w) (overwritten) and
    the saved silu(gate): dL/dh into ``out_N2F`` ([gate | up] halves), dL/dw returned."""
    gate, up = h_N2F.chunk(2, dim=-1)
    F_ = g_NF.shape[-1]
    g_up = torch.mul(g_NF, silu, out=out_N2F[:, F_:])  # g·silu, scaled by w below
    grad_w = _rowdot(g_up, up, scratch_NF)  # <g, silu·up>
    g_NF.mul_(w_N1).mul_(up)  # g·w·up
    torch.ops.aten.silu_backward.grad_input(g_NF, gate, grad_input=out_N2F[:, :F_])
    g_up.mul_(w_N1)
    return grad_w


def _elementwise(fn: Callable[[Tensor], Tensor], grad: Callable[..., Tensor]):
    def forward(h: Tensor, w_N1: Tensor, out: Tensor) -> Tensor:
        a = fn(h)
        torch.mul(a, w_N1, out=out)
        return a

    def backward(h: Tensor, a: Tensor, g: Tensor, w_N1: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
        grad_w = _rowdot(g, a, scratch)
        grad(g.mul_(w_N1), h, grad_input=out)
        return grad_w

    return forward, backward


@dataclass(frozen=True)
class Activation:
    """An expert activation on the w_in output, with a hand-written pair for the fused executor:
    ``forward(h, w, out) -> saved`` writes act(h)·w into ``out`` and returns what the backward
    needs;
    ``backward(h, saved, g, w, out, scratch) -> dL/dw`` writes dL/dh into ``out`` for the output
    act(h)·w, where ``g`` is dL/d(act(h)·w) (it is overwritten), ``w`` the [N, 1] routing weights
    and ``scratch`` an [N, F] buffer it may use. Writing into caller-owned buffers lets the
    executor reuse a few buffers across experts instead of allocating fresh ones per expert."""

    fn: Callable[[Tensor], Tensor]
    forward: Callable[[Tensor, Tensor, Tensor], Tensor]
    backward: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
    gated: bool


def _act(fn, grad) -> Activation:
    return Activation(fn, *_elementwise(fn, grad), gated=False)


ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation(_swiglu, _swiglu_forward, _swiglu_backward, gated=True),
    "gelu": _act(F.gelu, torch.ops.aten.gelu_backward.grad_input),
    "silu": _act(F.silu, torch.ops.aten.silu_backward.grad_input),
    "relu": _act(F.relu, lambda g, h, grad_input: torch.ops.aten.threshold_backward.grad_input(g, h, 0, grad_input=grad_input)),
}


def expert_flops_per_row(d_model: int, d_ff: int, activation: str) -> int:
    """FLOPs (2 per multiply-add, matmuls only) of one expert MLP on one row."""
    width_in = (2 if ACTIVATIONS[activation].gated else 1) * d_ff
    return 2 * d_model * width_in + 2 * d_ff * d_model


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}")


class Experts(nn.Module):
    """E independent MLP experts ``x -> act(x @ w_in[e]) @ w_out[e]`` with stacked weights."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "swiglu"):
        super().__init__()
        check_activation(activation)
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.num_experts, self.d_model, self.d_ff, self.activation = num_experts, d_model, d_ff, activation
        self.activation_fn = ACTIVATIONS[activation]
        self.act = self.activation_fn.fn
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, (2 if self.gated else 1) * d_ff))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.d_model**-0.5)
        nn.init.normal_(self.w_out, std=self.d_ff**-0.5)

    @property
    def gated(self) -> bool:
        return ACTIVATIONS[self.activation].gated

    def expert(self, e: int, x_ND: Tensor) -> Tensor:
        """Apply expert ``e`` to rows ``x_ND`` (the plain, per-expert path)."""
        return self.act(x_ND @ self.w_in[e]) @ self.w_out[e]

    def flops_per_row(self) -> int:
        """Multiply-adds ×2 of one expert on one row (matmuls only)."""
        return expert_flops_per_row(self.d_model, self.d_ff, self.activation)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"


class SharedExpert(nn.Module):
    """A dense MLP every token uses, optionally scaled by sigmoid(w_g · x) (Qwen2-MoE)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", gate: bool = False):
        super().__init__()
        self.mlp = Experts(1, d_model, d_ff, activation)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        y = self.mlp.expert(0, x_TD)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x_TD)) * y
        return y
