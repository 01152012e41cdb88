"""Runs with sparse weights trained from scratch (``--sparsity``, ``--sparse-method``): they finish
with masks that satisfy the pattern, log SAD, load for evaluation, resume bit-identically after a
kill, and leave a dense run's stored config and log as they were."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_run_faults import cli

from sparseroute.cli import main
from sparseroute.train import evaluate_run, load_run_model
from sparseroute.weights import check_pattern, nm_mask
from sparseroute.weights.dynamic import DynamicSparseLinear
from sparseroute.weights.training import NMSparseLinear

SMALL = ["--depth", "2", "--seq-len", "64", "--batch-size", "8", "--max-bytes", "400k", "--eval-tokens", "2048"]
# 8k tokens / (8 * 64) = 15 steps; checkpoints at 5 and 10 (and 15 at the end)
NM_RUN = ["train", *SMALL, "--tokens", "8k", "--checkpoint-every", "5", "--log-every", "2", "--quiet",
          "--sparsity", "2:4", "--sparse-method", "sr-ste"]


def run_main(args, cache) -> int:
    """``sparseroute ARGS`` in this process (no interpreter start-up) with the test's data cache, on
    one thread (two threads on a busy machine are much slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([*map(str, args), "--cache-dir", str(cache)])
    finally:
        torch.set_num_threads(before)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def outcome(run: Path, step: int = 15):
    final = json.loads((run / "final.json").read_text())
    final = {k: v for k, v in final.items() if k not in ("train_seconds", "tokens_per_s", "step_seconds")}
    weights = load_file(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))
    return final, weights, (run / "metrics.jsonl").read_text()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def nm_run(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("nm") / "r"
    cli([*NM_RUN, "--out", run], cache)
    return run


def test_nm_run_saves_nm_masks_logs_sad_and_evaluates(nm_run):
    weights = load_file(str(nm_run / "checkpoints" / "step-000015" / "model.safetensors"))
    masks = {k: v for k, v in weights.items() if k.endswith(".mask")}
    assert len(masks) == 2 * 7  # q, k, v, o, gate, up, down in each of the two blocks; not the head
    for key, mask in masks.items():
        check_pattern(mask, "2:4", key)
        # the saved mask is the N:M mask of the saved weights
        w = weights[key[: -len("mask")] + "weight"]
        assert torch.equal(mask, nm_mask(w.abs(), 2, 4))
    recs = metrics(nm_run)
    assert [r["step"] for r in recs] == [2, 4, 6, 8, 10, 12, 14, 15]
    for r in recs:
        assert r["sparse"]["sparsity"] == 0.5 and 0 <= r["sparse"]["sad"] <= r["sparse"]["sad_total"] <= 1
    assert recs[0]["sparse"]["sad"] == recs[0]["sparse"]["sad_total"] > 0  # the masks move early on
    final = json.loads((nm_run / "final.json").read_text())
    assert final["sparse"]["sparsity"] == 0.5 and final["sparse"]["sad_total"] == recs[-1]["sparse"]["sad_total"]
    model, cfg, meta = load_run_model(nm_run)
    assert cfg.train.sparsity == "2:4" and meta["step"] == 15
    assert all(isinstance(model.get_submodule(k[: -len(".mask")]), NMSparseLinear) for k in masks)
    shown = evaluate_run(nm_run)
    assert shown["step"] == 15 and shown["val_loss"] == final["val_loss"] and shown["test_ppl"] == final["test_ppl"]


def test_nm_run_killed_and_resumed_is_bit_identical(tmp_path, cache, nm_run):
    run = tmp_path / "r"
    proc = cli([*NM_RUN, "--out", run], cache, {"SPARSEROUTE_FAULT": "after_step:12"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    cli(["train", "--out", run, "--resume", "--quiet"], cache)
    fa, wa, ma = outcome(nm_run)
    fb, wb, mb = outcome(run)
    assert fa == fb and ma == mb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_rigl_run_keeps_its_nonzeros_and_moves_its_masks(tmp_path, cache):
    run = tmp_path / "r"
    args = ["train", *SMALL, "--tokens", "4k", "--log-every", "2", "--quiet", "--sparsity", "0.8",
            "--sparse-method", "rigl", "--set", "train.sparse_options.update_every=2", "--out", run]
    assert run_main(args, cache) == 0
    model, _, _ = load_run_model(run)
    layers = [m for m in model.modules() if isinstance(m, DynamicSparseLinear)]
    assert len(layers) == 14
    for m in layers:
        assert int(m.mask.sum()) == int(m.mask_start.sum())  # nnz per layer constant
        assert bool((m.weight[~m.mask] == 0).all())  # weights outside the mask exactly 0
    kept = sum(int(m.mask.sum()) for m in layers)
    total = sum(m.mask.numel() for m in layers)
    assert kept / total == pytest.approx(0.2, abs=1e-4)
    recs = metrics(run)
    # 4k tokens = 7 steps; updates after steps 2 and 4 (before 0.75 * 7)
    assert [r["sparse"]["sad"] > 0 for r in recs] == [True, True, False, False]
    assert recs[-1]["sparse"]["sparsity"] == pytest.approx(0.8, abs=1e-4)


def test_a_dense_run_stores_no_sparse_fields(tmp_path, cache):
    run = tmp_path / "r"
    assert run_main(["train", *SMALL, "--tokens", "1k", "--log-every", "1", "--quiet", "--out", run], cache) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert set(cfg["train"]) & {"sparsity", "sparse_method", "sparse_options"} == set()
    assert all("sparse" not in r for r in metrics(run))
    assert "sparse" not in json.loads((run / "final.json").read_text())
    model, _, _ = load_run_model(run)
    assert not any(k.endswith(".mask") for k in model.state_dict())


def test_cli_flags_and_refusals(tmp_path, cache, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert "--sparsity PATTERN" in shown and "--sparse-method NAME" in shown and "train.sparse_method" in shown
    for args, match in ((["--sparsity", "2:4", "--sparse-method", "rigl"], "sparse_method=rigl trains unstructured"),
                        (["--sparsity", "2:3"], "m=3 must divide"),
                        (["--sparse-method", "set"], "needs sparsity"),
                        (["--sparsity", "0.9", "--sparse-method", "set", "--set", "train.sparse_options.lam=0.1"],
                         "unknown option(s) lam for sparse_method set")):
        out = tmp_path / "x"
        assert run_main(["train", *SMALL, "--tokens", "1k", "--quiet", *args, "--out", out], cache) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()  # refused before anything was written
