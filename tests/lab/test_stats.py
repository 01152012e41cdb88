"""sparseroute.lab.stats against independent references: scipy, statsmodels and hard-coded values
computed once with scipy/statsmodels (so a change on both sides is caught)."""

from __future__ import annotations

import gc
import math
from unittest import mock

import numpy as np
import pytest
from scipy import stats
from hypothesis import given, settings
from hypothesis import strategies as st
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW, ttost_ind

from sparseroute.lab.stats import (
    Comparison,
    MeanCI,
    NotTestable,
    PairResult,
    TOSTResult,
    WelchResult,
    compare,
    holm,
    margin_for,
    mean_ci,
    median_ratio_ci,
    t_cdf,
    t_ppf,
    tost,
    welch,
)

# Test PPL of 5 seeds: EQ_A/EQ_B differ by 0.1 with sd ~0.2 (equivalent at margin 1); FAR is
# ~3 PPL above EQ_A (different); WIDE_A/WIDE_B are too noisy to decide (inconclusive).
EQ_A = [30.1, 30.4, 29.8, 30.2, 30.0]
EQ_B = [30.2, 30.5, 30.0, 29.9, 30.4]
FAR = [33.0, 33.5, 33.1, 32.9, 33.3]
WIDE_A = [30.0, 32.0, 28.0, 31.5, 29.0]
WIDE_B = [30.5, 33.0, 28.5, 31.0, 30.5]

DFS = [0.5, 1.0, 2.5, 7.3, 30.0, 1000.0]


def rel(x: float, y: float) -> float:
    return abs(x - y) / max(abs(y), 1e-300)


# ------------------------------------------------------------------------- t distribution
# t_cdf / t_ppf are thin wrappers over scipy.stats.t that check their arguments.
@pytest.mark.parametrize("df", DFS)
def test_t_wrappers_agree_with_scipy(df: float) -> None:
    xs = [-1e5, -300.0, -40.0, -8.0, -3.0, -2.0, -1.0, -0.5, -0.01, -1e-9, 0.0, 1e-9, 0.01, 0.3, 1.0,
          1.96, 4.0, 12.0, 100.0, 1e4]
    for x in xs:
        c = t_cdf(x, df)
        assert type(c) is float and c == stats.t.cdf(x, df), (x, df)
    assert t_cdf(0.0, df) == 0.5
    for q in [1e-10, 1e-4, 0.005, 0.025, 0.05, 0.2, 0.45, 0.55, 0.8, 0.95, 0.975, 0.995, 0.9999]:
        x = t_ppf(q, df)
        assert type(x) is float and rel(x, stats.t.ppf(q, df)) < 1e-12, (q, df)
        assert rel(t_cdf(x, df), q) < 1e-11, (q, df)
    assert t_ppf(0.5, df) == 0.0
    assert t_ppf(0.9, df) == -t_ppf(1 - 0.9, df)  # antisymmetric for q > 0.5 (1 - q is exact)


def test_t_cdf_infinite_arguments_and_normal_limit() -> None:
    assert t_cdf(math.inf, 3.0) == 1.0 and t_cdf(-math.inf, 3.0) == 0.0
    assert math.isnan(t_cdf(math.nan, 3.0))
    assert rel(t_cdf(-1.5, math.inf), stats.norm.cdf(-1.5)) < 1e-13
    assert rel(t_ppf(0.025, math.inf), stats.norm.ppf(0.025)) < 1e-13


def test_tail_p_values_keep_relative_accuracy() -> None:
    # far apart groups: the one-sided and two-sided p-values are far below 1e-16, where 1 - cdf
    # would give 0; they come from the small tail (sf / cdf of the negated argument)
    a, b = [60.0, 60.1, 59.9, 60.05, 59.95], [30.0, 30.1, 29.9, 30.05, 29.95]
    r, w = tost(a, b, 1.0), welch(a, b)
    assert 0.0 < w.p < 1e-16 and rel(w.p, 2 * stats.t.sf(abs(w.t), w.df)) < 1e-12
    se = w.diff / w.t
    assert 0.0 < r.p_lower < 1e-16 and rel(r.p_lower, stats.t.sf((r.diff + 1.0) / se, r.df)) < 1e-12
    assert rel(r.p_upper, stats.t.cdf((r.diff - 1.0) / se, r.df)) < 1e-15
    assert r.p == r.p_upper and not r.equivalent


def test_t_known_values() -> None:
    # literals computed once with scipy 1.17
    assert rel(t_ppf(0.975, 4), 2.7764451051977934) < 1e-12
    assert rel(t_cdf(-2.0, 7.3), 0.041970519667051565) < 1e-12
    assert rel(1 - t_cdf(2.0, 2.5), 0.07869574787898295) < 1e-12


def test_t_bad_arguments() -> None:
    for df in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="degrees of freedom"):
            t_cdf(1.0, df)
        with pytest.raises(ValueError, match="degrees of freedom"):
            t_ppf(0.5, df)
    for q in (0.0, 1.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            t_ppf(q, 3.0)


# ------------------------------------------------------------------------- mean_ci
@pytest.mark.parametrize("values", [EQ_A, WIDE_B, [12.0, 13.5], [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]])
@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_mean_ci_matches_scipy_and_statsmodels(values: list[float], confidence: float) -> None:
    ci = mean_ci(values, confidence)
    arr = np.asarray(values)
    assert ci.n == len(values) and ci.confidence == confidence
    assert rel(ci.mean, arr.mean()) < 1e-14
    assert rel(ci.sd, arr.std(ddof=1)) < 1e-12
    lo, hi = stats.t.interval(confidence, len(arr) - 1, loc=arr.mean(), scale=stats.sem(arr))
    assert rel(ci.low, lo) < 1e-12 and rel(ci.high, hi) < 1e-12
    lo2, hi2 = DescrStatsW(arr).tconfint_mean(alpha=1 - confidence)
    assert rel(ci.low, lo2) < 1e-12 and rel(ci.high, hi2) < 1e-12


def test_mean_ci_single_value_and_no_spread() -> None:
    one = mean_ci([31.5])
    assert one.mean == 31.5 and one.n == 1
    assert math.isnan(one.sd) and math.isnan(one.low) and math.isnan(one.high)
    flat = mean_ci([2.0, 2.0, 2.0])
    assert flat == MeanCI(2.0, 0.0, 2.0, 2.0, 3, 0.95)


def test_mean_ci_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])
    with pytest.raises(ValueError, match="finite"):
        mean_ci([30.0, math.nan])
    with pytest.raises(ValueError, match="finite"):
        mean_ci([30.0, math.inf])
    for c in (0.0, 1.0, 95.0):
        with pytest.raises(ValueError, match="confidence"):
            mean_ci(EQ_A, c)


# ------------------------------------------------------------------------- welch and tost
def _random_pairs() -> list[tuple[list[float], list[float]]]:
    rng = np.random.default_rng(1234)
    out = []
    for na, nb, shift, sa, sb in [(2, 2, 0.3, 0.5, 0.5), (3, 7, 0.8, 0.2, 1.0), (5, 5, 0.05, 0.3, 0.3),
                                  (8, 4, 2.0, 1.5, 0.1), (4, 3, -0.6, 0.4, 0.9)]:
        out.append(((30 + sa * rng.standard_normal(na)).tolist(),
                    (30 + shift + sb * rng.standard_normal(nb)).tolist()))
    return out


CASES = [(EQ_A, EQ_B), (EQ_A, FAR), (WIDE_A, WIDE_B), *_random_pairs()]


@pytest.mark.parametrize(("a", "b"), CASES)
def test_welch_matches_scipy(a: list[float], b: list[float]) -> None:
    w = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert rel(w.diff, np.mean(a) - np.mean(b)) < 1e-12
    assert rel(w.t, ref.statistic) < 1e-10
    assert rel(w.df, ref.df) < 1e-12
    assert rel(w.p, ref.pvalue) < 1e-9


@pytest.mark.parametrize(("a", "b"), CASES)
@pytest.mark.parametrize("margin", [0.25, 1.0, 2.5])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_tost_matches_statsmodels(a: list[float], b: list[float], margin: float, alpha: float) -> None:
    r = tost(a, b, margin, alpha=alpha)
    p, (_, p1, df1), (_, p2, _) = ttost_ind(a, b, -margin, margin, usevar="unequal")
    assert (r.low, r.high, r.alpha) == (-margin, margin, alpha)
    assert rel(r.p_lower, p1) < 1e-9 and rel(r.p_upper, p2) < 1e-9 and rel(r.p, p) < 1e-9
    assert rel(r.df, df1) < 1e-12
    lo, hi = CompareMeans.from_data(np.asarray(a), np.asarray(b)).tconfint_diff(
        alpha=2 * alpha, usevar="unequal")
    assert rel(r.ci_low, lo) < 1e-10 and rel(r.ci_high, hi) < 1e-10
    assert r.equivalent == (p < alpha)
    # TOST at alpha is the (1 - 2·alpha) interval lying inside the bounds
    assert r.equivalent == (-margin < r.ci_low and r.ci_high < margin)


def test_known_p_values() -> None:
    # literals computed once with scipy 1.17 / statsmodels 0.14 (ttost_ind, usevar="unequal")
    r = tost(EQ_A, EQ_B, 1.0)
    assert rel(r.p, 0.00018571510351918994) < 1e-9
    assert rel(r.p_upper, 4.777009353249306e-05) < 1e-9
    assert rel(r.df, 7.866171003717462) < 1e-12
    assert rel(welch(EQ_A, EQ_B).p, 0.5284786631222075) < 1e-9
    assert rel(welch(EQ_A, FAR).p, 3.180527840102949e-08) < 1e-9
    assert rel(tost(WIDE_A, WIDE_B, 1.0).p, 0.3548614704587128) < 1e-9


def test_equivalent_different_inconclusive() -> None:
    c = compare({"cosine": EQ_A, "hash": EQ_B, "far": FAR})
    assert c.pair("cosine", "hash").verdict == "equivalent"
    assert c.pair("cosine", "hash").tost.equivalent
    far = c.pair("cosine", "far")
    assert far.verdict == "different" and not far.tost.equivalent and far.welch.p < 0.05
    wide = compare({"a": WIDE_A, "b": WIDE_B}).pairs[0]
    assert wide.verdict == "inconclusive"
    assert not wide.tost.equivalent and wide.welch.p >= 0.05


def test_verdict_from_results() -> None:
    w = WelchResult(diff=0.0, t=0.0, df=4.0, p=0.01)
    t_eq = TOSTResult(0.0, -1.0, 1.0, 0.01, 0.01, 0.01, 4.0, -0.5, 0.5, 0.05, True)
    t_no = TOSTResult(0.0, -1.0, 1.0, 0.2, 0.2, 0.2, 4.0, -1.5, 1.5, 0.05, False)
    assert PairResult("a", "b", w, t_eq, "").verdict == "equivalent"
    assert PairResult("a", "b", w, t_no, "").verdict == "different"
    assert PairResult("a", "b", WelchResult(0.0, 0.0, 4.0, 0.3), t_no, "").verdict == "inconclusive"
    assert PairResult("a", "b", None, None, "1 seed of 'b': no test").verdict == "no test"


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
def test_welch_with_one_zero_variance_matches_scipy() -> None:
    a, b = [30.0, 30.0, 30.0], [30.5, 31.0, 30.2]
    ref = stats.ttest_ind(a, b, equal_var=False)
    w = welch(a, b)
    assert rel(w.t, ref.statistic) < 1e-10 and rel(w.p, ref.pvalue) < 1e-9


# ------------------------------------------------------------------------- untestable cases
def test_one_seed() -> None:
    for fn in (welch, lambda a, b: tost(a, b, 1.0)):
        with pytest.raises(NotTestable, match="1 seed"):
            fn([30.0], EQ_B)
        with pytest.raises(NotTestable, match="1 seed"):
            fn(EQ_A, [30.0])
    assert issubclass(NotTestable, ValueError)
    c = compare({"cosine": [30.2], "hash": EQ_B, "topk": EQ_A})
    assert math.isnan(c.summaries["cosine"].low) and c.summaries["cosine"].n == 1
    for other in ("hash", "topk"):
        p = c.pair("cosine", other)
        assert p.welch is None and p.tost is None and p.verdict == "no test"
        assert "1 seed" in p.note and "cosine" in p.note
    assert c.pair("hash", "topk").verdict == "equivalent" and c.pair("hash", "topk").note == ""
    notes = c.notes()
    assert any("cosine" in n and "1 seed" in n for n in notes)
    assert not any("hash" in n and "topk" in n for n in notes)


def test_zero_variance_both_sides() -> None:
    with pytest.raises(NotTestable, match="identical"):
        welch([30.0, 30.0], [31.0, 31.0, 31.0])
    with pytest.raises(NotTestable, match="identical"):
        tost([30.0, 30.0], [31.0, 31.0], 1.0)
    c = compare({"x": [30.0, 30.0], "y": [30.0, 30.0]})
    p = c.pair("x", "y")
    assert p.verdict == "no test" and "identical" in p.note
    assert any("identical" in n for n in c.notes())


# ------------------------------------------------------------------------- compare
def test_compare_structure_and_lookup() -> None:
    groups = {"topk": EQ_A, "cosine": EQ_B, "hash": FAR, "relu": WIDE_A}
    c = compare(groups, alpha=0.1, confidence=0.9)
    assert isinstance(c, Comparison)
    assert list(c.summaries) == list(groups)
    assert c.summaries["hash"] == mean_ci(FAR, 0.9)
    names = list(groups)
    expected = [(names[i], names[j]) for i in range(4) for j in range(i + 1, 4)]
    assert [(p.a, p.b) for p in c.pairs] == expected
    assert (c.margin, c.relative_margin, c.reference, c.alpha, c.confidence) == (1.0, None, "topk", 0.1, 0.9)
    p = c.pair("hash", "cosine")
    assert (p.a, p.b) == ("cosine", "hash") and p is c.pair("cosine", "hash")
    assert p.tost == tost(EQ_B, FAR, 1.0, alpha=0.1) and p.welch == welch(EQ_B, FAR)
    with pytest.raises(KeyError, match="topk.*nope"):
        c.pair("topk", "nope")
    assert c.notes() == []


def test_relative_margin() -> None:
    groups = {"ref": [50.0, 50.5, 49.5], "x": [50.2, 50.9, 49.9], "y": [40.0, 40.3, 40.1]}
    c = compare(groups, margin=0.02, relative=True)
    assert c.relative_margin == 0.02 and c.reference == "ref"
    assert rel(c.margin, 0.02 * 50.0) < 1e-14
    assert c.pair("ref", "x").tost.high == c.margin
    assert c.pair("ref", "x").tost == tost(groups["ref"], groups["x"], c.margin)
    c2 = compare(groups, margin=0.02, relative=True, reference="y")
    assert rel(c2.margin, 0.02 * np.mean(groups["y"])) < 1e-14 and c2.reference == "y"
    assert margin_for(1.5, relative=False, reference_mean=None) == 1.5
    assert margin_for(1.5, relative=False, reference_mean=30.0) == 1.5
    assert rel(margin_for(0.02, relative=True, reference_mean=30.0), 0.6) < 1e-14


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="reference"):
        margin_for(0.02, relative=True, reference_mean=None)
    with pytest.raises(ValueError, match="margin"):
        margin_for(0.0, relative=False, reference_mean=None)
    with pytest.raises(ValueError, match="margin"):
        tost(EQ_A, EQ_B, 0.0)
    with pytest.raises(ValueError, match="margin"):
        tost(EQ_A, EQ_B, -1.0)
    with pytest.raises(ValueError, match="alpha"):
        tost(EQ_A, EQ_B, 1.0, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        tost(EQ_A, EQ_B, 1.0, alpha=0.0)
    with pytest.raises(ValueError, match="'hash'.*'relu'|'relu'.*'hash'"):
        compare({"topk": EQ_A, "hash": [], "relu": []})
    with pytest.raises(ValueError, match="nope.*topk.*cosine"):
        compare({"topk": EQ_A, "cosine": EQ_B}, reference="nope")
    with pytest.raises(ValueError, match="cosine.*finite"):
        compare({"topk": EQ_A, "cosine": [30.0, math.nan]})
    with pytest.raises(ValueError, match="margin"):
        compare({"topk": EQ_A, "cosine": EQ_B}, margin=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        compare({"topk": EQ_A, "cosine": EQ_B}, alpha=0.7)
    with pytest.raises(ValueError, match="confidence"):
        compare({"topk": EQ_A, "cosine": EQ_B}, confidence=1.2)
    with pytest.raises(ValueError, match="no variants"):
        compare({})


def test_median_ratio_ci_brackets_the_ratio_and_narrows_with_repeats() -> None:
    rng = np.random.default_rng(1)
    a = list(1.1 + 0.1 * rng.random(9))
    b = list(1.0 + 0.1 * rng.random(9))
    lo, hi = median_ratio_ci(a, b)
    assert 1.0 < lo <= float(np.median(a) / np.median(b)) <= hi
    assert median_ratio_ci([2.0] * 5, [1.0] * 5) == (2.0, 2.0)
    assert median_ratio_ci(a, b) == (lo, hi)  # seeded
    narrow = median_ratio_ci(a * 8, b * 8)  # the same spread, 8x the pairs
    assert narrow[1] - narrow[0] < 0.7 * (hi - lo)
    wider = median_ratio_ci(a, b, confidence=0.99)
    assert wider[0] <= lo and hi <= wider[1]


def test_median_ratio_ci_matches_scipy_bootstrap() -> None:
    rng = np.random.default_rng(2)
    a = 1.2 + 0.2 * rng.random(15)
    b = 1.0 + 0.2 * rng.random(15)
    ours = median_ratio_ci(list(a), list(b), draws=20000)
    ref = stats.bootstrap(
        (a, b), lambda x, y: np.median(x) / np.median(y), paired=True, vectorized=False,
        n_resamples=20000, method="percentile", random_state=0,
    ).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.02) and ours[1] == pytest.approx(ref.high, abs=0.02)


@pytest.mark.parametrize(
    "a, b, kwargs, needle",
    [
        ([1.0, 2.0], [1.0], {}, "paired"),
        ([], [], {}, "no values"),
        ([1.0], [0.0], {}, "> 0"),
        ([1.0], [float("nan")], {}, "finite"),
        ([1.0], [1.0], {"confidence": 1.0}, "confidence"),
        ([1.0], [1.0], {"draws": 0}, "draws"),
    ],
)
def test_median_ratio_ci_bad_inputs(a, b, kwargs, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        median_ratio_ci(a, b, **kwargs)


# ------------------------------------------------------------------------- Holm correction
def _holm_reference(p) -> list[float]:
    # multipletests runs gc.collect() on every call, which takes ~0.1 s in a process with torch
    # loaded; it has no bearing on the result
    with mock.patch.object(gc, "collect", lambda *args: 0):
        return multipletests(np.asarray(p, dtype=float), method="holm")[1].tolist()


def test_holm_matches_statsmodels_on_random_vectors() -> None:
    rng = np.random.default_rng(2025)
    for trial in range(2000):
        m = int(rng.integers(1, 60))
        p = rng.random(m)
        kind = trial % 5
        if kind == 1:
            p = np.round(p, 1)  # many ties, and 0 and 1 themselves
        elif kind == 2:
            p[rng.random(m) < 0.4] = 1.0
        elif kind == 3:
            p = p ** 12  # tiny values, some adjusted far below 1
        elif kind == 4:
            p = np.repeat(p[: max(1, m // 3)], 3)  # every value three times
        ours = holm(p.tolist())
        ref = _holm_reference(p)
        assert len(ours) == len(ref)
        assert np.allclose(ours, ref, rtol=1e-14, atol=0), (p, ours, ref)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=40))
def test_holm_property(p: list[float]) -> None:
    adj = holm(p)
    assert np.allclose(adj, _holm_reference(p), rtol=1e-14, atol=0)
    m = len(p)
    for raw, a in zip(p, adj):
        assert raw <= a <= min(1.0, m * raw) or a == 1.0
    for i in range(m):  # the adjustment keeps the order of the p-values
        for j in range(m):
            if p[i] <= p[j]:
                assert adj[i] <= adj[j]


def test_holm_small_cases_and_bad_inputs() -> None:
    assert holm([]) == []
    assert holm([0.03]) == [0.03]
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm((0.5, 0.5)) == [1.0, 1.0]
    for bad in ([0.1, math.nan], [-0.01], [1.5]):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            holm(bad)


# linear vs cosine: raw TOST p 0.032 (equivalent), Holm over the 3 pairs 0.095 (inconclusive)
HOLM_A = [30.0, 30.8, 29.2, 30.5, 29.5]
HOLM_B = [30.1, 30.6, 29.3, 30.9, 29.4]


def test_compare_adjusts_tost_and_welch_separately_over_the_testable_pairs() -> None:
    groups = {"topk": EQ_A, "cosine": EQ_B, "hash": FAR, "relu": WIDE_A, "one": [30.0]}
    c = compare(groups)
    assert c.correction == "holm"
    tested = [p for p in c.pairs if p.tost is not None]
    assert c.family_size == len(tested) == 6  # the pairs of "one" are not tested
    assert [p.tost_p_adjusted for p in tested] == holm([p.tost.p for p in tested])
    assert [p.welch_p_adjusted for p in tested] == holm([p.welch.p for p in tested])
    assert all(p.correction == "holm" for p in tested)
    for p in c.pairs:
        if p.tost is None:
            assert (p.tost_p_adjusted, p.welch_p_adjusted, p.tost_p_used, p.verdict) == (None, None, None, "no test")
    # the raw results stay as they were
    assert c.pair("topk", "cosine").tost == tost(EQ_A, EQ_B, 1.0)
    assert c.pair("topk", "cosine").welch == welch(EQ_A, EQ_B)
    raw = compare(groups, correction=None)
    assert raw.correction is None and raw.family_size == 6
    assert all(p.tost_p_adjusted is None and p.welch_p_adjusted is None for p in raw.pairs)
    assert [p.tost for p in raw.pairs] == [p.tost for p in c.pairs]
    with pytest.raises(ValueError, match="correction"):
        compare(groups, correction="bonferroni")


def test_holm_turns_a_raw_equivalence_inconclusive() -> None:
    groups = {"linear": HOLM_A, "cosine": HOLM_B, "far": FAR}
    pair = compare(groups).pair("linear", "cosine")
    assert pair.tost.p < 0.05 and pair.tost.equivalent  # the raw TOST concludes
    assert pair.tost_p_adjusted == pytest.approx(3 * pair.tost.p) and pair.tost_p_adjusted >= 0.05
    assert pair.verdict == "inconclusive" and pair.raw_verdict == "equivalent"
    assert compare(groups).pair("linear", "far").verdict == "different"
    raw = compare(groups, correction=None).pair("linear", "cosine")
    assert raw.verdict == raw.raw_verdict == "equivalent"
    # alone, the pair is a family of one: Holm changes nothing
    alone = compare({"linear": HOLM_A, "cosine": HOLM_B}).pairs[0]
    assert alone.tost_p_adjusted == alone.tost.p and alone.verdict == "equivalent"


def test_verdict_uses_the_adjusted_p_values() -> None:
    w = WelchResult(diff=0.0, t=0.0, df=4.0, p=0.02)
    t_eq = TOSTResult(0.0, -1.0, 1.0, 0.01, 0.01, 0.01, 4.0, -0.5, 0.5, 0.05, True)
    t_no = TOSTResult(0.0, -1.0, 1.0, 0.2, 0.2, 0.2, 4.0, -1.5, 1.5, 0.05, False)
    p = PairResult("a", "b", w, t_eq, "", tost_p_adjusted=0.06, welch_p_adjusted=0.04, correction="holm")
    assert p.verdict == "different" and p.raw_verdict == "equivalent" and p.tost_p_used == 0.06
    p = PairResult("a", "b", w, t_no, "", tost_p_adjusted=0.6, welch_p_adjusted=0.06, correction="holm")
    assert p.verdict == "inconclusive" and p.raw_verdict == "different" and p.welch_p_used == 0.06
    p = PairResult("a", "b", w, t_eq, "", tost_p_adjusted=0.03, welch_p_adjusted=0.06, correction="holm")
    assert p.verdict == p.raw_verdict == "equivalent"
    assert PairResult("a", "b", w, t_eq, "").tost_p_used == 0.01  # no correction: the raw p
