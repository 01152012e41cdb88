"""Finite-difference gradient checks of the hand-written backwards (float64): the fused expert MLP
for every activation, the compiled expert-parallel one (the torch op, every activation, and the
kernel itself with experts cut by the threads' parts), the segment matmul."""

import os

import pytest
import torch

from sparseroute.kernels import codes, ops
from sparseroute.kernels import extension as cpu_kernels
from sparseroute.moe import MoE
from sparseroute.moe.dispatch import KERNEL_ACTIVATIONS, FusedExpertMLP, segment_mm, sort_by_expert
from sparseroute.moe.experts import ACTIVATIONS

needs_kernels = pytest.mark.skipif(os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1",
                                   reason="the compiled kernels are off (SPARSEROUTE_NO_EXTENSIONS=1)")


class _KernelMLP(torch.autograd.Function):
    """The compiled module's expert MLP with given sorted rows (tok_S) and counts, on ATen's
    products (float64): what sparseroute::expert_mlp runs after its sort."""

    @staticmethod
    def forward(ctx, x, w_S, w_in, w_out, tok_S, counts, act):
        module, backends = cpu_kernels.load(), codes.backend_codes("aten")
        threads = torch.get_num_threads()
        out, h, a, s = module.mlp_forward(x, w_S, w_in, w_out, tok_S, list(counts), act, threads, backends)
        ctx.save_for_backward(x, w_S, w_in, w_out, tok_S, h, a, s)
        ctx.counts, ctx.act, ctx.threads, ctx.backends = counts, act, threads, backends
        return out

    @staticmethod
    def backward(ctx, g):
        x, w_S, w_in, w_out, tok_S, h, a, s = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:4]]
        grads = cpu_kernels.load().mlp_backward(g.contiguous(), x, w_S, w_in, w_out, tok_S, list(ctx.counts), h, a, s,
                                                 ctx.act, needs, ctx.threads, ctx.backends)
        return (*grads, None, None, None)


def _expert_mlp_gradcheck(activation: str, function, extra_for):
    torch.manual_seed(0)
    moe = MoE(6, 5, 4, 2, router="topk", activation=activation).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    routing = moe.route(x)
    order_S, tok_S, counts_E = sort_by_expert(routing)
    assert int((counts_E > 0).sum()) >= 2  # the parallel kernel splits the experts over two threads
    w_S = routing.weights.reshape(-1).index_select(0, order_S).detach().double()
    counts = tuple(counts_E.tolist())
    extra = extra_for(moe)
    extra = extra if isinstance(extra, tuple) else (extra,)
    inputs = (
        x.requires_grad_(),
        w_S.requires_grad_(),
        moe.experts.w_in.detach().clone().requires_grad_(),
        moe.experts.w_out.detach().clone().requires_grad_(),
    )
    assert torch.autograd.gradcheck(lambda a, b, c, d: function.apply(a, b, c, d, tok_S, counts, *extra), inputs)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_fused_expert_mlp_gradcheck(activation):
    _expert_mlp_gradcheck(activation, FusedExpertMLP, lambda moe: moe.experts.activation_fn)


@needs_kernels
@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize("activation", sorted(KERNEL_ACTIVATIONS))
def test_expert_mlp_op_gradcheck(threads, activation):
    """sparseroute::expert_mlp through its registered autograd: x, the [T, K] routing weights
    (some slots unused) and both weight tensors."""
    torch.manual_seed(0)
    T, D, F, E, K = 9, 6, 5, 4, 2
    H = 2 * F if activation == "swiglu" else F
    idx = torch.rand(T, E).topk(K, dim=1).indices
    idx[3, 1] = -1
    inputs = (torch.randn(T, D, dtype=torch.float64, requires_grad=True),
              torch.rand(T, K, dtype=torch.float64, requires_grad=True),
              torch.randn(E, D, H, dtype=torch.float64, requires_grad=True),
              torch.randn(E, F, D, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda x, w, a, b: ops.expert_mlp(x, idx, w, a, b, activation), inputs)


@needs_kernels
@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize("counts", [(0, 9, 0, 0), (4, 0, 5, 0), (1, 1, 6, 1)])
@pytest.mark.parametrize("trainable", [(0, 1, 2, 3), (3,), (0,)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_expert_parallel_mlp_gradcheck_experts_cut_by_parts(threads, counts, trainable, activation):
    """The kernel splits the sorted rows into equal parts, one per thread, so a part boundary can
    cut an expert (here: one expert with every row, spanning all parts; a boundary inside or at
    the edge of an expert); the cut expert's weight gradients are summed over its pieces. Also
    with only the down projection (whose gradient needs the recomputed activation alone) or only
    x trainable."""
    torch.manual_seed(1)
    T, D, F, E = 9, 6, 5, len(counts)
    tok_S = torch.randperm(T)
    shapes = [(T, D), (T,), (E, D, (2 if activation == "swiglu" else 1) * F), (E, F, D)]
    inputs = tuple(
        torch.randn(*shape, dtype=torch.float64, requires_grad=i in trainable) for i, shape in enumerate(shapes)
    )
    act = KERNEL_ACTIVATIONS[activation]
    assert torch.autograd.gradcheck(lambda a, b, c, d: _KernelMLP.apply(a, b, c, d, tok_S, counts, act), inputs)


def test_segment_mm_gradcheck_with_empty_group():
    torch.manual_seed(0)
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: segment_mm(a, b, (4, 0, 6)), (x, w))
    out = segment_mm(x, w, (4, 0, 6))
    out.sum().backward()
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))
