"""BiFormer bi-level routing attention over 2-D grids (``RegionAttention``): against a slow dense
reference with the region mask (outputs and gradients, with and without the local context
enhancement), top_k = all regions equals full attention, the region selection, validation.

Legend: B batch, Hg x Wg grid, D model dim, H heads, Dh head dim, r region side, R regions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sparseroute.attention.region2d import RegionAttention, RegionOptions, region_mask

D, H = 16, 2


def module(r=2, top_k=2, lce=False, seed=0) -> RegionAttention:
    torch.manual_seed(seed)
    m = RegionAttention(D, H, region_size=r, top_k=top_k, lce=lce).double()
    if lce:  # a non-zero bias too
        torch.nn.init.normal_(m.lce.bias)
    return m


def grid(B=2, Hg=4, Wg=6, seed=1) -> torch.Tensor:
    return torch.randn(B, Hg, Wg, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def slow_reference(m: RegionAttention, x: torch.Tensor, region_indices: torch.Tensor) -> torch.Tensor:
    """Dense attention over all Hg·Wg tokens with the region mask, token by token in row-major
    order; the LCE as an explicit 3 x 3 sum over the zero-padded neighbourhood."""
    B, Hg, Wg, _ = x.shape
    Dh = D // H
    r = m.options.region_size
    T = Hg * Wg
    q = m.q(x).view(B, T, H, Dh).transpose(1, 2)
    k = m.k(x).view(B, T, H, Dh).transpose(1, 2)
    v = m.v(x).view(B, T, H, Dh).transpose(1, 2)
    mask = region_mask(region_indices, Hg, Wg, r)  # [B, H, T, T]
    scores = (q @ k.transpose(-1, -2)) / Dh**0.5
    y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # [B, H, T, Dh]
    y = y.transpose(1, 2).reshape(B, Hg, Wg, D)
    if m.lce is not None:
        vg = m.v(x)  # [B, Hg, Wg, D], channel c = head c // Dh, dim c % Dh
        vp = F.pad(vg, (0, 0, 1, 1, 1, 1))
        w = m.lce.weight.view(D, 3, 3)
        conv = torch.zeros_like(vg) + m.lce.bias
        for di in range(3):
            for dj in range(3):
                conv = conv + vp[:, di:di + Hg, dj:dj + Wg] * w[:, di, dj]
        y = y + conv
    return m.o(y)


@pytest.mark.parametrize("Hg,Wg,r,top_k", [(4, 6, 2, 2), (6, 6, 3, 1), (4, 4, 2, 3), (2, 4, 2, 1)])
@pytest.mark.parametrize("lce", [False, True])
def test_matches_slow_reference_outputs_and_gradients(Hg, Wg, r, top_k, lce):
    m = module(r=r, top_k=top_k, lce=lce)
    x = grid(Hg=Hg, Wg=Wg).requires_grad_()
    y, info = m(x)
    R = (Hg // r) * (Wg // r)
    assert y.shape == x.shape
    assert info["region_indices"].shape == (2, H, R, min(top_k, R))
    assert info["regions"] == (Hg // r, Wg // r) and info["region_size"] == r
    assert info["density"] == min(top_k, R) / R
    x2 = x.detach().requires_grad_()
    ref = slow_reference(m, x2, info["region_indices"])
    assert_close(y, ref)
    w = torch.randn_like(y)
    params = [p for p in m.parameters()]
    g1 = torch.autograd.grad((y * w).sum(), [x] + params)
    g2 = torch.autograd.grad((ref * w).sum(), [x2] + params)
    for a, b in zip(g1, g2):
        assert_close(a, b)


def test_region_selection_is_top_k_of_the_pooled_adjacency():
    r, top_k = 2, 2
    m = module(r=r, top_k=top_k)
    x = grid(Hg=4, Wg=6)
    _, info = m(x)
    B, Hg, Wg, _ = x.shape
    Dh = D // H
    q = m.q(x).view(B, Hg, Wg, H, Dh)
    k = m.k(x).view(B, Hg, Wg, H, Dh)
    regions = [(i, j) for i in range(Hg // r) for j in range(Wg // r)]

    def pooled(t, b, h, i, j):
        return t[b, i * r:(i + 1) * r, j * r:(j + 1) * r, h].reshape(-1, Dh).mean(0)

    for b in range(B):
        for h in range(H):
            qr = torch.stack([pooled(q, b, h, i, j) for i, j in regions])
            kr = torch.stack([pooled(k, b, h, i, j) for i, j in regions])
            want = (qr @ kr.T).topk(top_k, dim=-1).indices
            assert torch.equal(info["region_indices"][b, h].sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("top_k", [6, 50])
@pytest.mark.parametrize("lce", [False, True])
def test_all_regions_is_full_attention(top_k, lce):
    m = module(r=2, top_k=top_k, lce=lce)
    x = grid(Hg=4, Wg=6)
    y, info = m(x)
    assert info["density"] == 1.0
    B, Hg, Wg, _ = x.shape
    Dh = D // H
    q, k, v = (p(x).view(B, Hg * Wg, H, Dh).transpose(1, 2) for p in (m.q, m.k, m.v))
    full = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Hg, Wg, D)
    if lce:
        vg = m.v(x).permute(0, 3, 1, 2)
        full = full + F.conv2d(vg, m.lce.weight, m.lce.bias, padding=1, groups=D).permute(0, 2, 3, 1)
    assert_close(y, m.o(full))


def test_sparse_selection_differs_from_full_attention():
    m = module(r=2, top_k=1)
    x = grid(Hg=4, Wg=6)
    y, _ = m(x)
    full, _ = module(r=2, top_k=6)(x)
    assert not torch.allclose(y, full)


@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 4, 7), (2, 3, 3)])
def test_grid_not_a_multiple_of_the_region_names_region_size(shape):
    m = module(r=2)
    with pytest.raises(ValueError, match="region_size"):
        m(torch.randn(*shape, D, dtype=torch.float64))


@pytest.mark.parametrize(
    "field,value", [("region_size", 0), ("top_k", 0), ("top_k", -2), ("lce", 1), ("region_size", 1.5)]
)
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RegionOptions(**{field: value})
    with pytest.raises(ValueError, match=field):
        RegionAttention(D, H, **{field: value})


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="n_heads"):
        RegionAttention(10, 3)
    with pytest.raises(ValueError, match="x must be"):
        module()(torch.randn(2, 4, D, dtype=torch.float64))
