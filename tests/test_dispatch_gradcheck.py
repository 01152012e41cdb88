"""Finite-difference gradient checks of the hand-written backwards (float64): the fused expert MLP
for every activation, the compiled expert-parallel one (SwiGLU), the segment matmul."""

import pytest
import torch

from sparseroute.moe import MoE, cpu_kernels
from sparseroute.moe.dispatch import ExpertParallelMLP, FusedExpertMLP, segment_mm, sort_by_expert
from sparseroute.moe.experts import ACTIVATIONS


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
    inputs = (
        x.requires_grad_(),
        w_S.requires_grad_(),
        moe.experts.w_in.detach().clone().requires_grad_(),
        moe.experts.w_out.detach().clone().requires_grad_(),
    )
    assert torch.autograd.gradcheck(lambda a, b, c, d: function.apply(a, b, c, d, tok_S, counts, extra), inputs)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_fused_expert_mlp_gradcheck(activation):
    _expert_mlp_gradcheck(activation, FusedExpertMLP, lambda moe: moe.experts.activation_fn)


def test_expert_parallel_mlp_gradcheck():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _expert_mlp_gradcheck("swiglu", ExpertParallelMLP, lambda moe: cpu_kernels.load())
    finally:
        torch.set_num_threads(before)


def test_segment_mm_gradcheck_with_empty_group():
    torch.manual_seed(0)
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: segment_mm(a, b, (4, 0, 6)), (x, w))
    out = segment_mm(x, w, (4, 0, 6))
    out.sum().backward()
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))
