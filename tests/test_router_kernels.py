"""Fast forms of router building blocks equal their plain definitions (values and gradients)."""

import pytest
import torch

from sparseroute.moe.routers.base import expert_softmax
from sparseroute.routing import expert_load


@pytest.mark.parametrize("E", [1, 2, 8, 15, 16, 64])
@pytest.mark.parametrize("T", [0, 1, 37])
def test_expert_softmax_matches_softmax(T, E):
    torch.manual_seed(E * 100 + T)
    logits = (3 * torch.randn(T, E, dtype=torch.float64)).requires_grad_()
    ref = logits.detach().clone().requires_grad_()
    out, want = expert_softmax(logits), ref.softmax(dim=-1)
    assert out.shape == (T, E)
    torch.testing.assert_close(out, want)
    g = torch.randn(T, E, dtype=torch.float64)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(logits.grad, ref.grad)


def test_expert_softmax_small_E_takes_the_transposed_form():
    out = expert_softmax(torch.randn(5, 8))
    assert not out.is_contiguous() and out.t().is_contiguous()  # the dim-0 form was used


@pytest.mark.parametrize("shape", [(0, 2), (1, 1), (50, 3)])
def test_expert_load_matches_a_masked_bincount(shape):
    torch.manual_seed(shape[0])
    E = 5
    idx = torch.randint(-1, E, shape)
    flat = idx.reshape(-1)
    want = torch.bincount(flat[flat >= 0], minlength=E)
    assert torch.equal(expert_load(idx, E), want)
    assert expert_load(idx, E).dtype == torch.int64
