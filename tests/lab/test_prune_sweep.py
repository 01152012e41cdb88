"""Pruning sweeps: the spec's checks, a tiny sweep end to end (its LM trained once, each job pruned
and stored once, resumed without redoing finished jobs), its report, and the ``nm`` and ``prune``
presets as the lab plans them."""

from __future__ import annotations

import json

import pytest
import torch

from sparseroute.lab import prune_sweep as ps
from sparseroute.lab.presets import sweep_preset
from sparseroute.lab.prune_sweep import PruneSweepSpec, run_prune_sweep, write_prune_report
from sparseroute.lab.store import Store

TINY_LM = {
    "model": {"depth": 2, "moe": False},
    "data": {"max_bytes": "300k", "tokenizer": "bpe", "bpe_vocab_size": 300},
    "train": {"tokens": "4k", "batch_size": 4, "seq_len": 64, "eval_tokens": 1024, "checkpoint_every": 8,
              "log_every": 4},
}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEROUTE_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_spec(**kw) -> PruneSweepSpec:
    base = dict(name="tiny-prune", models=("lm",), lm=TINY_LM, methods=("magnitude", "wanda"), repairs=(None,),
                patterns=("2:4", "0.5"), calib=2)
    return PruneSweepSpec(**{**base, **kw})


@pytest.mark.parametrize("change, field", [
    ({"methods": ("magnitude", "obs")}, "methods"),
    ({"repairs": (None, "swap")}, "repairs"),
    ({"patterns": ("4:4",)}, "n must be < m"),
    ({"patterns": ("1.5",)}, "sparsity"),
    ({"models": ()}, "models"),
    ({"calib": 0}, "calib"),
    ({"lm": {"train": {"tokens": "nope"}}}, "tokens"),
])
def test_spec_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        tiny_spec(**change)


def test_spec_round_trip_and_jobs():
    spec = tiny_spec(repairs=(None, "dsnot"))
    again = PruneSweepSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.fingerprint() == spec.fingerprint()
    keys = [j.key for j in spec.jobs()]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2
    assert "lm-wanda+dsnot-2of4" in keys
    order = spec.run_order()
    assert sorted(j.key for j in order) == sorted(keys)
    assert [j.repair for j in order] == [None] * 4 + ["dsnot"] * 4  # the plain grid first
    changed = spec.with_changes(settings=["train.tokens=8k"])
    assert changed.lm["train"]["tokens"] == "8k" and changed.fingerprint() != spec.fingerprint()


def test_tiny_sweep_end_to_end_and_resume(tmp_path, monkeypatch):
    store = Store(tmp_path / "runs" / "lab.sqlite")
    spec = tiny_spec()
    sweep_id = run_prune_sweep(store, spec, progress=False, say=lambda _: None)
    folder = tmp_path / "runs" / store.sweep(sweep_id)["dir"]
    assert (folder / "lm" / "final.json").exists()
    results = sorted(p.name for p in (folder / "results").glob("*.json"))
    assert results == sorted(f"{j.key}.json" for j in spec.jobs())
    _, rows = ps.prune_results(store, sweep_id)
    dense = {r["dense_fidelity"] for r in rows}
    assert len(dense) == 1  # every job starts from the same trained model
    for r in rows:
        assert r["fidelity_metric"] == "test_ppl"
        assert r["fidelity"] > 0 and r["sparsity"] == pytest.approx(0.5, abs=0.02)
    by_key = {r["job"]: r for r in rows}
    # Wanda uses the calibration data; at the same pattern it is not the magnitude result
    assert by_key["lm-wanda-2of4"]["fidelity"] != by_key["lm-magnitude-2of4"]["fidelity"]
    html = (folder / "report.html").read_text()
    assert "Fidelity vs sparsity: lm" in html and "data:image/png;base64," in html
    assert html.count("<tr>") >= len(rows) + 1

    # a second run redoes nothing: the finished jobs are read back
    def refuse(*a, **k):
        raise AssertionError("a finished job was pruned again")

    monkeypatch.setattr("sparseroute.lab.prune.run_prune", refuse)
    assert run_prune_sweep(store, spec, progress=False, say=lambda _: None) == sweep_id

    # a job killed half-way (its output folder there, no result) starts over
    monkeypatch.undo()
    monkeypatch.setenv("SPARSEROUTE_CACHE", str(tmp_path / "cache"))
    key = spec.jobs()[0].key
    (folder / "results" / f"{key}.json").unlink()
    stale = folder / "pruned" / key / "leftover.bin"
    stale.write_bytes(b"half-written")
    run_prune_sweep(store, spec, progress=False, say=lambda _: None)
    assert not stale.exists() and (folder / "results" / f"{key}.json").exists()
    report = write_prune_report(store, sweep_id, tmp_path / "elsewhere" / "r.html")
    assert report.exists()
    store.close()


def test_presets_plan():
    nm = sweep_preset("nm")
    assert [v.name for v in nm.variants] == ["dense", "ste", "sr-ste", "progressive"]
    plan = nm.plan()
    assert len(plan) == 12
    methods = {(p.variant, p.config.train.sparse_method if p.config.train.sparsity else None) for p in plan}
    assert methods == {("dense", None), ("ste", "ste"), ("sr-ste", "sr-ste"), ("progressive", "progressive")}
    assert {p.config.train.sparsity for p in plan if p.variant != "dense"} == {"2:4"}
    prune = sweep_preset("prune")
    assert len(prune.jobs()) == 2 * 3 * 2 * 4
    assert prune.lm_config().model.d_model == 384  # the small LM
