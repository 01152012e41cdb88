"""One-shot pruning: Wanda's scores against a direct computation, SparseGPT's reconstruction
against Wanda's, DSnoT never raising its objective, the layer-by-layer engine feeding each block
the outputs of the pruned blocks before it, and prune() end to end on the LM and a tiny BERT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseroute.weights import SparseLinear, mask_from_scores, satisfies, sparse_layers
from sparseroute.weights.calibration import LinearStats, find_blocks, layerwise
from sparseroute.weights.dsnot import DSnoTConfig, dsnot_objective, dsnot_repair
from sparseroute.weights.prune import PRUNERS, REPAIRS, layer_reconstruction_error, prune, wanda_scores
from sparseroute.weights.sparsegpt import SparseGPTConfig, sparsegpt_prune



class ToyBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        y = torch.tanh(self.fc(x))
        return (y if scale is None else y * scale), None


class Toy(nn.Module):
    """Two blocks in a plain list attribute (not a known path): found only through blocks=."""

    def __init__(self, d: int = 8, n: int = 2) -> None:
        super().__init__()
        self.stack = nn.ModuleList(ToyBlock(d) for _ in range(n))
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.stack:
            x = b(x)[0]
        return self.out(x)


def _correlated_inputs(T: int, I: int, seed: int) -> torch.Tensor:
    """Full-rank inputs with correlated channels and non-zero means (what makes the methods differ)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(I, I, generator=g) / I**0.5 + torch.eye(I)
    return torch.randn(T, I, generator=g) @ mix + torch.randn(I, generator=g)


def _rel_error(W, W_hat, X):
    return float(((W - W_hat).double() @ X.double().T).square().sum() / (W.double() @ X.double().T).square().sum())


# --- Wanda -----------------------------------------------------------------------------------


def test_wanda_scores_equal_direct_computation_and_prune_uses_them():
    torch.manual_seed(0)
    model = Toy(d=12, n=1)
    batches = [torch.randn(2, 5, 12), torch.randn(3, 4, 12)]
    X = torch.cat([b.reshape(-1, 12) for b in batches])
    W = model.stack[0].fc.weight.detach().clone()
    norms = X.double().square().sum(0).sqrt()  # ‖X_j‖₂ over all calibration tokens
    direct = W.double().abs() * norms[None, :]

    seen = {}
    layerwise(model, batches, lambda _b, _m, st: seen.update(st), blocks=[model.stack[0]])
    (name, (lin, stats)), = seen.items()
    assert name == "stack.0.fc" and stats.n == X.shape[0]
    torch.testing.assert_close(stats.sq_norm_I.sqrt(), norms)
    torch.testing.assert_close(wanda_scores(W, stats.sq_norm_I).double(), direct, rtol=1e-6, atol=1e-6)

    report = prune(model, "wanda", "0.5", batches, blocks=["stack.0"])
    assert torch.equal(model.stack[0].fc.mask, mask_from_scores(direct, "0.5"))
    assert report.calib_tokens == X.shape[0] and [r.name for r in report.layers] == ["stack.0.fc"]
    assert isinstance(model.out, nn.Linear) and not isinstance(model.out, SparseLinear)  # outside the blocks


# --- SparseGPT -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["0.5", "2:4", "0.5/layer"])
def test_sparsegpt_reconstructs_better_than_wanda(spec):
    torch.manual_seed(1)
    O, I, T = 16, 32, 256  # more tokens than columns: XᵀX has full rank
    X = _correlated_inputs(T, I, seed=2)
    W = torch.randn(O, I)
    stats = LinearStats(I, hessian=True)
    stats.add(X)
    mask_s, W_s = sparsegpt_prune(W, stats.hessian(), spec)
    mask_w = mask_from_scores(wanda_scores(W, stats.sq_norm_I), spec)
    assert satisfies(mask_s, spec) and satisfies(W_s, spec) and satisfies(mask_w, spec)
    assert int(mask_s.sum()) == int(mask_w.sum())  # the same number of weights kept
    assert not W_s[~mask_s].any()

    err_s = layer_reconstruction_error(W, W_s, stats.xtx_II)
    err_w = layer_reconstruction_error(W, W * mask_w, stats.xtx_II)
    # the Hessian form equals ‖(W − Ŵ)Xᵀ‖² computed from the raw inputs
    assert err_s == pytest.approx(float(((W - W_s).double() @ X.double().T).square().sum()), rel=1e-4)
    assert err_w == pytest.approx(float(((W - W * mask_w).double() @ X.double().T).square().sum()), rel=1e-4)
    assert err_s < 0.8 * err_w


def test_sparsegpt_lazy_blocks_match_column_by_column_updates():
    """For N:M the mask is chosen at each group from the fully updated weights, so the block size
    (how lazily later columns are updated) changes nothing but rounding."""
    torch.manual_seed(13)
    X = _correlated_inputs(256, 32, seed=14)
    W = torch.randn(12, 32)
    stats = LinearStats(32, hessian=True)
    stats.add(X)
    mask_a, W_a = sparsegpt_prune(W, stats.hessian(), "2:4", SparseGPTConfig(blocksize=4))
    mask_b, W_b = sparsegpt_prune(W, stats.hessian(), "2:4", SparseGPTConfig(blocksize=128))
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(W_a, W_b, rtol=1e-4, atol=1e-4)


def test_sparsegpt_exact_counts_with_uneven_blocks_and_a_dead_column():
    torch.manual_seed(3)
    O, I = 6, 30
    X = _correlated_inputs(200, I, seed=4)
    X[:, 7] = 0.0  # an input that never fires
    W = torch.randn(O, I)
    stats = LinearStats(I, hessian=True)
    stats.add(X)
    cfg = SparseGPTConfig(blocksize=8)  # blocks of 8 over 30 columns: the counts round per block
    mask, W_s = sparsegpt_prune(W, stats.hessian(), "0.3", cfg)
    assert (mask.sum(1) == I - round(0.3 * I)).all()
    assert not mask[:, 7].any()  # a dead column's weights are pruned first
    mask, _ = sparsegpt_prune(W, stats.hessian(), "0.3/layer", cfg)
    assert int(mask.sum()) == O * I - round(0.3 * O * I)
    mask, _ = sparsegpt_prune(W, stats.hessian(), "2:6", SparseGPTConfig(blocksize=10))  # rounded to 6
    assert (mask.reshape(O, -1, 6).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="blocksize"):
        SparseGPTConfig(blocksize=0)
    with pytest.raises(ValueError, match="sparsegpt.*block"):
        sparsegpt_prune(W, stats.hessian(), "block2x2:0.5")


# --- DSnoT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("spec", ["0.5", "2:4", "0.6/layer"])
def test_dsnot_never_increases_its_objective_and_keeps_the_pattern(start, spec):
    torch.manual_seed(5)
    O, I = 24, 48
    X = _correlated_inputs(300, I, seed=6)
    W = torch.randn(O, I)
    stats = LinearStats(I, mean=True, hessian=True)
    stats.add(X)
    mask0, W_new = PRUNERS.get(start).fn(W, spec, stats, None, "w")
    W0 = W if W_new is None else W_new
    r0 = dsnot_objective(W, W0, mask0, stats.mean_I)
    cfg = DSnoTConfig(threshold=0.01)
    mask1, W1 = dsnot_repair(W, W0, mask0, stats.mean_I, stats.var_I, stats.sq_norm_I, spec, cfg)
    r1 = dsnot_objective(W, W1, mask1, stats.mean_I)
    assert (r1.abs() <= r0.abs() + 1e-9).all()
    # it does repair, not just keep the mask (SparseGPT's reconstruction leaves less to repair)
    assert (r1.abs() < r0.abs() - 1e-6).sum() >= (O // 2 if start != "sparsegpt" else O // 4)
    assert not torch.equal(mask1, mask0)
    assert satisfies(mask1, spec)
    if spec != "0.6/layer":
        assert torch.equal(mask1.sum(1), mask0.sum(1))  # swaps within a row
    else:
        assert int(mask1.sum()) == int(mask0.sum())
    # kept weights keep the method's values; regrown ones take their dense values
    assert torch.equal(W1[mask0], W0[mask0].to(W1.dtype)) and torch.equal(W1[~mask0], W[~mask0])
    # and the recorded objective is the true one: the expected change of the layer's output
    mean_out = (X.double() @ (W.double() - (W1 * mask1).double()).T).mean(0)
    torch.testing.assert_close(r1, mean_out, rtol=1e-6, atol=1e-6)


def test_dsnot_stops_at_the_threshold_and_after_max_cycles():
    torch.manual_seed(7)
    X = _correlated_inputs(200, 32, seed=8)
    W = torch.randn(8, 32)
    st = LinearStats(32, mean=True)
    st.add(X)
    mask0 = mask_from_scores(wanda_scores(W, st.sq_norm_I), "0.5")
    args = (W, W, mask0, st.mean_I, st.var_I, st.sq_norm_I, "0.5")
    same, _ = dsnot_repair(*args, DSnoTConfig(max_cycles=0))
    assert torch.equal(same, mask0)
    r0 = dsnot_objective(W, W, mask0, st.mean_I).abs()
    huge, _ = dsnot_repair(*args, DSnoTConfig(threshold=float(r0.max()) + 1.0))
    assert torch.equal(huge, mask0)
    one, _ = dsnot_repair(*args, DSnoTConfig(max_cycles=1, threshold=0.0))
    assert ((one != mask0).sum(1) <= 2).all()  # at most one swap per row
    with pytest.raises(ValueError, match="threshold"):
        DSnoTConfig(threshold=-1.0)
    with pytest.raises(ValueError, match="dsnot.*block"):
        dsnot_repair(W, W, mask0, st.mean_I, st.var_I, st.sq_norm_I, "block2x2:0.5")


# --- the layer-by-layer engine ---------------------------------------------------------------


def test_engine_feeds_each_block_the_outputs_of_the_pruned_blocks_before_it():
    torch.manual_seed(9)
    model = Toy(d=8, n=2)
    batches = [torch.randn(4, 3, 8) for _ in range(2)]
    dense_W0 = model.stack[0].fc.weight.detach().clone()
    seen: dict[str, LinearStats] = {}
    masks: dict[str, torch.Tensor] = {}

    def step(_block_name, _block, stats):
        for name, (lin, st) in stats.items():
            seen[name] = st
            masks[name] = mask_from_scores(wanda_scores(lin.weight, st.sq_norm_I), "0.5")
            lin.weight.mul_(masks[name])

    tokens = layerwise(model, batches, step, blocks=list(model.stack), mean=True)
    assert tokens == 24 and list(seen) == ["stack.0.fc", "stack.1.fc"]
    x = torch.cat(batches).reshape(-1, 8)
    b0 = model.stack[0].fc.bias.detach()
    x1_pruned = torch.tanh(F.linear(x, dense_W0 * masks["stack.0.fc"], b0))
    x1_dense = torch.tanh(F.linear(x, dense_W0, b0))
    st1 = seen["stack.1.fc"]
    torch.testing.assert_close(st1.sq_norm_I, x1_pruned.double().square().sum(0))
    torch.testing.assert_close(st1.mean_I, x1_pruned.double().mean(0))
    assert not torch.allclose(st1.sq_norm_I, x1_dense.double().square().sum(0))


def test_prune_report_error_is_measured_on_inputs_from_the_pruned_block():
    torch.manual_seed(10)
    model = Toy(d=8, n=2)
    model.train()
    batches = [torch.randn(6, 8) for _ in range(3)]
    dense_W1 = model.stack[1].fc.weight.detach().clone()
    report = prune(model, "sparsegpt", "2:4", batches, blocks=["stack.0", "stack.1"])
    assert model.training and model.stack[0].training  # modes restored
    x = torch.cat(batches)
    with torch.no_grad():
        x1 = model.stack[0](x)[0]  # block 0 is pruned now
    W1_hat = model.stack[1].fc.weight.detach() * model.stack[1].fc.mask
    rec = report.layers[1]
    assert rec.name == "stack.1.fc" and rec.shape == (8, 8) and rec.sparsity == 0.5
    assert rec.error == pytest.approx(_rel_error(dense_W1, W1_hat, x1), rel=1e-4)


# --- prune() end to end ----------------------------------------------------------------------


def _check_sparse_model(model, names, spec):
    layers = dict(sparse_layers(model))
    assert sorted(layers) == sorted(names)
    for name, mod in layers.items():
        assert satisfies(mod.mask, spec), name
        assert satisfies(mod.weight, spec), name  # masked weights are zeroed
        assert str(mod.pattern) == spec


@pytest.mark.parametrize("method, spec, repair", [
    ("wanda", "2:4", None),
    ("sparsegpt", "0.5", None),
    ("wanda", "4:8", "dsnot"),
    ("magnitude", "0.5/layer", None),
])
def test_prune_tiny_lm_end_to_end(method, spec, repair):
    from sparseroute.models import TransformerLM, preset

    torch.manual_seed(11)
    model = TransformerLM(preset("tiny"))
    calib = None if method == "magnitude" else [torch.randint(0, 256, (2, 32)) for _ in range(2)]
    report = prune(model, method, spec, calib, repair=repair)
    expected = [f"blocks.{i}.{p}" for i in range(4)
                for p in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down")]
    _check_sparse_model(model, expected, spec)
    assert [r.name for r in report.layers] == expected
    assert report.method == method and report.pattern == spec and report.repair == repair
    assert report.sparsity == pytest.approx(0.5)
    if calib is None:
        assert report.calib_tokens == 0 and all(r.error is None for r in report.layers)
    else:
        assert report.calib_tokens == 128
        assert all(0.0 < r.error < 1.0 for r in report.layers)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 16))).logits).all()


def test_prune_tiny_bert_with_attention_mask():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    torch.manual_seed(12)
    model = transformers.BertModel(cfg).eval()
    calib = []
    for _ in range(2):
        am = torch.ones(3, 12, dtype=torch.long)
        am[1, 7:] = 0
        am[2, 3:] = 0
        calib.append({"input_ids": torch.randint(0, 100, (3, 12)), "attention_mask": am})
    dense_q1 = model.encoder.layer[1].attention.self.query.weight.detach().clone()
    report = prune(model, "wanda", "2:4", calib, repair="dsnot")
    names = [f"encoder.layer.{i}.{p}" for i in range(2) for p in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]
    _check_sparse_model(model, names, "2:4")
    assert type(model.pooler.dense) is nn.Linear  # outside the blocks
    assert report.calib_tokens == 72
    # layer 1's query saw layer 0's pruned outputs computed with the attention mask
    with torch.no_grad():
        x1 = torch.cat([model(**b, output_hidden_states=True).hidden_states[1].reshape(-1, 32) for b in calib])
    q1 = model.encoder.layer[1].attention.self.query
    rec = next(r for r in report.layers if r.name == "encoder.layer.1.attention.self.query")
    assert rec.error == pytest.approx(_rel_error(dense_q1, q1.weight.detach() * q1.mask, x1), rel=1e-3)


def test_find_blocks_on_known_layouts():
    transformers = pytest.importorskip("transformers")
    from sparseroute.models import TransformerLM, preset

    lm = TransformerLM(preset("tiny", n_layers=2))
    assert [n for n, _ in find_blocks(lm)] == ["blocks.0", "blocks.1"]
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, vocab_size=50)
    wrapped = transformers.BertForSequenceClassification(cfg)
    assert [n for n, _ in find_blocks(wrapped)] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    with pytest.raises(ValueError, match="blocks="):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="not a submodule"):
        find_blocks(lm, [nn.Linear(2, 2)])


def test_progress_bar_goes_to_stderr(capsys):
    model = Toy(d=8, n=2)
    prune(model, "wanda", "0.5", [torch.randn(2, 8)], blocks=list(model.stack), progress=True)
    assert "pruning" in capsys.readouterr().err


# --- errors ----------------------------------------------------------------------------------


def test_errors_name_what_is_wrong_and_leave_the_model_unchanged():
    model = Toy(d=8, n=2)
    blocks = list(model.stack)
    calib = [torch.randn(2, 8)]
    with pytest.raises(ValueError, match="unknown pruning method 'obs'; known: magnitude, sparsegpt, wanda"):
        prune(model, "obs", "0.5", calib, blocks=blocks)
    with pytest.raises(ValueError, match="unknown mask repair 'rigl'; known: dsnot"):
        prune(model, "wanda", "0.5", calib, repair="rigl", blocks=blocks)
    for empty in (None, []):
        with pytest.raises(ValueError, match="'wanda' needs calibration"):
            prune(model, "wanda", "0.5", empty, blocks=blocks)
    with pytest.raises(ValueError, match="'dsnot' needs calibration"):
        prune(model, "magnitude", "0.5", None, repair="dsnot", blocks=blocks)
    with pytest.raises(ValueError, match="method 'sparsegpt' does not support block pattern block2x2:0.5"):
        prune(model, "sparsegpt", "block2x2:0.5", calib, blocks=blocks)
    with pytest.raises(ValueError, match="unknown option.*'blocksise'.*allowed: blocksize, percdamp, report_error"):
        prune(model, "sparsegpt", "0.5", calib, blocks=blocks, options={"blocksise": 64})
    with pytest.raises(ValueError, match="m=16 must divide"):
        prune(model, "wanda", "2:16", calib, blocks=blocks)
    assert not sparse_layers(model)
    assert "dsnot" in REPAIRS and PRUNERS.names() == ["magnitude", "sparsegpt", "wanda"]
