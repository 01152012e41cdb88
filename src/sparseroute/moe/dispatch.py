"""Executors: compute the experts a Routing chose, and nothing else.

Legend: T tokens, D model dim, E experts, K slots per token, S routed (token, slot) pairs, F hidden.

Dropless dispatch: the (token, slot) pairs are stably sorted by expert (unused slots, index -1,
sort last and are cut off), per-expert counts give the group offsets, each projection is one
grouped matmul over all experts, and the weighted rows are added back to their tokens with
``index_add_``. Experts that receive nothing cost nothing; variable-count routings (relu,
expert_choice, capacity drops) use the same path.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparseroute.kernels import codes, extension, ops
from sparseroute.moe.experts import Experts
from sparseroute.registry import Registry
from sparseroute.routing import Routing, expert_keys

Executor = Callable[[Tensor, Routing, Experts], Tensor]
EXECUTORS: Registry[Executor] = Registry("dispatch")


def sort_by_expert(routing: Routing) -> tuple[Tensor, Tensor, Tensor]:
    """Return (order_S, token_S, counts_E): flat (token·K + slot) positions of the used slots,
    stably sorted by expert; the token of each; and how many rows each expert gets."""
    E, K = routing.num_experts, routing.indices.shape[1]
    key = expert_keys(routing.indices, E)
    counts = torch.bincount(key, minlength=E + 1)
    order = torch.argsort(key, stable=True)
    used = key.numel() - int(counts[E])
    order_S = order[:used]
    return order_S, torch.div(order_S, K, rounding_mode="floor"), counts[:E]


def run_experts(
    x_TD: Tensor, routing: Routing, experts: Experts, grouped_matmul: Callable[[Tensor, Tensor, Tensor], Tensor]
) -> Tensor:
    """Sort, gather, two grouped matmuls, weighted combine. ``grouped_matmul(x_SI, w_EIO, counts_E)``.

    The routing weight scales the hidden activation before the down projection
    (w · (h @ W_out) = (w · h) @ W_out), which touches S·F instead of S·D numbers.
    """
    order_S, tok_S, counts_E = sort_by_expert(routing)
    if order_S.numel() == 0:
        return x_TD.new_zeros(x_TD.shape)
    x_SD = x_TD.index_select(0, tok_S)
    w_S1 = routing.weights.reshape(-1).index_select(0, order_S).to(x_TD.dtype).unsqueeze(1)
    h_SF = experts.act(grouped_matmul(x_SD, experts.w_in, counts_E)) * w_S1
    y_SD = grouped_matmul(h_SF, experts.w_out, counts_E)
    return x_TD.new_zeros(x_TD.shape).index_add_(0, tok_S, y_SD)


def _grouped_mm_aligned(t: Tensor) -> bool:
    """``F.grouped_mm`` (and its backward) needs 16-byte aligned data and non-unit strides."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((st * size) % 16 == 0 for st in t.stride() if st != 1)


def torch_grouped_mm(x_SI: Tensor, w_EIO: Tensor, counts_E: Tensor) -> Tensor:
    """``F.grouped_mm`` with group offsets from the per-expert counts; :func:`segment_mm` when the
    shapes miss its alignment (e.g. D or F not a multiple of 16 bytes / element size)."""
    if not (_grouped_mm_aligned(x_SI) and _grouped_mm_aligned(w_EIO)):
        return segment_mm(x_SI, w_EIO, counts_E)
    return F.grouped_mm(x_SI, w_EIO, offs=torch.cumsum(counts_E, dim=0).to(torch.int32))


@EXECUTORS.register("grouped")
def grouped_dispatch(x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """One ``F.grouped_mm`` per projection over all experts."""
    return run_experts(x_TD, routing, experts, torch_grouped_mm)


class SegmentMatmul(torch.autograd.Function):
    """y[rows of group e] = x[rows of group e] @ w[e] for contiguous row groups of sizes ``counts``.

    A plain loop of matmuls written into preallocated outputs, with a hand-written backward that
    fills each expert's weight gradient in place (indexing ``w[e]`` under autograd would instead
    materialise a full-size [E, ...] gradient per expert). Experts with no rows get zero gradient.
    """

    @staticmethod
    def forward(ctx, x_SI: Tensor, w_EIO: Tensor, counts: tuple[int, ...]) -> Tensor:
        ctx.save_for_backward(x_SI, w_EIO)
        ctx.counts = counts
        y_SO = x_SI.new_empty(x_SI.shape[0], w_EIO.shape[2])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x_SI[start : start + n], w_EIO[e], out=y_SO[start : start + n])
                start += n
        return y_SO

    @staticmethod
    def backward(ctx, g_SO: Tensor):
        x_SI, w_EIO = ctx.saved_tensors
        g_SO = g_SO.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(x_SI)
        if ctx.needs_input_grad[1]:
            gw = torch.zeros_like(w_EIO)
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            g = g_SO[start : start + n]
            if gx is not None:
                torch.mm(g, w_EIO[e].t(), out=gx[start : start + n])
            if gw is not None:
                torch.mm(x_SI[start : start + n].t(), g, out=gw[e])
            start += n
        return gx, gw, None


def segment_mm(x_SI: Tensor, w_EIO: Tensor, counts_E: Tensor | tuple[int, ...]) -> Tensor:
    """Grouped matmul over contiguous row segments (the portable fallback of ``F.grouped_mm``)."""
    counts = tuple(counts_E.tolist()) if isinstance(counts_E, Tensor) else tuple(int(c) for c in counts_E)
    return SegmentMatmul.apply(x_SI, w_EIO, counts)


@EXECUTORS.register("loop")
def loop_dispatch(x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """The same sort, then one matmul per non-empty expert segment (:func:`segment_mm`)."""
    return run_experts(x_TD, routing, experts, segment_mm)


class FusedExpertMLP(torch.autograd.Function):
    """The whole expert MLP, one expert at a time: gather that expert's rows, up-project,
    activate, scale by the routing weight, down-project, add into the output. Per-expert
    intermediates that are not saved for the backward (gathered rows, down-projected rows,
    gradient rows) live in a few buffers of the largest expert's size, reused from expert to
    expert, so they stay in cache and no [S, D] buffer is ever written; the [S, F]
    pre-activations and weighted activations are kept for the hand-written backward. The CPU
    default; on GPUs the grouped matmul path wins.
    """

    @staticmethod
    def forward(ctx, x_TD, w_S, w_in, w_out, tok_S, counts, activation):
        out_TD = torch.zeros_like(x_TD)
        S, D = tok_S.shape[0], x_TD.shape[1]
        h_SH = x_TD.new_empty(S, w_in.shape[2])
        a_SF = x_TD.new_empty(S, w_out.shape[1])
        most = max(counts)
        x_buf, y_buf = x_TD.new_empty(most, D), x_TD.new_empty(most, D)
        saved = []  # what each expert's activation backward needs (e.g. silu(gate))
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            rows = slice(start, start + n)
            t = tok_S[rows]
            x_e = torch.index_select(x_TD, 0, t, out=x_buf[:n])
            h = torch.mm(x_e, w_in[e], out=h_SH[rows])
            saved.append(activation.forward(h, w_S[rows].unsqueeze(1), a_SF[rows]))
            out_TD.index_add_(0, t, torch.mm(a_SF[rows], w_out[e], out=y_buf[:n]))
            start += n
        ctx.save_for_backward(x_TD, w_S, w_in, w_out, tok_S, h_SH, a_SF, *saved)
        ctx.counts, ctx.activation = counts, activation
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_TD):
        x_TD, w_S, w_in, w_out, tok_S, h_SH, a_SF, *saved = ctx.saved_tensors
        saved_iter = iter(saved)
        need_x, need_w, need_in, need_out = ctx.needs_input_grad[:4]
        g_TD = g_TD.contiguous()
        gx = torch.zeros_like(x_TD) if need_x else None
        gw = torch.zeros_like(w_S) if need_w else None
        # every used expert's slice is overwritten below; zero only the unused ones
        g_in = torch.empty_like(w_in) if need_in else None
        g_out = torch.empty_like(w_out) if need_out else None
        act = ctx.activation
        most, D = max(ctx.counts), x_TD.shape[1]
        g_buf, xd_buf = x_TD.new_empty(most, D), x_TD.new_empty(most, D)
        ga_buf, scratch = a_SF.new_empty(most, a_SF.shape[1]), a_SF.new_empty(most, a_SF.shape[1])
        gh_buf = h_SH.new_empty(most, h_SH.shape[1])
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                for g in (g_in, g_out):
                    if g is not None:
                        g[e].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            t, keep = tok_S[rows], next(saved_iter)
            ge = torch.index_select(g_TD, 0, t, out=g_buf[:n])
            if g_out is not None:
                torch.mm(a_SF[rows].t(), ge, out=g_out[e])
            if not (need_x or need_w or need_in):
                continue
            ga = torch.mm(ge, w_out[e].t(), out=ga_buf[:n])  # dL/d(weighted activation)
            gh = gh_buf[:n]
            gw_rows = act.backward(h_SH[rows], keep, ga, w_S[rows].unsqueeze(1), gh, scratch[:n])
            if gw is not None:
                gw[rows] = gw_rows
            if g_in is not None:
                torch.mm(torch.index_select(x_TD, 0, t, out=xd_buf[:n]).t(), gh, out=g_in[e])
            if gx is not None:
                gx.index_add_(0, t, torch.mm(gh, w_in[e].t(), out=xd_buf[:n]))
        return gx, gw, g_in, g_out, None, None, None


def _fused(x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """Sort, then the per-expert fused MLP as a Python loop (:class:`FusedExpertMLP`)."""
    order_S, tok_S, counts_E = sort_by_expert(routing)
    if order_S.numel() == 0:
        return x_TD.new_zeros(x_TD.shape)
    w_S = routing.weights.reshape(-1).index_select(0, order_S).to(x_TD.dtype)
    return FusedExpertMLP.apply(x_TD, w_S, experts.w_in, experts.w_out, tok_S, tuple(counts_E.tolist()),
                                experts.activation_fn)


@EXECUTORS.register("fused")
def fused_dispatch(x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """Per-expert fused MLP as a Python loop (:class:`FusedExpertMLP`), any activation."""
    return _fused(x_TD, routing, experts)


#: activations the compiled kernel runs, by its code for each
KERNEL_ACTIVATIONS = {name: codes.activation_code(name) for name in codes.ACTIVATIONS}


def _parallel_refusal(experts: Experts, device: torch.device) -> str | None:
    """Why the expert-parallel kernel does not apply to these experts and this input (None: it
    applies; whether it is built is a separate question, :func:`sparseroute.kernels.ops.available`)."""
    if experts.activation not in KERNEL_ACTIVATIONS:
        return f"it runs {', '.join(KERNEL_ACTIVATIONS)} experts (these use {experts.activation!r})"
    if device.type != "cpu":
        return f"it runs on the CPU only (the input is on {device.type})"
    return None


def _parallel(x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """The compiled expert-parallel MLP (``torch.ops.sparseroute.expert_mlp``): the rows sorted by
    expert are cut into one equal part per intra-op thread, each thread runs its part expert by
    expert inside one parallel region, and each product runs where the kernels' plan says
    (:mod:`sparseroute.kernels.plan`). Deterministic for a given thread count and plan; it differs
    from :class:`FusedExpertMLP` by summation order only."""
    return ops.expert_mlp(x_TD, routing.indices, routing.weights, experts.w_in, experts.w_out, experts.activation)


@EXECUTORS.register("parallel")
def parallel_dispatch(x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """Expert-parallel fused MLP on the CPU through the compiled kernel, for experts of every
    activation in :data:`KERNEL_ACTIVATIONS`; a ValueError says why when it does not apply."""
    why = _parallel_refusal(experts, x_TD.device)
    if why is None and not ops.available():
        why = f"the compiled kernel is unavailable ({extension.unavailable_reason()})"
    if why is not None:
        raise ValueError(f"dispatch 'parallel' cannot run here: {why}; use 'fused' or 'auto'")
    return _parallel(x_TD, routing, experts)


_warned_unavailable = False


@EXECUTORS.register("auto")
def auto_dispatch(x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """``grouped`` on CUDA; on the CPU ``parallel`` where it applies, else ``fused``. When only the
    unbuilt compiled kernel stands in the way, a warning says so once (the results are the same up
    to summation order, only slower)."""
    global _warned_unavailable
    if x_TD.device.type == "cuda":
        return grouped_dispatch(x_TD, routing, experts)
    if _parallel_refusal(experts, x_TD.device) is None:
        if ops.available():
            return _parallel(x_TD, routing, experts)
        if not _warned_unavailable:
            _warned_unavailable = True
            warnings.warn(
                "sparseroute: the expert-parallel CPU executor is off: the compiled kernel is unavailable "
                f"({extension.unavailable_reason()}); using 'fused'",
                stacklevel=2,
            )
    return _fused(x_TD, routing, experts)
