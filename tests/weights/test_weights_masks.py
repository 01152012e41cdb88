"""Sparsity patterns and SparseLinear: masks keep exact counts, errors name the field, the masked
layer equals a dense product with the masked weight (outputs and gradients), state dicts and
densify round-trip."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseroute.kernels import gemm
from sparseroute.weights import (
    SparseLinear,
    check_pattern,
    densify,
    mask_from_scores,
    parse_pattern,
    satisfies,
    sparse_layers,
    sparsify,
)



def _scores(O: int, I: int, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: the count must still be exact
        return torch.randint(0, 3, (O, I), generator=g).float()
    return torch.rand(O, I, generator=g)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_masks_keep_exactly_n_of_m_highest(spec, ties):
    n, m = map(int, spec.split(":"))
    scores = _scores(6, 24, 1, ties)
    mask = mask_from_scores(scores, spec)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert satisfies(mask, spec)
    groups_mask = mask.reshape(6, -1, m)
    assert (groups_mask.sum(-1) == n).all()
    groups = scores.reshape(6, -1, m)
    lowest_kept = torch.where(groups_mask, groups, torch.inf).amin(-1)
    highest_pruned = torch.where(groups_mask, -torch.inf, groups).amax(-1)
    assert (lowest_kept >= highest_pruned).all()


@pytest.mark.parametrize("ties", [False, True])
def test_row_mask_keeps_exact_count_per_row(ties):
    scores = _scores(5, 21, 2, ties)
    mask = mask_from_scores(scores, "0.5")
    kept = 21 - round(0.5 * 21)
    assert (mask.sum(1) == kept).all()
    assert satisfies(mask, "0.5")
    lowest_kept = torch.where(mask, scores, torch.inf).amin(1)
    highest_pruned = torch.where(mask, -torch.inf, scores).amax(1)
    assert (lowest_kept >= highest_pruned).all()


@pytest.mark.parametrize("ties", [False, True])
def test_layer_mask_keeps_exact_count_over_the_layer(ties):
    scores = _scores(7, 13, 3, ties)
    mask = mask_from_scores(scores, "0.7/layer")
    assert int(mask.sum()) == 7 * 13 - round(0.7 * 7 * 13)
    assert satisfies(mask, "0.7/layer")
    assert float(scores[mask].min()) >= float(scores[~mask].max())
    # per row it may differ: the layer scope does not promise a per-row count
    assert parse_pattern("0.7/layer").scope == "layer"


def test_block_mask_keeps_whole_blocks_exactly():
    scores = _scores(8, 16, 4, False)
    mask = mask_from_scores(scores, "block2x4:0.5")
    per_block = mask.reshape(4, 2, 4, 4).sum(dim=(1, 3))
    assert ((per_block == 0) | (per_block == 8)).all()
    assert int((per_block > 0).sum()) == 16 - round(0.5 * 16)
    assert satisfies(mask, "block2x4:0.5")
    block_scores = scores.reshape(4, 2, 4, 4).sum(dim=(1, 3))
    assert float(block_scores[per_block > 0].min()) >= float(block_scores[per_block == 0].max())


@pytest.mark.parametrize("spec, field", [
    ("4:4", "n must be < m"),
    ("5:4", "n must be < m"),
    ("0:4", "n must be an int"),
    ("0", "sparsity"),
    ("1", "sparsity"),
    ("1.5", "sparsity"),
    ("0.5/column", "pattern"),
    ("garbage", "pattern"),
    ("block0x4:0.5", "block"),
    ("block2x2:1.5", "sparsity"),
])
def test_parse_errors_name_the_field(spec, field):
    with pytest.raises(ValueError, match=field):
        parse_pattern(spec)


def test_pattern_fields_are_validated():
    from sparseroute.weights import Pattern

    with pytest.raises(ValueError, match="kind"):
        Pattern(kind="diagonal", sparsity=0.5)
    with pytest.raises(ValueError, match="scope"):
        Pattern(kind="unstructured", sparsity=0.5, scope="column")
    with pytest.raises(ValueError, match="sparsity"):
        parse_pattern(-0.1)


def test_m_not_dividing_input_dim_fails_at_sparsify_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 4))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"2: .*m=4 must divide the input dimension 6"):
        sparsify(model, "2:4")
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("source", [nn.Linear, gemm.Linear])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_equals_dense_product_with_masked_weight(source, bias):
    torch.manual_seed(0)
    lin = source(32, 24, bias=bias)
    ref_w = lin.weight.detach().clone().requires_grad_(True)
    ref_b = lin.bias.detach().clone().requires_grad_(True) if bias else None
    sl = SparseLinear.from_linear(lin, pattern="2:4")
    mask = sl.mask.clone()
    assert satisfies(mask, "2:4") and not mask.all()

    x = torch.randn(3, 5, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = sl(x)
    y_ref = F.linear(x_ref, ref_w * mask, ref_b)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl.weight.grad, ref_w.grad, rtol=1e-5, atol=1e-5)
    assert not sl.weight.grad[~mask].any()  # pruned weights get no gradient through the mask
    if bias:
        torch.testing.assert_close(sl.bias.grad, ref_b.grad, rtol=1e-5, atol=1e-5)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_dense_state_dict_loads_into_sparsified_model():
    torch.manual_seed(0)
    dense = _mlp()
    sparse = _mlp()
    sparsify(sparse, "0.5")
    masks = {n: m.mask.clone() for n, m in sparse_layers(sparse)}
    sparse.load_state_dict(dense.state_dict(), strict=True)
    for name, mod in sparse_layers(sparse):
        assert torch.equal(mod.mask, masks[name])  # a dense checkpoint keeps the current masks
        assert torch.equal(mod.weight, dense.get_submodule(name).weight)
    # and the sparse state dict round-trips with its masks
    again = _mlp()
    sparsify(again, "0.5")
    again.load_state_dict(sparse.state_dict(), strict=True)
    for name, mod in sparse_layers(again):
        assert torch.equal(mod.mask, masks[name])


def test_densify_gives_bit_identical_outputs_mlp_and_lm():
    from sparseroute.models import TransformerLM, preset

    torch.manual_seed(0)
    mlp = _mlp()
    sparsify(mlp, "2:4")
    x = torch.randn(4, 16)
    y_sparse = mlp(x)
    assert densify(mlp) == ["0", "2"]
    assert type(mlp[0]) is nn.Linear
    assert torch.equal(mlp(x), y_sparse)

    lm = TransformerLM(preset("tiny", n_layers=1)).eval()
    names = sparsify(lm, "2:4")
    assert names and all(".head" not in n for n in names)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        logits_sparse = lm(ids).logits
        densify(lm)
        assert all(type(lm.get_submodule(n)) is gemm.Linear for n in names)
        assert torch.equal(lm(ids).logits, logits_sparse)


def test_check_pattern_raises_on_violated_weight():
    w = torch.randn(4, 8)
    w[:, 1::4] = 0.0
    with pytest.raises(ValueError, match=r"w does not satisfy pattern 2:4: 8 group\(s\)"):
        check_pattern(w, "2:4", "w")  # three of four non-zero in each of the 8 groups
    w[:, 2::4] = 0.0
    check_pattern(w, "2:4", "w")
    with pytest.raises(ValueError, match="row"):
        check_pattern(torch.ones(3, 10), "0.5")
    partial = torch.zeros(4, 8)
    partial[0, 0] = 1.0
    with pytest.raises(ValueError, match="partly zero"):
        check_pattern(partial, "block2x2:0.5")
    with pytest.raises(ValueError, match="layer keeps"):
        check_pattern(torch.ones(4, 4), "0.5/layer")
