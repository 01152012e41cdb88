"""The training loop's gradient clipping equals torch's clip_grad_norm_ to the bit."""

from __future__ import annotations

import pytest
import torch

from sparseroute.train.loop import clip_grad_norm


def _params(scale: float, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in [(7, 5), (13,), (3, 4, 2)]]
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=gen)
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: skipped, as by torch
    return params


@pytest.mark.parametrize("scale,max_norm", [(10.0, 1.0), (0.01, 1.0), (1.0, float("inf")), (1.0, 0.0), (float("nan"), 1.0)])
def test_clip_grad_norm_matches_torch(scale, max_norm):
    ours, theirs = _params(scale), _params(scale)
    norm = clip_grad_norm(ours, max_norm)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert torch.equal(norm, want) or (norm.isnan() and want.isnan())
    for a, b in zip(ours, theirs):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad) or (a.grad.isnan().all() and b.grad.isnan().all())


def test_clip_grad_norm_skips_the_multiply_only_when_it_is_one(monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: calls.append(1) or real(*a, **k))
    clip_grad_norm(_params(0.01), 1.0)
    assert calls == []
    clip_grad_norm(_params(10.0), 1.0)
    assert calls == [1]


def test_clip_grad_norm_without_gradients():
    assert float(clip_grad_norm([torch.nn.Parameter(torch.zeros(2))], 1.0)) == 0.0
