"""The seeds planner (tost_power, seeds_needed, plan_seeds), `report --plan-seeds` and
`--no-correction` on `report` and `compare`, on a small store built in-process (no training)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from sparseroute.lab.stats import (
    MeanCI,
    SeedPlan,
    compare,
    plan_seeds,
    pooled_sd,
    seeds_needed,
    tost,
    tost_power,
)

# test PPL of 5 seeds: linear vs cosine is equivalent from its raw TOST p (0.032) but not after
# Holm over the 3 pairs (0.095); far is ~3 PPL above both (different either way)
LINEAR = [30.0, 30.8, 29.2, 30.5, 29.5]
COSINE = [30.1, 30.6, 29.3, 30.9, 29.4]
FAR = [33.0, 33.5, 33.1, 32.9, 33.3]
GROUPS = {"linear": LINEAR, "cosine": COSINE, "far": FAR}


# ------------------------------------------------------------------------- tost_power
def _monte_carlo(n: int, sd: float, margin: float, diff: float, draws: int, seed: int) -> float:
    """Share of simulated sweeps (n normal seeds per variant) in which our tost() concludes."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, sd, size=(draws, n)) + 30.0
    b = rng.normal(-diff, sd, size=(draws, n)) + 30.0  # mean(a) - mean(b) = diff
    return sum(tost(x, y, margin).equivalent for x, y in zip(a.tolist(), b.tolist())) / draws


@pytest.mark.parametrize(
    ("n", "sd", "margin", "diff"),
    [(2, 0.1, 1.0, 0.0), (3, 0.3, 1.0, 0.0), (5, 1.2, 2.0, 0.0), (4, 0.35, 1.0, 0.4)],
)
def test_tost_power_matches_a_simulation_of_our_tost(n, sd, margin, diff) -> None:
    draws = 20_000
    exact = tost_power(n, sd, margin, 0.05, diff)
    simulated = _monte_carlo(n, sd, margin, diff, draws, seed=n * 1000 + int(sd * 100))
    se = math.sqrt(exact * (1 - exact) / draws)
    assert 0.05 < exact < 0.999  # a case where the check has teeth
    assert abs(simulated - exact) < 4 * se, (exact, simulated, se)


def test_pooled_power_matches_a_simulation_of_the_pooled_tost() -> None:
    # df="pooled": Student t with 2n-2 df; at small n it differs from the Welch power (the default)
    rng = np.random.default_rng(7)
    n, sd, margin, draws = 3, 0.3, 1.0, 200_000
    a, b = rng.normal(0.0, sd, size=(draws, n)), rng.normal(0.0, sd, size=(draws, n))
    d = a.mean(1) - b.mean(1)
    se = np.sqrt((a.var(1, ddof=1) + b.var(1, ddof=1)) / n)
    tc = stats.t.isf(0.05, 2 * n - 2)
    simulated = np.mean((d - tc * se > -margin) & (d + tc * se < margin))
    exact = tost_power(n, sd, margin, df="pooled")
    assert abs(simulated - exact) < 4 * math.sqrt(exact * (1 - exact) / draws)
    assert exact - tost_power(n, sd, margin) > 0.03  # Welch's smaller df costs power at n = 3


def test_tost_power_properties() -> None:
    # only sd/margin and diff/margin matter; the sign of diff does not
    assert tost_power(4, 0.5, 1.0, diff=0.2) == pytest.approx(tost_power(4, 1.0, 2.0, diff=0.4), abs=1e-8)
    assert tost_power(4, 0.5, 1.0, diff=0.2) == pytest.approx(tost_power(4, 0.5, 1.0, diff=-0.2), abs=1e-8)
    # more seeds, less spread, a wider margin or a larger alpha: more power
    assert tost_power(3, 0.5, 1.0) < tost_power(4, 0.5, 1.0) < tost_power(8, 0.5, 1.0)
    assert tost_power(5, 0.8, 1.0) < tost_power(5, 0.4, 1.0) < tost_power(5, 0.4, 1.5)
    assert tost_power(5, 0.5, 1.0, alpha=0.01) < tost_power(5, 0.5, 1.0, alpha=0.05)
    assert tost_power(5, 0.5, 1.0, diff=0.5) < tost_power(5, 0.5, 1.0)
    # many seeds: the power tends to 1 inside the margin and to 0 outside it
    assert tost_power(400, 1.0, 0.5) > 0.999
    assert tost_power(400, 1.0, 0.5, diff=0.7) < 1e-3
    for n in (2, 3, 10, 200):
        assert 0.0 <= tost_power(n, 0.3, 1.0) <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"n": 1}, "n must be"), ({"n": 2.5}, "n must be"), ({"sd": 0.0}, "sd"), ({"sd": math.nan}, "sd"),
     ({"sd": -1.0}, "sd"), ({"sd": math.inf}, "sd"), ({"margin": 0.0}, "margin"), ({"alpha": 0.5}, "alpha"),
     ({"diff": math.nan}, "difference"), ({"df": "student"}, "df")],
)
def test_tost_power_bad_arguments(kwargs, needle) -> None:
    args = {"n": 3, "sd": 0.5, "margin": 1.0, **kwargs}
    with pytest.raises(ValueError, match=needle):
        tost_power(args.pop("n"), args.pop("sd"), args.pop("margin"), **args)


# ------------------------------------------------------------------------- seeds_needed
@pytest.mark.parametrize(
    ("sd", "margin", "alpha", "diff"),
    [(0.42, 1.0, 0.05, 0.0), (0.1, 1.0, 0.05, 0.0), (1.0, 1.0, 0.05, 0.0), (0.5, 1.0, 0.05 / 36, 0.0),
     (0.6, 1.0, 0.05, 0.3), (2.0, 0.5, 0.05, 0.0)],
)
def test_seeds_needed_is_the_smallest_n_reaching_the_power(sd, margin, alpha, diff) -> None:
    n = seeds_needed(sd, margin, alpha, 0.8, diff)
    assert n >= 2
    assert tost_power(n, sd, margin, alpha, diff) >= 0.8
    if n > 2:
        assert tost_power(n - 1, sd, margin, alpha, diff) < 0.8
    assert seeds_needed(sd, margin, alpha, 0.9, diff) >= n


def test_seeds_needed_known_values() -> None:
    assert seeds_needed(0.05, 1.0) == 2  # tiny spread: the fewest seeds a test needs
    assert seeds_needed(0.42, 1.0) == 5
    assert seeds_needed(0.42, 1.0, df="pooled") == 4  # the pooled df overstate the power


def test_seeds_needed_is_monotone_in_sd_and_margin() -> None:
    by_sd = [seeds_needed(sd, 1.0) for sd in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.3)]
    assert by_sd == sorted(by_sd) and by_sd[0] < by_sd[-1]
    by_margin = [seeds_needed(0.5, m) for m in (0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0, 4.0)]
    assert by_margin == sorted(by_margin, reverse=True) and by_margin[0] > by_margin[-1]
    by_diff = [seeds_needed(0.5, 1.0, diff=d) for d in (0.0, 0.1, 0.2, 0.4, 0.6)]
    assert by_diff == sorted(by_diff)


def test_seeds_needed_refuses_what_has_no_answer() -> None:
    for sd in (0.0, math.nan, -0.3, math.inf):
        with pytest.raises(ValueError, match="sd"):
            seeds_needed(sd, 1.0)
    with pytest.raises(ValueError, match="not inside the margin"):
        seeds_needed(0.5, 1.0, diff=1.0)
    with pytest.raises(ValueError, match="not inside the margin"):
        seeds_needed(0.5, 1.0, diff=-1.5)
    with pytest.raises(ValueError, match=r"more than 50 seeds per variant \(50 give \d+% power\)"):
        seeds_needed(3.0, 1.0, max_n=50)
    assert seeds_needed(3.0, 1.0, max_n=1000) > 50
    for max_n in (2, 3):  # below the first doubling
        with pytest.raises(ValueError, match=f"more than {max_n} seeds"):
            seeds_needed(1.0, 1.0, max_n=max_n)
    assert seeds_needed(0.5, 1.0, max_n=seeds_needed(0.5, 1.0)) == seeds_needed(0.5, 1.0)
    with pytest.raises(ValueError, match="power"):
        seeds_needed(0.5, 1.0, power=1.0)
    with pytest.raises(ValueError, match="max_n"):
        seeds_needed(0.5, 1.0, max_n=1)


# ------------------------------------------------------------------------- plan_seeds
def test_pooled_sd() -> None:
    a, b = np.asarray(LINEAR), np.asarray(FAR[:3])
    expected = math.sqrt((4 * a.var(ddof=1) + 2 * b.var(ddof=1)) / 6)
    c = compare({"a": LINEAR, "b": FAR[:3]})
    assert pooled_sd(c.summaries["a"], c.summaries["b"]) == pytest.approx(expected, rel=1e-12)
    one = MeanCI(30.0, math.nan, math.nan, math.nan, 1, 0.95)
    assert pooled_sd(one, c.summaries["a"]) == pytest.approx(a.std(ddof=1), rel=1e-12)  # a single seed adds nothing
    assert math.isnan(pooled_sd(one, one))


def test_plan_seeds_per_pair_against_the_reference() -> None:
    c = compare(GROUPS)
    plans = plan_seeds(c)
    assert [(p.a, p.b) for p in plans] == [("linear", "cosine"), ("linear", "far")]
    p = plans[0]
    assert isinstance(p, SeedPlan) and p.have == (5, 5) and p.family_size == 3 and p.power == 0.8
    assert p.sd == pytest.approx(pooled_sd(c.summaries["linear"], c.summaries["cosine"]))
    assert (p.margin, p.alpha, p.diff, p.note) == (1.0, 0.05, 0.0, "")
    assert p.needed == seeds_needed(p.sd, 1.0)
    assert p.needed_corrected == seeds_needed(p.sd, 1.0, alpha=0.05 / 3) > p.needed
    every = plan_seeds(c, every_pair=True)
    assert [(q.a, q.b) for q in every] == [("linear", "cosine"), ("linear", "far"), ("cosine", "far")]
    # without a correction there is no Holm plan
    raw = plan_seeds(compare(GROUPS, correction=None))
    assert raw[0].needed == p.needed and raw[0].needed_corrected is None
    # the observed difference: far is ~3 PPL off, outside the margin
    observed = plan_seeds(c, observed_diff=True)
    assert observed[0].diff == pytest.approx(np.mean(LINEAR) - np.mean(COSINE))
    assert observed[0].needed == seeds_needed(p.sd, 1.0, diff=observed[0].diff)
    assert observed[1].needed is None and "not inside the margin" in observed[1].note


def test_plan_seeds_without_spread_or_with_single_seeds() -> None:
    c = compare({"x": [30.0, 30.0], "y": [30.0, 30.0], "z": [31.0], "w": [30.5]})
    plans = {(p.a, p.b): p for p in plan_seeds(c, every_pair=True)}
    assert plans[("x", "y")].needed is None and "no spread" in plans[("x", "y")].note
    assert plans[("z", "w")].needed is None and "1 seed of each" in plans[("z", "w")].note
    with pytest.raises(ValueError, match="power"):
        plan_seeds(c, power=0.0)


# ------------------------------------------------------------------------- the commands
def _store(path: Path, groups: dict[str, list[float]]) -> int:
    """A finished sweep in a new store: one done run per (variant, seed) with its test PPL."""
    from sparseroute.lab.store import Store
    from sparseroute.models import preset
    from sparseroute.moe import MoEConfig
    from sparseroute.train.config import RunConfig, TrainConfig

    variants = list(groups)
    seeds = range(max(len(v) for v in groups.values()))
    spec = {"name": "routers", "variants": [{"name": v} for v in variants], "reference": variants[0],
            "margin": 1.0, "relative_margin": False}
    runs = []
    for v in variants:
        cfg = RunConfig(model=preset("tiny", moe=MoEConfig(router="topk", layers="every_other")),
                        train=TrainConfig(tokens=2560, batch_size=4, seq_len=64)).to_dict()
        runs += [(v, s, {**cfg, "train": {**cfg["train"], "seed": s}}) for s in seeds]
    with Store(path) as st:
        sid = st.create_sweep("routers", "fixture", spec, "routers-{id}", runs)
        for r in st.runs(sid):
            st.start_run(int(r["id"]), "fixture", {})
            ppl = groups[r["variant"]][int(r["seed"])]
            records = [{"step": s, "tokens": s * 256, "lr": 3e-3, "loss": 3.0 - 0.01 * s} for s in (10, 20)]
            final = {"test_ppl": ppl, "val_ppl": ppl + 0.1, "test_loss": math.log(ppl), "val_loss": math.log(ppl + 0.1),
                     "flops_per_token": {"experts": 1e6, "total": 3e6}, "train_seconds": 1.0}
            st.finish_run(int(r["id"]), final, records)
    return sid


@pytest.fixture
def store(tmp_path, monkeypatch) -> tuple[Path, int]:
    monkeypatch.setenv("COLUMNS", "300")  # rich: keep each printed line on one line
    db = tmp_path / "runs" / "lab.sqlite"
    return db, _store(db, GROUPS)


def _pair_line(out: str, a: str, b: str) -> str:
    return next(line.strip() for line in out.splitlines() if line.strip().startswith(f"{a} vs {b}: diff"))


def test_report_plan_seeds_prints_and_reports_the_plan(store, tmp_path, capsys) -> None:
    from sparseroute.cli import main

    db, sid = store
    out_html = tmp_path / "plan.html"
    assert main(["report", str(db), "--sweep", str(sid), "--out", str(out_html), "--plan-seeds"]) == 0
    out = capsys.readouterr().out
    c = compare(GROUPS)
    plans = plan_seeds(c)
    sd = plans[0].sd
    assert "Seeds per variant for TOST to conclude equivalence with 80% power (α=0.05, margin ±1 PPL, " \
           "true difference 0" in out
    assert (f"linear vs cosine: sd {sd:.3g} PPL, margin 1 PPL -> {plans[0].needed} seeds per variant for 80% "
            f"power (have 5); {plans[0].needed_corrected} with Holm over 3 pairs (at α/3)") in out
    assert f"linear vs far: sd {plans[1].sd:.3g} PPL, margin 1 PPL -> {plans[1].needed} seeds per variant" in out
    assert "cosine vs far: sd" not in out  # only against the reference
    doc = out_html.read_text(encoding="utf-8")
    table = re.search(r'<section id="seed-plan"><h2>Seeds needed</h2>.*?</section>', doc, re.S).group(0)
    assert 'id="seed-plan-table"' in table and "<th>with Holm over 3 pairs (α/3)</th>" in table
    row = re.search(r"<tr><td>linear</td><td>cosine</td>.*?</tr>", table).group(0)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)
    assert cells == ["linear", "cosine", f"{sd:.3f}", "1", "+0.000", "5", str(plans[0].needed),
                     str(plans[0].needed_corrected), ""]
    # without --plan-seeds: neither the lines nor the section
    assert main(["report", str(db), "--out", str(out_html)]) == 0
    assert "Seeds per variant" not in capsys.readouterr().out
    assert 'id="seed-plan"' not in out_html.read_text(encoding="utf-8")
    # other power, the observed difference
    assert main(["report", str(db), "--out", str(out_html), "--plan-seeds", "--plan-power", "0.9",
                 "--plan-observed-diff"]) == 0
    out = capsys.readouterr().out
    assert "with 90% power" in out and "true difference as observed" in out
    assert "linear vs far: sd" in out and "is not inside the margin ±1 PPL: no number of seeds gives 90% power" in out
    assert main(["report", str(db), "--plan-seeds", "--plan-power", "80"]) == 2
    assert "--plan-power" in capsys.readouterr().err


def test_report_holm_by_default_and_raw_with_no_correction(store, tmp_path, capsys) -> None:
    from sparseroute.cli import main

    db, sid = store
    out_html = tmp_path / "r.html"
    assert main(["report", str(db), "--out", str(out_html)]) == 0
    out = capsys.readouterr().out
    assert "TOST verdicts from Holm-adjusted p over 3 pairs" in out
    line = _pair_line(out, "linear", "cosine")
    assert "TOST p=0.032 (Holm 0.095)" in line and line.endswith("-> inconclusive (raw p: equivalent)")
    assert _pair_line(out, "linear", "far").endswith("-> different")
    row = next(ln for ln in out.splitlines() if re.match(r"\s*cosine\s+topk\s", ln))  # the table row
    assert "0.032" in row and "0.095" in row and "inconclusive" in row
    doc = out_html.read_text(encoding="utf-8")
    assert "verdicts from Holm-adjusted p over 3 pairs" in doc
    assert "<th>TOST p (Holm)</th>" in doc and "<th>Welch p (Holm)</th>" in doc
    assert "equivalent from the raw p" in doc

    assert main(["report", str(db), "--out", str(out_html), "--no-correction"]) == 0
    out = capsys.readouterr().out
    assert "TOST verdicts from raw p (no multiple-comparison correction)" in out
    line = _pair_line(out, "linear", "cosine")
    assert "Holm" not in line and line.endswith("-> equivalent")
    doc = out_html.read_text(encoding="utf-8")
    assert "TOST p (Holm)" not in doc and "No multiple-comparison correction" in doc


def test_compare_no_correction_reaches_the_summary(store, capsys, monkeypatch) -> None:
    """`compare --no-correction`: the summary after the sweep uses the raw verdicts (training and the
    sweep registration replaced by the finished fixture sweep)."""
    import sparseroute.kernels
    import sparseroute.lab.runner as runner
    from sparseroute.cli import main

    db, sid = store
    monkeypatch.setattr(sparseroute.kernels, "ensure_built", lambda **kw: True)
    monkeypatch.setattr(runner, "register_sweep", lambda *a, **kw: (sid, False))
    monkeypatch.setattr(runner, "run_sweep", lambda *a, **kw: {"done": 15})
    for flags, verdict in (([], "inconclusive (raw p: equivalent)"), (["--no-correction"], "equivalent")):
        assert main(["compare", "--preset", "quick", "--store", str(db), "--quiet", *flags]) == 0
        out = capsys.readouterr().out
        assert _pair_line(out, "linear", "cosine").endswith(f"-> {verdict}")
        assert "report:" in out
