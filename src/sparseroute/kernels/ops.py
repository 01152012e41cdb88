"""The compiled CPU kernels as torch operators (``torch.ops.sparseroute.*``).

Each is a ``torch.library`` custom op with a fake implementation (shapes only, so that
``torch.compile`` traces through it), an autograd formula and a FLOP formula (so that
``torch.utils.flop_counter.FlopCounterMode`` counts it like the ATen products it replaces):

  sparseroute::mm(a, b)                     a @ b on oneDNN's matmul (the routers' and the LM's
                                            float32 products, :mod:`sparseroute.kernels.gemm`)
  sparseroute::softmax_topk(logits, k, renormalize) -> (probs, idx, w)
                                            the softmax routers' decision in one pass per token
  sparseroute::block_attention(q, k, v, idx, key_bias, block_size, scale) -> (out, lse)
                                            block-sparse causal attention over a normalised
                                            selection (:mod:`sparseroute.attention`), its backward
                                            ``sparseroute::block_attention_backward``
  sparseroute::expert_mlp(x, indices, weights, w_in, w_out, activation, threads, backends)
                                            the expert MLP of a routing, expert-parallel over the
                                            threads (its first output; the others are what its
                                            backward, ``sparseroute::expert_mlp_backward``, reads)

Legend: T tokens, D model dim, E experts, K slots per token, F expert hidden, H the width of the
up projection (2F for SwiGLU, else F), S routed (token, slot) pairs, R rows of the saved
activations (S, plus padding rows where products run on oneDNN).

The ops run the compiled module (:mod:`sparseroute.kernels.extension`); without it, ``mm`` runs
torch's oneDNN linear op where this torch has it (else ``torch.mm``), and the callers of the
other two take their pure-PyTorch paths instead (:func:`available`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from sparseroute.kernels import codes, extension, plan

__all__ = ["available", "block_attention", "onednn_mm", "onednn_mm_is_direct", "softmax_topk", "expert_mlp"]


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the compiled kernels are loaded (built before; :func:`sparseroute.kernels.extension.build`)."""
    return extension.load() is not None


def _module():
    module = extension.load()
    if module is None:
        raise RuntimeError(f"sparseroute's compiled kernels are unavailable: {extension.unavailable_reason()}")
    return module


@torch.compiler.assume_constant_result
def _threads() -> int:
    return torch.get_num_threads()


# -- mm --------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def onednn_mm_is_direct() -> bool:
    """Whether ``sparseroute::mm`` calls oneDNN's matmul primitive itself (the compiled kernels are
    loaded and it runs on this CPU in float32) rather than torch's oneDNN linear op."""
    module = extension.load()
    return module is not None and bool(module.onednn_usable())


def _linear_pointwise():
    """torch's oneDNN linear op where this torch has it (a private op: feature-checked), else None."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return getattr(mkldnn, "_linear_pointwise", None) if mkldnn is not None else None
    except (AttributeError, RuntimeError):
        return None


@torch.library.custom_op("sparseroute::mm", mutates_args=())
def _mm(a: Tensor, b: Tensor) -> Tensor:
    if onednn_mm_is_direct():
        out = a.new_empty(a.shape[0], b.shape[1])
        _module().onednn_mm(a, b, out)
        return out
    linear = _linear_pointwise()
    if linear is not None and torch.backends.mkldnn.is_available():
        return linear(a, b.t(), None, "none", [], None)
    return torch.mm(a, b)


@_mm.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


@register_flop_formula(torch.ops.sparseroute.mm)
def _mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def onednn_mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b on oneDNN for 2-D float32 CPU tensors (each dense or the transpose of a dense
    matrix), without autograd (:class:`sparseroute.kernels.gemm.Linear` adds it)."""
    return torch.ops.sparseroute.mm(a, b)


# -- softmax top-k ---------------------------------------------------------------------------------


@torch.library.custom_op("sparseroute::softmax_topk", mutates_args=())
def _softmax_topk(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    probs, idx, w = _module().softmax_topk_forward(logits, k, renormalize)
    return probs, idx, w


@_softmax_topk.register_fake
def _(logits, k, renormalize):
    T = logits.shape[0]
    return torch.empty_like(logits), logits.new_empty(T, k, dtype=torch.int64), logits.new_empty(T, k)


@torch.library.custom_op("sparseroute::softmax_topk_backward", mutates_args=())
def _softmax_topk_backward(grad_probs: Tensor, grad_w: Tensor, probs: Tensor, idx: Tensor, w: Tensor,
                           renormalize: bool) -> Tensor:
    return _module().softmax_topk_backward(grad_probs, grad_w, probs, idx, w, renormalize)


@_softmax_topk_backward.register_fake
def _(grad_probs, grad_w, probs, idx, w, renormalize):
    return torch.empty_like(probs)


def _softmax_topk_setup(ctx, inputs, output):
    probs, idx, w = output
    ctx.mark_non_differentiable(idx)
    ctx.set_materialize_grads(False)  # no [T, K] of zeros for the indices' (or an unused output's) gradient
    ctx.save_for_backward(probs, idx, w)
    ctx.renormalize = inputs[2]


def _softmax_topk_grad(ctx, g_probs, _g_idx, g_w):
    probs, idx, w = ctx.saved_tensors
    if g_probs is None and g_w is None:
        return None, None, None
    g_probs = torch.zeros_like(probs) if g_probs is None else g_probs
    g_w = torch.zeros_like(w) if g_w is None else g_w
    return torch.ops.sparseroute.softmax_topk_backward(g_probs, g_w, probs, idx, w, ctx.renormalize), None, None


_softmax_topk.register_autograd(_softmax_topk_grad, setup_context=_softmax_topk_setup)


@register_flop_formula([torch.ops.sparseroute.softmax_topk, torch.ops.sparseroute.softmax_topk_backward])
def _softmax_topk_flops(*args, out_shape=None, **kwargs) -> int:
    """No matrix product: FlopCounterMode counts matrix products only (as for aten's softmax)."""
    return 0


def softmax_topk(logits_TE: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(probs_TE, idx_TK, w_TK) of float32/float64 [T, E] CPU logits: the softmax over the
    experts, then the k largest probabilities (the lower expert first among equals), optionally
    renormalised to sum to 1. Needs the compiled kernels (:func:`available`)."""
    return torch.ops.sparseroute.softmax_topk(logits_TE, k, renormalize)


# -- the expert MLP --------------------------------------------------------------------------------


@torch.library.custom_op("sparseroute::expert_mlp", mutates_args=())
def _expert_mlp(x: Tensor, indices: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor, activation: int,
                threads: int, backends: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    module = _module()
    E, F = w_in.shape[0], w_out.shape[1]
    order_S, tok_S, counts = module.sort_by_expert(indices, E)
    counts_E = torch.tensor(counts, dtype=torch.int64)
    w_S = weights.reshape(-1).index_select(0, order_S).to(x.dtype)
    if tok_S.numel() == 0:
        empty = x.new_empty(0, F)
        return (x.new_zeros(x.shape), tok_S, order_S, counts_E, w_S, x.new_empty(0, w_in.shape[2]), empty,
                empty.clone())
    out, h, a, s = module.mlp_forward(x.contiguous(), w_S, w_in.contiguous(), w_out.contiguous(), tok_S, counts,
                                      activation, threads, backends)
    return out, tok_S, order_S, counts_E, w_S, h, a, s


def _saved_rows(ctx, S, activation: int, F: int, like: Tensor):
    gated = activation == codes.activation_code("swiglu")
    return like.new_empty(0 if gated else S, F)


@_expert_mlp.register_fake
def _(x, indices, weights, w_in, w_out, activation, threads, backends):
    ctx = torch.library.get_ctx()
    S, R = ctx.new_dynamic_size(), ctx.new_dynamic_size()  # routed pairs; saved rows (with padding)
    E, H, F = w_in.shape[0], w_in.shape[2], w_out.shape[1]
    long = dict(dtype=torch.int64)
    gated = activation == codes.activation_code("swiglu")
    return (torch.empty_like(x), x.new_empty(S, **long), x.new_empty(S, **long), x.new_empty(E, **long),
            x.new_empty(S), x.new_empty(R, H), x.new_empty(0 if gated else R, F), x.new_empty(0 if gated else R, F))


@torch.library.custom_op("sparseroute::expert_mlp_backward", mutates_args=())
def _expert_mlp_backward(grad: Tensor, x: Tensor, w_S: Tensor, w_in: Tensor, w_out: Tensor, tok_S: Tensor,
                         counts_E: Tensor, h: Tensor, a: Tensor, s: Tensor, activation: int, threads: int,
                         backends: list[int], needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if tok_S.numel() == 0:
        grads = [torch.zeros_like(t) if need else t.new_empty(0) for t, need in zip((x, w_S, w_in, w_out), needs)]
        return tuple(grads)  # type: ignore[return-value]
    grads = _module().mlp_backward(grad.contiguous(), x.contiguous(), w_S, w_in.contiguous(), w_out.contiguous(),
                                   tok_S, counts_E.tolist(), h, a, s, activation, needs, threads, backends)
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, (x, w_S, w_in, w_out)))  # type: ignore[return-value]


@_expert_mlp_backward.register_fake
def _(grad, x, w_S, w_in, w_out, tok_S, counts_E, h, a, s, activation, threads, backends, needs):
    return tuple(torch.empty_like(t) if need else t.new_empty(0) for t, need in zip((x, w_S, w_in, w_out), needs))


def _expert_mlp_setup(ctx, inputs, output):
    x, indices, weights, w_in, w_out, activation, threads, backends = inputs
    _, tok_S, order_S, counts_E, w_S, h, a, s = output
    ctx.mark_non_differentiable(tok_S, order_S, counts_E, w_S, h, a, s)
    # the saved outputs get no gradient: without this, autograd would fill an [R, H] tensor of
    # zeros for h (and one for each of the others) at every backward
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w_in, w_out, tok_S, order_S, counts_E, w_S, h, a, s)
    ctx.activation, ctx.threads, ctx.backends = activation, threads, backends
    ctx.weights_shape, ctx.weights_dtype = weights.shape, weights.dtype


def _expert_mlp_grad(ctx, grad, *_unused):
    x, w_in, w_out, tok_S, order_S, counts_E, w_S, h, a, s = ctx.saved_tensors
    if grad is None:  # the output did not reach the loss
        return None, None, None, None, None, None, None, None
    need_x, _, need_w, need_in, need_out = ctx.needs_input_grad[:5]
    needs = [bool(need_x), bool(need_w), bool(need_in), bool(need_out)]
    gx, gw_S, g_in, g_out = torch.ops.sparseroute.expert_mlp_backward(
        grad, x, w_S, w_in, w_out, tok_S, counts_E, h, a, s, ctx.activation, ctx.threads, ctx.backends, needs)
    g_weights = None
    if need_w:  # each routed pair's weight gradient back to its (token, slot)
        flat = torch.zeros(ctx.weights_shape.numel(), dtype=ctx.weights_dtype, device=grad.device)
        g_weights = flat.index_put((order_S,), gw_S.to(ctx.weights_dtype)).reshape(ctx.weights_shape)
    return (gx if need_x else None, None, g_weights, g_in if need_in else None, g_out if need_out else None,
            None, None, None)


_expert_mlp.register_autograd(_expert_mlp_grad, setup_context=_expert_mlp_setup)


@register_flop_formula(torch.ops.sparseroute.expert_mlp, get_raw=True)
def _expert_mlp_flops(x, indices, weights, w_in, w_out, *args, out_val=None, **kwargs) -> int:
    """The two products per routed pair: 2·S·D·H (up) + 2·S·F·D (down)."""
    S = out_val[1].shape[0]  # tok_S: the routed pairs
    D, H, F = w_in.shape[1], w_in.shape[2], w_out.shape[1]
    return 2 * S * D * H + 2 * S * F * D


@register_flop_formula(torch.ops.sparseroute.expert_mlp_backward, get_raw=True)
def _expert_mlp_backward_flops(grad, x, w_S, w_in, w_out, tok_S, counts_E, h, a, s, activation, threads, backends,
                               needs, *args, out_val=None, **kwargs) -> int:
    """The backward's products that run: dL/da (2·S·D·F) when any of x, w_S, w_in needs a
    gradient, dL/dx (2·S·H·D), w_in's (2·S·D·H) and w_out's (2·S·F·D) gradients."""
    S = tok_S.shape[0]
    D, H, F = w_in.shape[1], w_in.shape[2], w_out.shape[1]
    need_x, need_w, need_in, need_out = needs
    flops = 2 * S * D * F if (need_x or need_w or need_in) else 0
    flops += 2 * S * H * D if need_x else 0
    flops += 2 * S * D * H if need_in else 0
    flops += 2 * S * F * D if need_out else 0
    return flops


@torch.compiler.assume_constant_result
def _plan_codes(dtype: torch.dtype, D: int, F: int, E: int, K: int, activation: str, threads: int) -> list[int]:
    return plan.expert_plan(dtype, D, F, E, K, activation, threads).codes


def expert_mlp(x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, w_in: Tensor, w_out: Tensor, activation: str,
               *, backends=None) -> Tensor:
    """[T, D]: for each token, the sum over its used slots (index >= 0) of the slot's weight times
    its expert's MLP ``act(x @ w_in[e]) @ w_out[e]`` (SwiGLU: w_in [E, D, 2F], its first F columns
    the gate), with gradients for x, the weights and both weight tensors. Each product runs where
    :func:`sparseroute.kernels.plan.expert_plan` says (``backends``, for measurements: one
    backend name for all products, or one per product). Needs the compiled kernels."""
    act = codes.activation_code(activation)
    threads = _threads()
    if backends is None:
        chosen = _plan_codes(x_TD.dtype, x_TD.shape[1], w_out.shape[1], w_in.shape[0], indices_TK.shape[1], activation,
                             threads)
    else:
        chosen = codes.backend_codes(backends)
    return torch.ops.sparseroute.expert_mlp(x_TD, indices_TK, weights_TK, w_in, w_out, act, threads, chosen)[0]


# -- block-sparse attention ------------------------------------------------------------------------


@torch.library.custom_op("sparseroute::block_attention", mutates_args=())
def _block_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, key_bias: Tensor | None, block_size: int,
                     scale: float) -> tuple[Tensor, Tensor]:
    out, lse = _module().block_attention_forward(q, k, v, idx, key_bias, block_size, scale)
    return out, lse


@_block_attention.register_fake
def _(q, k, v, idx, key_bias, block_size, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3])


@torch.library.custom_op("sparseroute::block_attention_backward", mutates_args=())
def _block_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, key_bias: Tensor | None,
                              out: Tensor, lse: Tensor, block_size: int,
                              scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias = _module().block_attention_backward(grad.contiguous(), q, k, v, idx, key_bias, out, lse,
                                                           block_size, scale)
    return dq, dk, dv, (dbias if dbias is not None else q.new_empty(0))


@_block_attention_backward.register_fake
def _(grad, q, k, v, idx, key_bias, out, lse, block_size, scale):
    dbias = torch.empty_like(key_bias) if key_bias is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _block_attention_setup(ctx, inputs, output):
    q, k, v, idx, key_bias, block_size, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, idx, key_bias, out, lse)
    ctx.block_size, ctx.scale = block_size, scale


def _block_attention_grad(ctx, grad, _grad_lse):
    q, k, v, idx, key_bias, out, lse = ctx.saved_tensors
    dq, dk, dv, dbias = torch.ops.sparseroute.block_attention_backward(
        grad, q, k, v, idx, key_bias, out, lse, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, (dbias if key_bias is not None else None), None, None


_block_attention.register_autograd(_block_attention_grad, setup_context=_block_attention_setup)


def block_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, key_bias: Tensor | None, block_size: int,
                    scale: float) -> Tensor:
    """[B, H, S, Dh]: causal attention of float32/float64 CPU q [B, H, S, Dh] over the blocks of a
    *normalised* selection ``idx`` [B, Hkv, ceil(S / block_size), K]
    (:func:`sparseroute.attention.selection.normalize_block_indices`) of k, v [B, Hkv, S, Dh],
    with an optional additive ``key_bias`` [B, Hkv, S]; differentiable in q, k, v and key_bias.
    Keeps only the output and the per-row log-sum-exp for backward. Needs the compiled kernels."""
    kb = key_bias.contiguous() if key_bias is not None else None
    return torch.ops.sparseroute.block_attention(q.contiguous(), k.contiguous(), v.contiguous(), idx.contiguous(), kb,
                                                 block_size, float(scale))[0]
