"""The lab under faults and mistakes: a killed ``compare --jobs 2`` takes its workers with it, a
variant cannot change what a sweep holds fixed unless the spec says so, a spec that gains variants
or seeds extends its stored sweep, ``--set`` that changes nothing is said, and bad ``--jobs``,
``--store`` and ``--out`` values are refused before anything is written."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from rich.console import Console
from test_sweep import ONE_THREAD, SPEC, cli, write_spec

from sparseroute.cli import main
from sparseroute.lab.runner import register_sweep
from sparseroute.lab.spec import SweepSpec, load_spec
from sparseroute.lab.store import Store, StoreError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def lab_env(monkeypatch, cache):
    """In-process commands use the module's corpus cache, like the subprocess ones."""
    monkeypatch.setenv("SPARSEROUTE_CACHE", str(cache))
    return cache


def spec_dict() -> dict:
    return tomllib.loads(SPEC)


def one_line_error(err: str) -> str:
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- A: a killed compare takes its workers with it -------------------------------------------------


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("how", ["kill", "interrupt"])
def test_killed_compare_takes_its_workers_with_it(tmp_path, cache, how):
    """SIGKILL of compare (its workers notice their parent is gone), or SIGINT to compare alone
    (it stops its workers and exits at once with one line, rather than waiting for the runs)."""
    # interrupted: runs far longer than the wait below, so that waiting for them would show
    spec = write_spec(tmp_path, SPEC.replace('tokens = "8k"', 'tokens = "32k"' if how == "kill" else 'tokens = "2M"'))
    store = tmp_path / "runs" / "lab.sqlite"
    args = ["compare", "--spec", str(spec), "--store", str(store), "--quiet", "--jobs", "2"]
    env = dict(os.environ, SPARSEROUTE_CACHE=str(cache), COLUMNS="200", **ONE_THREAD)
    # SIGINT at its default in the child: a shell's background job (how a CI may start the tests)
    # ignores it, and a process started with SIGINT ignored never sees a KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "sparseroute", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        logs = [store.parent / "two-1" / v / "seed-0" / "metrics.jsonl" for v in ("linear", "cosine")]
        while not all(p.exists() and p.stat().st_size for p in logs):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the runs never logged"
            time.sleep(0.05)
        workers = [c for c in _children(proc.pid)
                   if "spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")]
        assert len(workers) == 2, workers
        if how == "kill":
            proc.kill()
            proc.wait()
        else:
            proc.send_signal(signal.SIGINT)
            # (waiting for the runs would take minutes; a loaded machine may need more than a second)
            assert proc.wait(timeout=60) == 130
            err = proc.stderr.read()
            assert "interrupted" in err and "run the same command again" in err, err
        deadline = time.monotonic() + 3
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "workers outlived the killed compare"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:  # only left when the assertion above failed
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        proc.stderr.close()

    if how == "interrupt":
        with Store(store, create=False) as st:  # nothing was lost: both runs resume later
            assert [r["status"] for r in st.runs(st.latest_sweep())] == ["running", "running"]
        return
    cli(args, cache)  # the same sweep again, to the end
    with Store(store, create=False) as st:
        rows = st.runs(st.latest_sweep())
        assert [r["status"] for r in rows] == ["done", "done"]
        for r in rows:
            logged = [json.loads(line) for line in (store.parent / r["dir"] / "metrics.jsonl").read_text().splitlines()]
            steps = [rec["step"] for rec in logged]
            assert steps == sorted(set(steps)), steps  # strictly increasing: no step logged twice
            assert steps[-1] == 62  # 32000 // (8 * 64)
            assert st.metrics(int(r["id"])) == logged


# -- B: what a variant may change --------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, field, value, shown",
    [
        ("model", "d_model", 256, "model.d_model (128 -> 256)"),
        ("model", "n_layers", 3, "model.n_layers (2 -> 3)"),
        ("train", "tokens", "16k", "train.tokens (8000 -> 16000)"),
        ("train", "seq_len", 32, "train.seq_len (64 -> 32)"),
        ("train", "lr", 1e-3, "train.lr (0.003 -> 0.001)"),
        ("data", "corpus", "TEXT", "data.corpus"),
    ],
)
def test_a_variant_cannot_change_what_the_sweep_holds_fixed(tmp_path, lab_env, capsys, section, field, value, shown):
    if value == "TEXT":
        text = tmp_path / "corpus.txt"
        text.write_text("def f(x):\n    return x + 1\n" * 2000)
        value = f"text:{text}"
    d = spec_dict()
    d["variants"][1].setdefault(section, {})[field] = value
    with pytest.raises(ValueError) as err:
        SweepSpec.from_dict(d).plan()
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert "variant 'cosine'" in msg and shown in msg and "allow_differences" in msg
    assert "model.moe" not in msg.split("changes ", 1)[1].split(";")[0]  # the routing may differ

    # the same from a file, and from compare --dry-run (nothing created)
    text = SPEC + f"{section}.{field} = {json.dumps(value)}\n"  # into the last variant's table
    path = write_spec(tmp_path, text)
    with pytest.raises(ValueError, match="variant 'cosine' changes"):
        load_spec(path)
    store = tmp_path / "runs" / "lab.sqlite"
    assert main(["compare", "--spec", str(path), "--store", str(store), "--dry-run"]) == 2
    assert f"{section}.{field}" in one_line_error(capsys.readouterr().err)
    assert not store.parent.exists()


def test_every_differing_field_is_named():
    d = spec_dict()
    d["variants"][1]["train"] = {"lr": 1e-3, "warmup_fraction": 0.1}
    d["variants"][1]["model"]["d_model"] = 256
    msg = str(pytest.raises(ValueError, SweepSpec.from_dict(d).plan).value)
    for path in ("model.d_model", "train.lr", "train.warmup_fraction"):
        assert path in msg


def test_allow_differences_opts_in_and_the_report_shows_it(tmp_path, lab_env):
    from sparseroute.lab.report import comparison_of, print_summary, write_report

    d = spec_dict()
    d["variants"][1]["train"] = {"lr": 1e-3}
    d["allow_differences"] = ["train.lr"]
    spec = SweepSpec.from_dict(d)
    plan = spec.plan()
    assert [p.config.train.lr for p in plan] == [3e-3, 1e-3]
    assert spec.to_dict()["allow_differences"] == ["train.lr"]
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    assert spec.with_changes(settings=["train.tokens=16k"]).allow_differences == ("train.lr",)
    # a path allows its whole subtree
    d["allow_differences"] = ["train"]
    SweepSpec.from_dict(d).plan()

    with Store(tmp_path / "lab.sqlite") as st:
        sid, _ = register_sweep(st, spec, progress=False, say=lambda msg: None)
        results = st.results(sid)
    console = Console(record=True, width=200)
    print_summary(results, comparison_of(results), console=console)
    terminal = console.export_text()
    line = next(line for line in terminal.splitlines() if "deliberate" in line.lower())
    assert "train.lr" in line and "linear 0.003" in line and "cosine 0.001" in line
    html = write_report(results, tmp_path / "report.html").read_text()
    assert "train.lr — linear 0.003, cosine 0.001" in html


@pytest.mark.parametrize(
    "entry, needle",
    [(["train.lrr"], "train.lrr"), (["lr"], "'lr'"), (["optim.lr"], "optim.lr"), ("train.lr", "list"),
     ([3], "3"), (["model.d_model.x"], "model.d_model.x")],
)
def test_a_bad_allow_differences_entry_is_refused(entry, needle):
    d = spec_dict()
    d["allow_differences"] = entry
    with pytest.raises(ValueError, match="allow_differences") as err:
        SweepSpec.from_dict(d).plan()
    assert needle in str(err.value)


# -- C: a spec that gains variants or seeds extends its sweep -----------------------------------------


def test_an_added_variant_or_seed_extends_the_stored_sweep(tmp_path, lab_env):
    said: list[str] = []
    full = SweepSpec.from_dict(spec_dict())
    d = spec_dict()
    d["variants"] = d["variants"][:1]
    first = SweepSpec.from_dict(d)
    with Store(tmp_path / "lab.sqlite") as st:
        sid, created = register_sweep(st, first, progress=False, say=said.append)
        assert created and not said
        again, created = register_sweep(st, full, progress=False, say=said.append)
        assert (again, created) == (sid, False)
        assert said == [f"sweep {sid}: spec changed: added variant(s) cosine; stored spec updated"]
        stored = json.loads(st.sweep(sid)["spec_json"])
        assert [v["name"] for v in stored["variants"]] == ["linear", "cosine"]
        assert st.sweep(sid)["fingerprint"] == full.fingerprint()
        res = st.results(sid)
        assert res.variants == ["linear", "cosine"]
        assert [(r.variant, r.seed) for r in res.runs] == [("linear", 0), ("cosine", 0)]

        # a finished sweep is reopened for what is new: seeds added, positions follow the spec
        st.mark_sweep_finished(sid)
        more = full.with_changes(seeds=(0, 1))
        assert register_sweep(st, more, progress=False, say=said.append) == (sid, False)
        assert said[-1] == f"sweep {sid}: spec changed: added seed(s) 1; stored spec updated"
        assert st.sweep(sid)["finished_at"] is None
        rows = st.runs(sid)
        assert [(r["variant"], r["seed"], r["position"]) for r in rows] == [
            ("linear", 0, 0), ("linear", 1, 1), ("cosine", 0, 2), ("cosine", 1, 3)]
        assert json.loads(st.sweep(sid)["spec_json"])["seeds"] == [0, 1]

        # the same spec again: nothing to say; --new: a fresh sweep
        n = len(said)
        assert register_sweep(st, more, progress=False, say=said.append) == (sid, False)
        assert len(said) == n
        other, created = register_sweep(st, more, new=True, progress=False, say=said.append)
        assert created and other != sid
        # a changed configuration of a stored run is another sweep
        changed, created = register_sweep(st, more.with_changes(settings=["train.lr=1e-3"]), progress=False,
                                          say=said.append)
        assert created and changed not in (sid, other)


def test_compare_reports_a_variant_added_to_a_started_sweep(tmp_path, cache, lab_env):
    spec_file = write_spec(tmp_path)
    store = tmp_path / "runs" / "lab.sqlite"
    d = spec_dict()
    d["variants"] = d["variants"][:1]
    with Store(store) as st:
        register_sweep(st, SweepSpec.from_dict(d).with_changes(settings=["train.tokens=2k"]), progress=False)
    proc = cli(["compare", "--spec", str(spec_file), "--store", str(store), "--quiet", "--tokens", "2k"], cache)
    assert "spec changed: added variant(s) cosine" in proc.stderr
    table = proc.stdout.split("Notes:")[0]
    assert "linear" in table and "cosine" in table
    with Store(store, create=False) as st:
        assert st.results(st.latest_sweep()).variants == ["linear", "cosine"]


# -- D: --set at compare ---------------------------------------------------------------------------


def test_a_setting_every_variant_overrides_is_warned_about(tmp_path, lab_env, capsys):
    spec = load_spec(write_spec(tmp_path))
    settings = ["model.moe.router=cosine", "model.moe.num_experts=8", "train.batch_size=8", "train.lr=1e-3"]
    # every variant sets its router; batch_size=8 is the base's own value: changes nothing, not overridden
    assert spec.ineffective_settings(settings) == ["model.moe.router=cosine"]
    assert spec.ineffective_settings([]) == []
    store = tmp_path / "runs" / "lab.sqlite"
    args = ["compare", "--spec", str(tmp_path / "spec.toml"), "--store", str(store), "--dry-run", "--no-estimate"]
    assert main(args + ["--set", "model.moe.router=cosine", "--set", "train.lr=1e-3"]) == 0
    captured = capsys.readouterr()
    warning = one_line_error(captured.err)
    assert "model.moe.router=cosine" in warning and "every variant" in warning
    assert "linear" in captured.out  # the plan is still printed


def test_an_empty_set_value_is_refused_naming_the_field(tmp_path, lab_env, capsys):
    store = tmp_path / "runs" / "lab.sqlite"
    args = ["compare", "--spec", str(write_spec(tmp_path)), "--store", str(store), "--dry-run"]
    for setting in ("train.lr=", "model.moe.router="):
        assert main(args + ["--set", setting]) == 2
        assert setting[:-1] in one_line_error(capsys.readouterr().err)


# -- E, F: refused before anything is written ---------------------------------------------------------


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_bad_jobs_is_refused_before_the_store_exists(tmp_path, lab_env, capsys, jobs):
    store = tmp_path / "runs" / "lab.sqlite"
    assert main(["compare", "--spec", str(write_spec(tmp_path)), "--store", str(store), "--jobs", jobs]) == 2
    assert "--jobs" in one_line_error(capsys.readouterr().err)
    assert not store.parent.exists()


def test_a_store_under_a_file_is_refused(tmp_path, lab_env, capsys):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="somefile.txt"):
        Store(blocker / "lab.sqlite")
    with pytest.raises(StoreError, match="somefile.txt"):
        Store(blocker / "deeper" / "lab.sqlite")
    store = blocker / "lab.sqlite"
    assert main(["compare", "--spec", str(write_spec(tmp_path)), "--store", str(store), "--quiet"]) == 2
    assert "somefile.txt" in one_line_error(capsys.readouterr().err)
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile.txt", "spec.toml"]


def test_report_out_must_name_a_file(tmp_path, lab_env, capsys):
    store = tmp_path / "lab.sqlite"
    with Store(store) as st:
        register_sweep(st, load_spec(write_spec(tmp_path)), progress=False)
    folder = tmp_path / "existing"
    folder.mkdir()
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("not a folder")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for out, needle in ((folder, "existing"), (blocker / "report.html", "somefile.txt"),
                        (blocker / "a" / "report.html", "somefile.txt")):
        assert main(["report", str(store), "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert needle in one_line_error(captured.err)
        assert captured.out == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert blocker.read_text() == "not a folder"
    from sparseroute.lab.report import write_report

    with Store(store, create=False) as st, pytest.raises(ValueError, match="existing"):
        write_report(st.results(st.latest_sweep()), folder)
