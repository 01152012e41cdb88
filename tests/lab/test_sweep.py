"""The lab's sweeps: spec validation, the SQLite store, kill-and-resume of a sweep, --jobs, and the
runs/report commands."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sparseroute.lab.spec import SweepSpec, Variant, load_spec
from sparseroute.lab.store import Store, StoreError

SPEC = """
name = "two"
seeds = [0]
reference = "linear"

[base.model]
depth = 2
moe = { num_experts = 4, top_k = 2 }

[base.data]
max_bytes = "400k"

[base.train]
tokens = "8k"
batch_size = 8
seq_len = 64
eval_tokens = 4096
checkpoint_every = 5
log_every = 2

[[variants]]
name = "linear"
model.moe.router = "topk"
model.moe.router_options = { jitter = 0.1 }

[[variants]]
name = "cosine"
model.moe = { router = "cosine", router_options = { d_space = 16 } }
"""

# One thread per process: with two, about one run in ten to twenty takes another path at an early
# step even without any kill (docs/training.md), which would hide what these tests check.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def write_spec(folder: Path, text: str = SPEC) -> Path:
    path = folder / "spec.toml"
    path.write_text(text)
    return path


def cli(args, cache, env_extra=None, check=True, cwd=None):
    env = dict(os.environ, SPARSEROUTE_CACHE=str(cache), COLUMNS="200", **ONE_THREAD)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "sparseroute", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def snapshot(store_path: Path) -> dict:
    """Everything the store says about the sweep's outcome, timing fields left out."""
    with Store(store_path, create=False) as st:
        counts = st.row_counts()
        sweep_id = st.latest_sweep()
        res = st.results(sweep_id)
    runs = {}
    for r in res.runs:
        timing = ("train_seconds", "tokens_per_s", "step_seconds")
        final = {k: v for k, v in (r.final or {}).items() if k not in timing}
        runs[(r.variant, r.seed)] = {"status": r.status, "final": final, "metrics": r.metrics}
    return {"counts": counts, "runs": runs}


# -- spec -----------------------------------------------------------------------------------------


def test_spec_resolves_every_variant_with_the_same_budget(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    plan = spec.plan()
    assert [(p.variant, p.seed) for p in plan] == [("linear", 0), ("cosine", 0)]
    a, b = plan[0].config, plan[1].config
    assert a.train == b.train and a.data == b.data
    assert a.train.tokens == 8000 and a.train.seed == 0
    assert a.model.moe.router == "topk" and a.model.moe.router_options == {"jitter": 0.1}
    assert b.model.moe.router == "cosine" and b.model.moe.router_options == {"d_space": 16}
    assert a.model.moe.num_experts == b.model.moe.num_experts == 4  # base MoE settings carried into variants
    assert a.model.d_model == b.model.d_model == 128  # depth 2


def test_spec_dense_variant_and_settings(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC + '\n[[variants]]\nname = "dense"\nmodel.moe = false\n'))
    spec = spec.with_changes(seeds=(3, 4), settings=["train.tokens=16k", "model.moe.num_experts=8"])
    plan = spec.plan()
    dense = [p for p in plan if p.variant == "dense"]
    assert [p.seed for p in dense] == [3, 4] and dense[0].config.model.moe is None
    lin = next(p for p in plan if p.variant == "linear")
    assert lin.config.train.tokens == 16000 and lin.config.model.moe.num_experts == 8


def test_fingerprint_depends_on_runs_not_on_spelling(tmp_path):
    a = load_spec(write_spec(tmp_path))
    spelled = SPEC.replace('tokens = "8k"', "tokens = 8000")
    b = load_spec(write_spec(tmp_path, spelled))
    assert a.fingerprint() == b.fingerprint()
    assert a.with_changes(settings=["train.tokens=16k"]).fingerprint() != a.fingerprint()


@pytest.mark.parametrize(
    "change, needle",
    [
        (('model.moe.router = "topk"', 'model.moe.routr = "topk"'), "routr"),
        (('model.moe.router = "topk"', 'model.moe.router = "nope"'), "nope"),
        (("batch_size = 8", "batch_sise = 8"), "batch_sise"),
        (('max_bytes = "400k"', 'max_byte = "400k"'), "max_byte"),
        (("seeds = [0]", "seeds = [0]\nmargn = 1"), "margn"),
        (('name = "cosine"', 'name = "linear"'), "duplicate"),
    ],
)
def test_bad_spec_fails_before_training_naming_the_field(tmp_path, cache, change, needle):
    spec = write_spec(tmp_path, SPEC.replace(*change))
    store = tmp_path / "runs" / "lab.sqlite"
    proc = cli(["compare", "--spec", str(spec), "--store", str(store), "--quiet"], cache, check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert needle in err
    assert not store.parent.exists()  # nothing created, nothing trained


def test_spec_errors_in_python():
    with pytest.raises(ValueError, match="seed"):
        SweepSpec(name="x", base={"train": {"seed": 3}}, variants=(Variant("a"),)).plan()
    with pytest.raises(ValueError, match="reference"):
        SweepSpec(name="x", base={}, variants=(Variant("a"),), reference="b")
    with pytest.raises(ValueError, match="sweep name"):
        SweepSpec(name="a b", base={}, variants=(Variant("a"),))
    with pytest.raises(ValueError, match="preset"):
        SweepSpec(name="x", base={}, variants=(Variant("a", {"model": {"preset": "small"}}),)).plan()


# -- store ----------------------------------------------------------------------------------------


def test_store_rejects_a_file_that_is_not_a_store(tmp_path):
    bad = tmp_path / "x.sqlite"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a sparseroute results store"):
        Store(bad)
    assert bad.read_bytes() == b"this is not sqlite at all" * 100
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="schema"):
        Store(other)


def test_store_metrics_are_keyed_by_step(tmp_path):
    with Store(tmp_path / "s.sqlite") as st:
        sid = st.create_sweep("s", "f", {"variants": [{"name": "a"}]}, "s-{id}", [("a", 0, {"x": 1})])
        rid = int(st.runs(sid)[0]["id"])
        for _ in range(3):  # a resumed run logs the same interval again
            st.log_metric(rid, {"step": 2, "tokens": 100, "loss": 3.0})
        st.log_metric(rid, {"step": 4, "tokens": 200, "loss": 2.5})
        assert [m["step"] for m in st.metrics(rid)] == [2, 4]
        assert st.runs(sid)[0]["dir"] == f"s-{sid}/a/seed-0"
        with pytest.raises(StoreError, match="no run 99"):
            st.run(99)
        with pytest.raises(StoreError, match="no sweep 7"):
            st.sweep(7)


# -- kill and resume ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_sweep(tmp_path_factory, cache):
    folder = tmp_path_factory.mktemp("ref")
    spec = write_spec(folder)
    store = folder / "runs" / "lab.sqlite"
    proc = cli(["compare", "--spec", str(spec), "--store", str(store), "--quiet"], cache)
    return store, snapshot(store), proc


def test_uninterrupted_sweep(reference_sweep):
    store, snap, proc = reference_sweep
    assert snap["counts"]["runs"] == 2 and snap["counts"]["finals"] == 2
    assert all(r["status"] == "done" for r in snap["runs"].values())
    # 8000 tokens / (8 * 64) = 15 steps, logged every 2 plus the last
    assert [m["step"] for m in snap["runs"][("linear", 0)]["metrics"]] == [2, 4, 6, 8, 10, 12, 14, 15]
    assert "report:" in proc.stdout
    report = Path(proc.stdout.strip().splitlines()[-1].split("report:", 1)[1].strip())
    assert report.exists() and report.stat().st_size > 10_000
    assert "linear" in proc.stdout and "cosine" in proc.stdout


@pytest.mark.parametrize("fault", ["after_step:7", "checkpoint_written:10", "run_trained:0", "run_trained:1"])
def test_killed_sweep_resumes_to_the_same_results(tmp_path, cache, reference_sweep, fault):
    _, ref, _ = reference_sweep
    spec = write_spec(tmp_path)
    store = tmp_path / "runs" / "lab.sqlite"
    args = ["compare", "--spec", str(spec), "--store", str(store), "--quiet"]
    proc = cli(args, cache, {"SPARSEROUTE_FAULT": fault}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with Store(store, create=False) as st:
        statuses = [r["status"] for r in st.runs(st.latest_sweep())]
    assert "running" in statuses  # the kill left a run half done
    cli(args, cache)
    got = snapshot(store)
    assert got["counts"] == ref["counts"]  # one sweep, one row per run, no metric counted twice
    assert got["runs"] == ref["runs"]  # same final metrics and the same logs, bit for bit
    with Store(store, create=False) as st:
        attempts = {r["variant"]: r["attempts"] for r in st.runs(st.latest_sweep())}
    killed_variant = "cosine" if fault == "run_trained:1" else "linear"
    assert attempts[killed_variant] == 2 and sum(attempts.values()) == 3


def test_jobs_give_the_same_results(tmp_path, cache, reference_sweep):
    _, ref, _ = reference_sweep
    spec = write_spec(tmp_path)
    store = tmp_path / "runs" / "lab.sqlite"
    cli(["compare", "--spec", str(spec), "--store", str(store), "--quiet", "--jobs", "2"], cache)
    assert snapshot(store)["runs"] == ref["runs"]


def test_finished_sweep_is_not_trained_again_and_runs_commands(tmp_path, cache, reference_sweep):
    import shutil

    ref_store, ref, _ = reference_sweep
    folder = tmp_path / "runs"
    shutil.copytree(ref_store.parent, folder)
    store = folder / "lab.sqlite"
    spec = write_spec(tmp_path)
    proc = cli(["compare", "--spec", str(spec), "--store", str(store), "--quiet"], cache)
    assert "training" not in proc.stderr
    assert snapshot(store)["counts"] == ref["counts"]

    listing = cli(["runs", "list", "--store", str(store)], cache).stdout
    assert "two" in listing and "linear" in listing and "done" in listing
    with Store(store, create=False) as st:
        run_ids = [int(r["id"]) for r in st.runs(st.latest_sweep())]
        run_dir = folder / st.run(run_ids[1])["dir"]
    shown = json.loads(cli(["runs", "show", str(run_ids[0]), "--store", str(store), "--json"], cache).stdout)
    assert shown["variant"] == "linear" and shown["status"] == "done"
    assert shown["final"]["test_ppl"] == ref["runs"][("linear", 0)]["final"]["test_ppl"]
    assert shown["git_revision"]

    refused = cli(["runs", "delete", str(run_ids[1]), "--store", str(store)], cache, check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr and run_dir.exists()
    cli(["runs", "delete", str(run_ids[1]), "--store", str(store), "--yes"], cache)
    assert not run_dir.exists()
    with Store(store, create=False) as st:
        assert st.row_counts()["runs"] == 1
    # the deleted run is trained again by the next compare, to the same result
    cli(["compare", "--spec", str(spec), "--store", str(store), "--quiet"], cache)
    assert snapshot(store)["runs"] == ref["runs"]

    out = tmp_path / "again.html"
    rep = cli(["report", str(store), "--out", str(out)], cache)
    assert out.exists() and "linear" in rep.stdout
    bad = cli(["report", str(store), "--sweep", "42"], cache, check=False)
    assert bad.returncode == 2 and "no sweep 42" in bad.stderr


def test_a_sweep_stored_before_a_new_config_field_is_resumed(tmp_path, cache, monkeypatch):
    """Configs stored by an earlier version (without fields added since, at their defaults) still
    identify the same sweep, so upgrading sparseroute mid-sweep does not start it over."""
    from sparseroute.lab.runner import register_sweep

    monkeypatch.setenv("SPARSEROUTE_CACHE", str(cache))
    spec = load_spec(write_spec(tmp_path))
    with Store(tmp_path / "lab.sqlite") as st:
        sid, created = register_sweep(st, spec, progress=False)
        assert created
        with st.transaction() as c:
            for r in st.runs(sid):
                cfg = json.loads(r["config_json"])
                del cfg["train"]["halting_taus"]
                c.execute("UPDATE runs SET config_json = ? WHERE id = ?", (json.dumps(cfg), r["id"]))
            c.execute("UPDATE sweeps SET fingerprint = 'older' WHERE id = ?", (sid,))
        again, created = register_sweep(st, spec, progress=False)
        assert (again, created) == (sid, False)
        other, created = register_sweep(st, spec.with_changes(settings=["train.tokens=16k"]), progress=False)
        assert created and other != sid


def test_a_killed_worker_stops_a_jobs_sweep_cleanly_and_it_resumes(tmp_path, cache, reference_sweep):
    _, ref, _ = reference_sweep
    spec = write_spec(tmp_path)
    store = tmp_path / "runs" / "lab.sqlite"
    args = ["compare", "--spec", str(spec), "--store", str(store), "--quiet", "--jobs", "2"]
    proc = cli(args, cache, {"SPARSEROUTE_FAULT": "after_step:7"}, check=False)
    assert proc.returncode == 2 and "run the same command again" in proc.stderr
    assert "Traceback" not in proc.stderr
    cli(args, cache)
    assert snapshot(store)["runs"] == ref["runs"]


def test_every_preset_resolves():
    from sparseroute.lab.presets import SWEEP_PRESETS, sweep_preset
    from sparseroute.lab.prune_sweep import PruneSweepSpec

    for name in SWEEP_PRESETS:
        spec = sweep_preset(name)
        if isinstance(spec, PruneSweepSpec):  # a pruning sweep: one trained LM, no variants to plan
            assert spec.jobs() and spec.lm_config().train.tokens > 0
            continue
        plan = spec.plan()
        assert len(plan) == len(spec.variants) * len(spec.seeds)
        budgets = {(p.config.train.tokens, p.config.train.batch_size, p.config.train.seq_len) for p in plan}
        assert len(budgets) == 1, name  # every run of a sweep has the same budget
        assert spec.reference in {v.name for v in spec.variants}
    with pytest.raises(ValueError, match="quick"):
        sweep_preset("nope")
