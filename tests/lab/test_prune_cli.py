"""``sparseroute prune`` on a tiny trained run: the JSON line, the folder it writes (a run that
loads and evaluates, a packed file with the masks), and bad input refused with exit 2 and
nothing written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparseroute.cli import main
from sparseroute.lab.prune import load_pruned, run_prune
from sparseroute.train import prepare_run, resolve_run, train
from sparseroute.train.loop import evaluate_run, load_run_model
from sparseroute.weights import SparseLinear, check_pattern, sparse_layers
from sparseroute.weights.export import load_packed

KEYS = {"model", "method", "pattern", "repair", "fidelity", "fidelity_metric", "dense_fidelity", "seconds", "sparsity"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of the depth-1 LM trained for 4 steps on 200 kB of the standard library."""
    root = tmp_path_factory.mktemp("prune")
    cfg = resolve_run({"model": {"depth": 1},
                       "data": {"max_bytes": 200_000, "cache_dir": str(root / "cache")},
                       "train": {"seq_len": 32, "batch_size": 8, "tokens": 1024, "eval_tokens": 1024,
                                 "log_every": 2, "checkpoint_every": 0}})
    cfg, corpus = prepare_run(cfg, progress=False)
    train(cfg, root / "run", progress=False, corpus=corpus)
    return root / "run"


def _prune(args, capsys):
    rc = main(["prune", *args, "--quiet"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_prune_a_run_prints_the_line_and_writes_a_run(run, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc, stdout, _ = _prune(["--model", str(run), "--method", "magnitude", "--pattern", "2:4", "--calib", "4",
                            "--out", str(out)], capsys)
    assert rc == 0
    res = json.loads(stdout.strip().splitlines()[-1])
    assert KEYS <= set(res)
    assert res["fidelity_metric"] == "test_ppl" and res["method"] == "magnitude" and res["pattern"] == "2:4"
    assert res["repair"] is None and res["sparsity"] == pytest.approx(0.5)
    assert math.isfinite(res["fidelity"]) and res["fidelity"] > 1 and res["dense_fidelity"] > 1
    assert res["dense_fidelity"] == pytest.approx(evaluate_run(run)["test_ppl"], rel=1e-9)

    # the folder is a run: its checkpoint loads into the run's model and evaluates to the fidelity
    assert {"config.json", "checkpoints", "prune.json", "pruned.safetensors"} <= {p.name for p in out.iterdir()}
    model, cfg, _ = load_run_model(out)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks")]
    assert linears
    for name, lin in linears:
        check_pattern(lin.weight, "2:4", name)
    assert evaluate_run(out)["test_ppl"] == pytest.approx(res["fidelity"], rel=1e-9)

    # the packed file gives the masks back; the record holds the report
    pruned, record = load_pruned(out)
    layers = sparse_layers(pruned)
    assert len(layers) == len(linears) and record["kind"] == "lm"
    dense = dict(model.named_modules())
    for name, mod in layers:
        assert isinstance(mod, SparseLinear)
        check_pattern(mod.mask, "2:4", name)
        assert torch.equal(mod.masked_weight(), dense[name].weight)
    assert len(record["report"]["layers"]) == len(layers) and record["result"]["fidelity"] == res["fidelity"]
    assert set(load_packed(out / "pruned.safetensors")) >= {f"{n}.mask" for n, _ in layers}


def test_wanda_with_dsnot_on_a_run_into_an_empty_folder(run, tmp_path):
    (tmp_path / "w").mkdir()  # an empty --out is fine: it is replaced whole
    res = run_prune(str(run), "wanda", "0.5", out=tmp_path / "w", repair="dsnot", calib=8, progress=False,
                    options={"report_error": False})
    assert (tmp_path / "w" / "prune.json").is_file()
    assert res["repair"] == "dsnot" and res["pattern"] == "0.5"
    assert res["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert math.isfinite(res["fidelity"])


def _bad_cases(run, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    base = {"--model": str(run), "--method": "magnitude", "--pattern": "2:4", "--calib": "2",
            "--out": str(tmp_path / "out")}
    return [
        ({"--method": "prunify"}, "unknown pruning method 'prunify'"),
        ({"--pattern": "5:4"}, "n must be < m"),
        ({"--pattern": "half"}, "pattern"),
        ({"--repair": "glue"}, "unknown mask repair 'glue'"),
        ({"--method": "sparsegpt", "--pattern": "block4x4:0.5"}, "does not support"),
        ({"--model": str(tmp_path / "no-such-run")}, "no such run folder"),
        ({"--model": str(tmp_path)}, "not a run folder"),
        ({"--out": str(full)}, "already holds files"),
        ({"--calib": "0"}, "calib must be"),
    ], base, full


def test_bad_input_exits_2_with_one_line_and_writes_nothing(run, tmp_path, capsys):
    cases, base, full = _bad_cases(run, tmp_path)
    for change, needle in cases:
        args = {**base, **change}
        rc, stdout, stderr = _prune([x for kv in args.items() for x in kv], capsys)
        lines = stderr.strip().splitlines()
        assert rc == 2 and stdout == "", (change, stderr)
        assert len(lines) == 1 and lines[0].startswith("sparseroute: error:") and needle in lines[0], (change, lines)
        assert not (tmp_path / "out").exists()
        assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_missing_flag_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as err:
        main(["prune", "--model", "minilm", "--pattern", "2:4", "--out", "x"])
    assert err.value.code == 2
    assert "--method" in capsys.readouterr().err


def test_a_run_trained_with_sparse_weights_is_pruned_from_its_masked_weights(tmp_path):
    cfg = resolve_run({"model": {"depth": 1},
                       "data": {"max_bytes": 200_000, "cache_dir": str(tmp_path / "cache")},
                       "train": {"seq_len": 32, "batch_size": 8, "tokens": 1024, "eval_tokens": 1024,
                                 "log_every": 2, "checkpoint_every": 0, "sparsity": "2:4"}})
    cfg, corpus = prepare_run(cfg, progress=False)
    train(cfg, tmp_path / "nm", progress=False, corpus=corpus)
    trained, _, _ = load_run_model(tmp_path / "nm")
    masked = {n: m.masked_weight().detach().clone() for n, m in sparse_layers(trained)}
    res = run_prune(str(tmp_path / "nm"), "magnitude", "2:4", out=tmp_path / "out", calib=4, progress=False)
    # its masks were already 2:4: magnitude at 2:4 keeps exactly them, so nothing is lost
    assert res["fidelity"] == pytest.approx(res["dense_fidelity"], rel=1e-6)
    model, out_cfg, _ = load_run_model(tmp_path / "out")
    assert out_cfg.train.sparsity is None  # a dense-weight run now
    modules = dict(model.named_modules())
    for name, w in masked.items():
        assert torch.equal(modules[name].weight, w)
