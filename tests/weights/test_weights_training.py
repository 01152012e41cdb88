"""Sparse training from scratch: N:M masks with STE / SR-STE / progressive schedules, RigL and SET
drop-and-grow, ERK densities, SAD, and the configuration's refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseroute.train.config import TrainConfig, resolve_run
from sparseroute.weights import check_pattern, nm_mask
from sparseroute.weights.dynamic import (
    DynamicSparseLinear,
    drop_fraction,
    dynamic_update,
    erk_densities,
    is_update_step,
    layer_densities,
    mask_divergence,
    sad_record,
    sparsify_dynamic,
)
from sparseroute.weights.training import (
    NMSparseLinear,
    SparseTraining,
    SparseTrainingConfig,
    fast_nm_mask,
    mask_decay_value,
    sparsify_for_training,
    structure_n,
    structure_stages,
)

LAM = 2e-4


def nm_layer(out_f=8, in_f=16, seed=0, **options) -> NMSparseLinear:
    torch.manual_seed(seed)
    return NMSparseLinear.from_linear(nn.Linear(in_f, out_f, bias=True), pattern=options.pop("pattern", "2:4"),
                                      **options)


# -- N:M masks, STE and SR-STE ----------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (5, 8), (2, 16)])
def test_fast_nm_mask_is_nm_mask_ties_included(n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    scores = torch.randint(0, 3, (12, 4 * m), generator=g).float()  # many ties
    assert torch.equal(fast_nm_mask(scores, n, m), nm_mask(scores, n, m))
    scores = torch.randn(16, 2 * m, generator=g).abs()
    assert torch.equal(fast_nm_mask(scores, n, m), nm_mask(scores, n, m))


@pytest.mark.parametrize("method", ["sr-ste", "ste"])
def test_gradient_to_the_dense_weight(method):
    layer = nm_layer(method=method, lam=LAM)
    x = torch.randn(5, 16)
    r = torch.randn(5, 8)
    M = nm_mask(layer.weight.detach().abs(), 2, 4)
    # the gradient w.r.t. the masked weight, by hand from a plain masked product
    w_masked = (layer.weight.detach() * M).requires_grad_()
    ref = F.linear(x, w_masked, layer.bias.detach())
    (ref * r).sum().backward()
    g = w_masked.grad
    y = layer(x)
    (y * r).sum().backward()
    assert torch.equal(y, ref)
    assert torch.equal(layer.mask, M)
    W = layer.weight.detach()
    expected = g + LAM * (1 - M.float()) * W if method == "sr-ste" else g
    assert torch.equal(layer.weight.grad, expected)
    if method == "sr-ste":  # the pruned weights get the decay term; it is not zero
        assert not torch.equal(layer.weight.grad, g)


def test_forward_mask_is_nm_and_recomputed_when_weights_change():
    layer = nm_layer(out_f=6, in_f=24, pattern="2:8")
    x = torch.randn(3, 24)
    layer(x)
    check_pattern(layer.mask, "2:8")
    before = layer.mask.clone()
    with torch.no_grad():  # reverse each group's magnitudes: the top 2 become the bottom 2
        layer.weight.copy_(layer.weight.reshape(6, 3, 8).flip(-1).reshape(6, 24))
    y = layer(x)
    check_pattern(layer.mask, "2:8")
    assert torch.equal(layer.mask, nm_mask(layer.weight.detach().abs(), 2, 8))
    assert not torch.equal(layer.mask, before)
    assert torch.equal(y, F.linear(x, layer.weight * layer.mask, layer.bias))
    layer.eval()  # eval: the mask of the current weights as well
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 2.0, 24))
        y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight * nm_mask(layer.weight.abs(), 2, 8), layer.bias))


def test_a_refreshed_mask_serves_one_training_forward_only():
    layer = nm_layer()
    x = torch.randn(3, 16)
    layer.refresh_mask()  # what the controller does after an optimizer step
    layer(x)
    with torch.no_grad():  # as an optimizer step would
        layer.weight.copy_(layer.weight.reshape(8, 4, 4).flip(-1).reshape(8, 16))
    y = layer(x)
    assert torch.equal(layer.mask, nm_mask(layer.weight.detach().abs(), 2, 4))
    assert torch.equal(y, F.linear(x, layer.weight * layer.mask, layer.bias))


def test_state_dict_holds_the_masks_and_loads_into_a_fresh_layer():
    layer = nm_layer()
    layer(torch.randn(2, 16))
    sd = layer.state_dict()
    assert {"weight", "bias", "mask", "mask_start", "mask_logged"} <= set(sd)
    other = nm_layer(seed=1)
    other.load_state_dict(sd)
    assert torch.equal(other.mask, layer.mask) and torch.equal(other.weight, layer.weight)


# -- progressive schedules --------------------------------------------------------------------------


def test_mask_decay_dense_at_start_hard_at_the_end():
    assert mask_decay_value(0, 100, 0.5) == 1.0
    assert mask_decay_value(25, 100, 0.5) == 0.5
    assert mask_decay_value(50, 100, 0.5) == 0.0 and mask_decay_value(99, 100, 0.5) == 0.0
    layer = nm_layer(method="progressive", kind="mask", decay_fraction=0.5)
    x = torch.randn(4, 16)
    layer.set_step(0, 100)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # dense forward at t=0
    layer.set_step(30, 100)
    M = nm_mask(layer.weight.detach().abs(), 2, 4)
    D = torch.where(M, 1.0, mask_decay_value(30, 100, 0.5))
    assert torch.equal(layer(x), F.linear(x, layer.weight * D, layer.bias))
    layer.set_step(60, 100)
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight * M, layer.bias))  # hard N:M
    check_pattern(layer.mask, "2:4")
    layer.set_step(10, 100)  # eval: hard N:M whatever the step
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight * M, layer.bias))


def test_structure_decay_stages_end_at_nm_and_each_step_satisfies_its_stage():
    assert [str(p) for p in structure_stages(2, 8)] == ["7:8", "6:8", "5:8", "4:8", "3:8", "2:8"]
    total, frac = 120, 0.5
    seq = [structure_n(s, total, 2, 8, frac) for s in range(total)]
    assert seq[0] == 7 and seq[-1] == 2 and all(a >= b for a, b in zip(seq, seq[1:]))
    # the stages before 2:8 share the first 60 steps equally; 2:8 from step 60 on
    assert [seq.count(k) for k in (7, 6, 5, 4, 3)] == [12] * 5 and seq.index(2) == 60
    layer = nm_layer(out_f=4, in_f=32, pattern="2:8", method="progressive", kind="structure", decay_fraction=frac)
    check_pattern(layer.mask_start, "7:8")  # training starts at the first stage
    x = torch.randn(2, 32)
    for step in (0, 13, 30, 59, 60, 119):
        layer.set_step(step, total)
        layer(x)
        n = structure_n(step, total, 2, 8, frac)
        check_pattern(layer.mask, f"{n}:8")
        assert int(layer.mask.sum()) == 4 * 4 * n  # exactly n of every 8
    assert structure_n(5, 10, 3, 4, 0.5) == 3  # 3:4 has no stage before it


def test_controller_refreshes_the_mask_after_the_step_and_the_next_forward_agrees():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    cfg = SparseTrainingConfig(sparsity="2:4", method="progressive", kind="structure", decay_fraction=0.5)
    # the default filter keeps every linear of a Sequential ("0", "2")
    assert sparsify_for_training(model, cfg) == ["0", "2"]
    ctl = SparseTraining(model, cfg, total_steps=4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(8, 16)
    for step in range(4):
        ctl.begin_step(step)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ctl.after_optimizer_step(step, opt)
        for mod in (model[0], model[2]):  # the buffer is the mask of the new weights at the next stage
            n = structure_n(step + 1, 4, 2, 4, 0.5)
            assert torch.equal(mod.mask, nm_mask(mod.weight.detach().abs(), n, 4))
        rec = ctl.log_record()
        assert rec["pattern"] == f"{structure_n(step + 1, 4, 2, 4, 0.5)}:4"
    assert rec["pattern"] == "2:4" and rec["sparsity"] == 0.5
    assert 0 < rec["sad_total"] <= 1


# -- RigL and SET -----------------------------------------------------------------------------------


def dynamic_model(seed=0, sparsity=0.75, densities="uniform"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    sparsify_dynamic(model, sparsity, densities=densities, seed=seed)
    return model


def one_step(model, opt, x, capture: bool):
    for mod in (model[0], model[2]):
        mod.capture_grad = capture
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_rigl_keeps_nnz_grows_by_gradient_and_resets_adam_state():
    model = dynamic_model()
    layers = [model[0], model[2]]
    nnz = [int(m.mask.sum()) for m in layers]
    assert nnz == [round(0.25 * 16 * 24), round(0.25 * 24 * 8)]
    assert all(bool((m.weight[~m.mask] == 0).all()) for m in layers)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    x = torch.randn(32, 16)
    for i in range(4):
        one_step(model, opt, x, capture=True)
        grads = [m.dense_grad.clone() for m in layers]
        masks = [m.mask.clone() for m in layers]
        weights = [m.weight.detach().clone() for m in layers]
        f = drop_fraction(2 * (i + 1), 20, alpha=0.3, end_fraction=0.75)
        changed = dynamic_update(layers, opt, 2 * (i + 1), 20, growth="gradient", seed=0)
        assert changed > 0
        for m, g, old, w, n0 in zip(layers, grads, masks, weights, nnz):
            k = int(f * n0)
            assert int(m.mask.sum()) == n0  # nnz constant
            grown, dropped = m.mask & ~old, old & ~m.mask
            assert int(grown.sum()) == int(dropped.sum()) == k
            # grown: the k largest |dense gradient| among the previously inactive positions
            cand = torch.where(old, -1.0, g.abs())
            assert torch.equal(grown, torch.zeros_like(old).reshape(-1).index_fill(
                0, torch.sort(cand.reshape(-1), descending=True, stable=True).indices[:k], True).reshape(old.shape))
            # dropped: the k smallest |W| among the active ones
            assert float(w.abs()[dropped].max()) <= float(w.abs()[old & m.mask].min())
            assert bool((m.weight[grown] == 0).all()) and bool((m.weight[dropped] == 0).all())
            st = opt.state[m.weight]
            assert bool((st["exp_avg"][grown | dropped] == 0).all())
            assert bool((st["exp_avg_sq"][grown | dropped] == 0).all())
            assert m.dense_grad is None
        one_step(model, opt, x, capture=False)  # weights outside the mask stay exactly 0
        assert all(bool((m.weight[~m.mask] == 0).all()) for m in layers)


def test_set_grows_at_random_deterministically_for_a_seed():
    def run(seed):
        model = dynamic_model(seed=0)
        layers = [model[0], model[2]]
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
        before = [int(m.mask.sum()) for m in layers]
        for step in (2, 4):
            one_step(model, opt, x, capture=False)
            old = [m.mask.clone() for m in layers]
            dynamic_update(layers, opt, step, 20, growth="random", seed=seed)
            for m, o in zip(layers, old):
                grown = m.mask & ~o
                assert bool((m.weight[grown] == 0).all())
                assert bool((opt.state[m.weight]["exp_avg"][grown] == 0).all())
        assert [int(m.mask.sum()) for m in layers] == before
        return [m.mask.clone() for m in layers]

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_drop_fraction_and_update_steps():
    assert drop_fraction(0, 100) == pytest.approx(0.3)
    assert drop_fraction(75 / 2, 100) == pytest.approx(0.15)
    assert drop_fraction(75, 100) == 0.0
    steps = [s for s in range(1, 1001) if is_update_step(s, 1000)]
    assert steps == list(range(100, 750, 100))


def test_erk_densities_average_to_the_target():
    shapes = [(1024, 256), (256, 1024), (256, 256), (8, 8), (3, 256)]
    sizes = [o * i for o, i in shapes]
    for density in (0.1, 0.3, 0.6):
        d = erk_densities(shapes, density)
        assert sum(x * s for x, s in zip(d, sizes)) / sum(sizes) == pytest.approx(density, rel=1e-12)
        assert all(0 < x <= 1 for x in d)
        assert d[3] == 1.0  # the small layer is kept dense, the others make up for it
        assert d[2] > d[0]  # fewer weights per input+output: denser
    assert layer_densities(shapes, 0.9, "uniform") == [pytest.approx(0.1)] * len(shapes)
    with pytest.raises(ValueError, match="densities"):
        layer_densities(shapes, 0.9, "random")


def test_erk_masks_of_a_model_keep_the_target_share():
    model = dynamic_model(sparsity=0.8, densities="erk")
    kept = sum(int(m.mask.sum()) for m in (model[0], model[2]))
    assert kept == pytest.approx(0.2 * (16 * 24 + 24 * 8), abs=2)


def test_sad_counts_flipped_bits_since_the_last_record_and_the_start():
    model = dynamic_model()
    a, b = model[0], model[2]
    total = a.mask.numel() + b.mask.numel()
    assert sad_record(model) == {"sad": 0.0, "sad_total": 0.0, "sparsity": pytest.approx(0.75, abs=0.01)}
    a.mask.view(-1)[:3] ^= True
    rec = sad_record(model)
    assert rec["sad"] == rec["sad_total"] == 3 / total
    b.mask.view(-1)[:2] ^= True
    rec = sad_record(model)
    assert rec["sad"] == 2 / total and rec["sad_total"] == 5 / total
    assert mask_divergence(model, "logged") == 0.0


# -- configuration ----------------------------------------------------------------------------------


def test_config_refuses_mismatched_patterns_and_options():
    with pytest.raises(ValueError, match="sparse_method=sr-ste trains N:M.*0.9 is unstructured"):
        SparseTrainingConfig(sparsity="0.9")
    with pytest.raises(ValueError, match="sparse_method=rigl trains unstructured.*2:4 is N:M"):
        SparseTrainingConfig(sparsity="2:4", method="rigl")
    with pytest.raises(ValueError, match="block patterns"):
        SparseTrainingConfig(sparsity="block4x4:0.5", method="set")
    with pytest.raises(ValueError, match="sparse_method must be one of .*rigl"):
        SparseTrainingConfig(sparsity="2:4", method="magic")
    with pytest.raises(ValueError, match="sparse_options.alpha applies to sparse_method rigl, set, not sr-ste"):
        SparseTrainingConfig(sparsity="2:4", alpha=0.5)
    with pytest.raises(ValueError, match="sparse_options: unknown option.*lambda.*allowed: lam, filter"):
        SparseTrainingConfig.from_settings("2:4", "sr-ste", {"lambda": 1e-4})
    for bad, match in (({"alpha": 2}, "sparse_options.alpha must be a number in"),
                       ({"update_every": 0}, "sparse_options.update_every must be an int"),
                       ({"densities": "er"}, "sparse_options.densities must be one of erk, uniform"),
                       ({"filter": "("}, "sparse_options.filter.*regular expression")):
        with pytest.raises(ValueError, match=match):
            SparseTrainingConfig.from_settings(0.9, "rigl", bad)
    with pytest.raises(ValueError, match="sparse_options.kind must be one of mask, structure"):
        SparseTrainingConfig.from_settings("2:4", "progressive", {"kind": "both"})
    assert SparseTrainingConfig.from_settings(0.9, "set", {}).sparsity == "0.9"
    assert SparseTrainingConfig.from_settings(" 2 : 4 ", "ste", None).sparsity == "2:4"


def test_train_config_sparse_fields():
    assert "sparsity" not in TrainConfig().to_dict()  # a dense run stores what it did before
    with pytest.raises(ValueError, match="sparse_method='rigl' needs sparsity"):
        TrainConfig(sparse_method="rigl")
    tc = TrainConfig(sparsity=0.9, sparse_method="rigl", sparse_options={"update_every": 5})
    assert tc.sparsity == "0.9" and tc.sparse_training().update_every == 5
    assert tc.to_dict()["sparse_options"] == {"update_every": 5}
    with pytest.raises(ValueError, match="train: sparse_method=ste trains N:M"):
        resolve_run({"train": {"sparsity": 0.5, "sparse_method": "ste"}})
    cfg = resolve_run({"train": {"sparsity": "2:4", "sparse_options": {"lam": 1e-3}}})
    assert cfg.to_dict()["train"]["sparse_method"] == "sr-ste"
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_rigl_captures_the_dense_gradient_only_on_request_and_in_training():
    layer = DynamicSparseLinear.from_linear(nn.Linear(8, 4), mask=torch.rand(4, 8) < 0.5)
    x = torch.randn(2, 8)
    layer(x).sum().backward()
    assert layer.dense_grad is None
    layer.capture_grad = True
    layer.eval()
    layer(x).sum().backward()
    assert layer.dense_grad is None
    layer.train()
    layer(x).sum().backward()
    # the gradient w.r.t. the masked weight: dense, also where the mask is off
    assert torch.equal(layer.dense_grad, torch.ones(4, 1) * x.sum(0))
