"""The sweep cost estimate printed by ``compare --dry-run``: a run's seconds from a measured
step, the plan placed on the workers, and finished runs' times taken from the store."""

from __future__ import annotations

import pytest

from sparseroute.lab import estimate
from sparseroute.lab.estimate import Estimate, estimate_sweep, format_duration, measure_step_seconds, run_seconds
from sparseroute.lab.spec import SweepSpec, Variant
from sparseroute.lab.store import Store


def _spec(name="est") -> SweepSpec:
    base = {
        "model": {"preset": "tiny", "d_model": 64, "n_layers": 1, "n_heads": 2, "d_ff": 128},
        "data": {"corpus": "stdlib", "max_bytes": 200_000},
        "train": {"tokens": 8 * 64 * 5, "batch_size": 8, "seq_len": 64, "eval_tokens": 8 * 64 * 2},
    }
    return SweepSpec(name=name, base=base, variants=[Variant("a", {}), Variant("b", {"model": {"moe": {"num_experts": 4}}})],
                     seeds=[0, 1, 2], reference="a")


def test_run_seconds_counts_steps_and_evaluations():
    plan = _spec().plan()
    cfg = plan[0].config
    assert cfg.train.steps == 5
    # 5 steps, and the final validation and test evaluations of 2 batches each at a third of a step
    assert run_seconds(cfg, 1.0) == pytest.approx(5 + 2 * 2 / 3)


def test_measured_step_is_positive_and_restores_threads():
    import torch

    before = torch.get_num_threads()
    s = measure_step_seconds(_spec().plan()[0].config, steps=1, threads=1)
    assert 0 < s < 30
    assert torch.get_num_threads() == before


def test_plan_is_placed_on_the_workers(monkeypatch):
    monkeypatch.setattr(estimate, "measure_step_seconds", lambda cfg, **kw: 1.0 if cfg.model.moe is None else 3.0)
    spec = _spec()
    plan = spec.plan()
    one = estimate_sweep(spec, plan, jobs=1)
    two = estimate_sweep(spec, plan, jobs=2)
    a, b = one.per_variant["a"], one.per_variant["b"]
    assert b > a
    assert one.seconds == pytest.approx(3 * a + 3 * b)
    # two workers: never more than one, never less than half of it or than the longest run
    assert max(b, one.seconds / 2) <= two.seconds < one.seconds
    assert all(src.startswith("2 timed steps (a lower bound") for src in one.sources.values())
    assert "with --jobs 2" in two.line()


def test_finished_runs_replace_the_measurement_and_scale_the_rest(tmp_path, monkeypatch):
    calls = []

    def timed(cfg, **kw):
        calls.append(cfg)
        return 1.0 if cfg.model.moe is None else 3.0

    monkeypatch.setattr(estimate, "measure_step_seconds", timed)
    spec = _spec("est-store")
    plan = spec.plan()
    store = Store(tmp_path / "lab.sqlite")
    try:
        from sparseroute.lab.runner import register_sweep

        sweep_id, _ = register_sweep(store, spec, progress=False)
        run_a = next(r for r in store.runs(sweep_id) if r["variant"] == "a")
        store.conn.execute("UPDATE runs SET status = 'done', train_seconds = 120.0 WHERE id = ?", (run_a["id"],))
        e = estimate_sweep(spec, plan, jobs=1, store=store)
    finally:
        store.close()
    assert e.per_variant["a"] == pytest.approx(120.0)
    assert e.sources["a"] == "finished runs"
    # a is timed too: its real 120 s over its timed figure scales b's timed figure
    timed_a, timed_b = run_seconds(plan[0].config, 1.0), run_seconds(plan[0].config, 3.0)
    assert e.per_variant["b"] == pytest.approx(timed_b * 120.0 / timed_a)
    assert "x " in e.sources["b"] and "overhead" in e.sources["b"]
    assert sorted(c.model.moe is None for c in calls) == [False, True]


def test_format_duration():
    assert format_duration(59.4) == "59 s"
    assert format_duration(61) == "1 min 01 s"
    assert format_duration(3 * 3600 + 5 * 60 + 9) == "3 h 05 min"
    assert isinstance(Estimate(seconds=1, jobs=1, threads=1).line(), str)


def test_dry_run_prints_the_estimate_and_creates_nothing(tmp_path, monkeypatch, capsys):
    from sparseroute.cli import main

    monkeypatch.setattr(estimate, "measure_step_seconds", lambda cfg, **kw: 2.0)
    monkeypatch.setenv("COLUMNS", "200")
    store = tmp_path / "runs" / "lab.sqlite"
    assert main(["compare", "--preset", "quick", "--dry-run", "--jobs", "2", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("estimated wall-clock"))
    assert "with --jobs 2" in line and "linear" in line
    assert not store.exists()
    assert main(["compare", "--preset", "quick", "--dry-run", "--no-estimate", "--store", str(store)]) == 0
    assert "estimated wall-clock" not in capsys.readouterr().out


def test_finished_runs_of_another_budget_do_not_count(tmp_path, monkeypatch):
    monkeypatch.setattr(estimate, "measure_step_seconds", lambda cfg, **kw: 1.0)
    spec = _spec("est-budget")
    store = Store(tmp_path / "lab.sqlite")
    try:
        from sparseroute.lab.runner import register_sweep

        sweep_id, _ = register_sweep(store, spec, progress=False)
        store.conn.execute("UPDATE runs SET status = 'done', train_seconds = 120.0 WHERE sweep_id = ?", (sweep_id,))
        longer = spec.with_changes(settings=["train.tokens=5120"])  # twice the steps
        e = estimate_sweep(longer, longer.plan(), jobs=1, store=store)
    finally:
        store.close()
    assert not any(src == "finished runs" for src in e.sources.values())
