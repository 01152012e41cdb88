"""Fast forms of router building blocks equal their plain definitions (values and gradients)."""

import os

import pytest
import torch

from sparseroute.kernels import extension as cpu_kernels
from sparseroute.moe.routers.base import _softmax_topk_kernels, expert_softmax, softmax_topk, topk_of
from sparseroute.routing import expert_load


def _plain_softmax_topk(logits, k, renormalize):
    probs = logits.softmax(dim=-1)
    idx, w = topk_of(probs, k, renormalize)
    return probs, idx, w


def _compiled():
    """The compiled kernels, which the session fixture built: only SPARSEROUTE_NO_EXTENSIONS=1
    skips; a missing module fails with load()'s reason."""
    if os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1":
        pytest.skip("compiled kernels disabled by SPARSEROUTE_NO_EXTENSIONS=1")
    assert cpu_kernels.load() is not None, cpu_kernels.unavailable_reason()


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (1, 1, 1), (37, 8, 2), (300, 8, 1), (300, 64, 8), (50, 5, 5), (600, 16, 3)])
def test_compiled_softmax_topk_matches_the_plain_ops(T, E, k, renormalize, dtype):
    """The compiled softmax top-k gives the plain ops' probabilities, choices and weights, and the
    same gradient through the probabilities (as the balance loss uses them) and the weights."""
    _compiled()
    torch.manual_seed(T + E + k)
    logits = (2 * torch.randn(T, E, dtype=dtype)).requires_grad_()
    ref = logits.detach().clone().requires_grad_()
    assert _softmax_topk_kernels(logits)
    probs, idx, w = softmax_topk(logits, k, renormalize)
    want_p, want_idx, want_w = _plain_softmax_topk(ref, k, renormalize)
    torch.testing.assert_close(probs, want_p)
    assert torch.equal(idx, want_idx) and idx.dtype == torch.int64
    torch.testing.assert_close(w, want_w)
    g_p, g_w = torch.randn(T, E, dtype=dtype), torch.randn(T, k, dtype=dtype)
    ((probs * g_p).sum() + (w * g_w).sum() + probs.mean(dim=0).square().sum()).backward()
    ((want_p * g_p).sum() + (want_w * g_w).sum() + want_p.mean(dim=0).square().sum()).backward()
    torch.testing.assert_close(logits.grad, ref.grad)
    # one output alone: the other's gradient is absent, not zero-filled by autograd
    for pick in (0, 2):
        logits.grad = ref.grad = None
        softmax_topk(logits, k, renormalize)[pick].mul(1.5).sum().backward()
        _plain_softmax_topk(ref, k, renormalize)[pick].mul(1.5).sum().backward()
        torch.testing.assert_close(logits.grad, ref.grad)


@pytest.mark.parametrize("renormalize", [True, False])
def test_compiled_softmax_topk_gradcheck(renormalize):
    _compiled()
    torch.manual_seed(0)
    logits = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: (lambda p, i, w: (p, w))(*softmax_topk(l, 3, renormalize)), (logits,))


def test_compiled_softmax_topk_orders_ties_and_nan():
    """Equal probabilities go to the lower expert index; a NaN logit makes its token's
    probabilities NaN (as the softmax does), and the token still gets k distinct valid experts."""
    _compiled()
    nan = float("nan")
    logits = torch.tensor(
        [[0.0] * 8, [0, 1, 0, 1, 1, 0, 0, 0], [0, 0, 2, 1, 2, 0, 1, 0], [0, nan, 1, 2, 0, 0, 0, 0]]
    )
    probs, idx, w = softmax_topk(logits, 3, True)
    assert idx[:3].tolist() == [[0, 1, 2], [1, 3, 4], [2, 4, 3]]
    assert probs[3].isnan().all() and w[3].isnan().all()
    assert sorted(set(idx[3].tolist())) == sorted(idx[3].tolist()) and all(0 <= int(i) < 8 for i in idx[3])


def test_compiled_softmax_topk_is_used_only_where_it_applies():
    _compiled()
    assert _softmax_topk_kernels(torch.randn(4, 8))
    assert not _softmax_topk_kernels(torch.randn(4, 8, dtype=torch.bfloat16))
    assert not _softmax_topk_kernels(torch.randn(2, 4, 8))
    from torch.utils.flop_counter import FlopCounterMode

    logits = torch.randn(4, 8)
    with FlopCounterMode(display=False):  # under a Python dispatch mode: the same results
        under_mode = softmax_topk(logits, 2, True)
    assert all(torch.equal(a, b) for a, b in zip(under_mode, softmax_topk(logits, 2, True)))
    with pytest.raises(RuntimeError, match="k must be in"):
        cpu_kernels.load().softmax_topk_forward(torch.randn(3, 4), 5, True)


def test_without_built_kernels_softmax_topk_takes_the_plain_ops(tmp_path, monkeypatch):
    """The routers ask for the compiled kernels at every call, and load() never builds: under a
    fresh cache root (nothing built) softmax_topk runs the plain ops, to the same results, and
    no build folder appears."""
    torch.manual_seed(0)
    logits = torch.randn(37, 8, requires_grad=True)
    monkeypatch.setenv("SPARSEROUTE_KERNELS_CACHE", str(tmp_path / "kernels"))
    assert not _softmax_topk_kernels(logits)
    probs, idx, w = softmax_topk(logits, 2, True)
    want_p, want_idx, want_w = _plain_softmax_topk(logits.detach(), 2, True)
    torch.testing.assert_close(probs, want_p)
    torch.testing.assert_close(w, want_w)
    assert torch.equal(idx, want_idx)
    assert not (tmp_path / "kernels").exists()


def test_the_test_module_has_the_same_softmax_topk(testing_kernels):
    """The test module is the shipped sources: its softmax top-k gives the same bits."""
    _compiled()
    logits = torch.randn(300, 16)
    shipped = cpu_kernels.build()  # load() is the test module here (testing_kernels)
    assert shipped is not testing_kernels
    for a, b in zip(shipped.softmax_topk_forward(logits, 3, True), testing_kernels.softmax_topk_forward(logits, 3, True)):
        assert torch.equal(a, b)
