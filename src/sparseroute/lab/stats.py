"""Statistics of the comparison lab: are two routing variants equivalent in test perplexity?

Each variant is trained over several seeds; its finished seeds give one test PPL each.

* ``mean_ci``: per variant, the mean and its t-based confidence interval
  ``mean ± t_{(1+c)/2, n-1} · sd / √n`` (sample sd, ddof=1).
* ``welch``: Welch's unequal-variance t-test, deciding whether the means *differ*.
  ``diff = mean(a) - mean(b)``, ``se = sqrt(va/na + vb/nb)``, ``t = diff / se``, with the
  Welch–Satterthwaite ``df = se⁴ / ((va/na)²/(na-1) + (vb/nb)²/(nb-1))``; two-sided ``p``.
* ``tost``: two one-sided tests (TOST) with the same Welch ``se`` and ``df``, deciding whether
  the means are *equivalent* within ``(low, high) = (-margin, +margin)`` (the method of
  "Equifinality in Mixture of Experts", margin ±1 PPL). With ``T`` the Student-t CDF:
  ``p_lower = 1 - T((diff - low)/se)`` (H0: diff <= low), ``p_upper = T((diff - high)/se)``
  (H0: diff >= high), ``p = max(p_lower, p_upper)``. Equivalent iff both are < alpha, which is
  the same as the (1-2α) confidence interval of ``diff`` lying inside the bounds.
* ``median_ratio_ci``: a percentile-bootstrap interval of ``median(a) / median(b)`` for paired
  measurements (the benchmarks' timings of two variants run next to each other).

A pair's verdict is "equivalent" (TOST), "different" (not equivalent and Welch p < alpha),
"inconclusive" (neither) or "no test" (a variant has a single seed, or both have zero spread).

* ``holm``: the Holm–Bonferroni step-down adjustment of a family of p-values. :func:`compare`
  applies it (``correction="holm"``, the default) across the testable pairs of a sweep, once to
  the TOST p-values and once to the Welch p-values; each :class:`PairResult` keeps the raw
  p-values (``tost.p``, ``welch.p``) and carries the adjusted ones, and its verdict uses the
  adjusted ones (``correction=None``: the raw ones).
* ``tost_power`` / ``seeds_needed`` / ``plan_seeds``: the power of this TOST for two variants of
  ``n`` seeds each with a common between-seed sd, and the number of seeds per variant it takes to
  reach a power (80% by default) at the margin; :func:`plan_seeds` does it per pair of a
  comparison from the pooled sd of the pair's seeds.

The Student-t distribution is SciPy's (:data:`scipy.stats.t`): tail probabilities are taken
on the side they are small (``sf`` / ``cdf`` of the negated argument, never ``1 - cdf``), so tiny
p-values keep their relative accuracy. The Welch statistic is computed here rather than with
``scipy.stats.ttest_ind(equal_var=False)``: TOST needs its ``se`` and ``df`` as well, the test
must say plainly why it cannot be done (one seed, no spread), and one computation keeps Welch and
TOST of a pair consistent. :func:`t_cdf` and :func:`t_ppf` are thin wrappers that check their
arguments.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from scipy import integrate, special, stats

_t = stats.t
CORRECTIONS = ("holm", None)  # the multiple-comparison corrections compare() knows


class NotTestable(ValueError):
    """A test cannot be done on these data (too few seeds, or no spread at all)."""


def _check_df(df: float) -> None:
    if not df > 0:  # also rejects nan
        raise ValueError(f"degrees of freedom must be > 0, got {df}")


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` (> 0, may be non-integer or inf) degrees of freedom."""
    _check_df(df)
    return float(_t.cdf(x, df))


def t_ppf(q: float, df: float) -> float:
    """The x with ``t_cdf(x, df) == q``, for 0 < q < 1 (exactly antisymmetric about q = 0.5)."""
    _check_df(df)
    if not 0.0 < q < 1.0:  # also rejects nan
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    # upper half through the upper tail: 1 - q is exact for q >= 0.5, and isf(p) == -ppf(p)
    return float(_t.ppf(q, df)) if q < 0.5 else float(_t.isf(1.0 - q, df))


@dataclass(frozen=True)
class MeanCI:
    """Mean of a variant's seeds with a t-based confidence interval (nan sd/bounds when n == 1)."""

    mean: float
    sd: float
    low: float
    high: float
    n: int
    confidence: float


def _values(values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError("no values given")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"values must be finite, got {bad}")
    return out


def _mean_var(xs: list[float]) -> tuple[float, float]:
    mean = math.fsum(xs) / len(xs)
    var = math.fsum((v - mean) ** 2 for v in xs) / (len(xs) - 1) if len(xs) > 1 else math.nan
    return mean, var


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Mean, sample sd and ``mean ± t_{(1+c)/2, n-1}·sd/√n``; with one value only the mean is known."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xs = _values(values)
    (mean, var), n = _mean_var(xs), len(xs)
    if n == 1:
        return MeanCI(mean, math.nan, math.nan, math.nan, 1, confidence)
    sd = math.sqrt(var)
    half = float(_t.isf((1.0 - confidence) / 2.0, n - 1)) * sd / math.sqrt(n)  # t_{(1+c)/2, n-1}
    return MeanCI(mean, sd, mean - half, mean + half, n, confidence)


def median_ratio_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, draws: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``median(a) / median(b)``, where ``a[i]`` and ``b[i]`` were
    measured next to each other: the pairs are resampled together, keeping each pair's shared
    moment of the machine's speed. Seeded, so the same inputs give the same interval."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    xa, xb = _values(a), _values(b)
    if len(xa) != len(xb):
        raise ValueError(f"a and b must be paired (the same length), got {len(xa)} and {len(xb)}")
    if any(v <= 0 for v in xb):
        raise ValueError("the values of b must be > 0 (they divide)")
    rng, n = random.Random(seed), len(xa)
    ratios = []
    for _ in range(draws):
        pick = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(xa[i] for i in pick) / statistics.median(xb[i] for i in pick))
    ratios.sort()
    tail = (1.0 - confidence) / 2.0
    return ratios[int(tail * (draws - 1))], ratios[int((1.0 - tail) * (draws - 1))]


@dataclass(frozen=True)
class WelchResult:
    """Welch's t-test of mean(a) - mean(b) == 0 (two-sided ``p``)."""

    diff: float
    t: float
    df: float
    p: float


def _welch_parts(a: Sequence[float], b: Sequence[float], names: tuple[str, str] = ("a", "b")
                 ) -> tuple[float, float, float]:
    """(diff, se, Welch–Satterthwaite df), or NotTestable saying why plainly."""
    xa, xb = _values(a), _values(b)
    few = [f"'{nm}'" for nm, xs in zip(names, (xa, xb)) if len(xs) < 2]
    if few:
        raise NotTestable(f"only 1 seed of {' and of '.join(few)}: no test")
    (ma, va), (mb, vb) = _mean_var(xa), _mean_var(xb)
    ua, ub = va / len(xa), vb / len(xb)
    if ua + ub == 0.0:
        raise NotTestable(f"all seeds of '{names[0]}' and of '{names[1]}' are identical "
                          "(zero variance): no test")
    df = (ua + ub) ** 2 / (ua * ua / (len(xa) - 1) + ub * ub / (len(xb) - 1))
    return ma - mb, math.sqrt(ua + ub), df


def welch(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """Welch's unequal-variance t-test; NotTestable with fewer than 2 values or zero variance."""
    return _welch(*_welch_parts(a, b))


def _welch(diff: float, se: float, df: float) -> WelchResult:
    t = diff / se
    return WelchResult(diff, t, df, min(1.0, 2.0 * float(_t.sf(abs(t), df))))


@dataclass(frozen=True)
class TOSTResult:
    """Two one-sided Welch tests of equivalence within (low, high)."""

    diff: float
    low: float
    high: float
    p_lower: float
    p_upper: float
    p: float
    df: float
    ci_low: float
    ci_high: float
    alpha: float
    equivalent: bool


def _tost(diff: float, se: float, df: float, margin: float, alpha: float) -> TOSTResult:
    p_lower = float(_t.sf((diff + margin) / se, df))  # = 1 - T((diff - low)/se), without cancellation
    p_upper = float(_t.cdf((diff - margin) / se, df))
    half = float(_t.isf(alpha, df)) * se  # t_{1-alpha, df}
    p = max(p_lower, p_upper)
    return TOSTResult(diff, -margin, margin, p_lower, p_upper, p, df, diff - half, diff + half,
                      alpha, p < alpha)


def _check_margin(margin: float, alpha: float = 0.05) -> None:
    if not (margin > 0 and math.isfinite(margin)):
        raise ValueError(f"equivalence margin must be a finite number > 0, got {margin}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")


def tost(a: Sequence[float], b: Sequence[float], margin: float, *, alpha: float = 0.05) -> TOSTResult:
    """TOST for |mean(a) - mean(b)| < margin with Welch variance (as statsmodels ``ttost_ind``)."""
    _check_margin(margin, alpha)
    return _tost(*_welch_parts(a, b), margin, alpha)


def margin_for(margin: float, *, relative: bool, reference_mean: float | None) -> float:
    """Absolute margin: ``margin`` itself, or ``margin * reference_mean`` when ``relative``
    (``margin`` is then a fraction, e.g. 0.02 = 2% of the reference variant's mean test PPL)."""
    _check_margin(margin)
    if not relative:
        return float(margin)
    if reference_mean is None:
        raise ValueError("a relative margin needs the reference variant's mean, and none was given")
    if not (reference_mean > 0 and math.isfinite(reference_mean)):
        raise ValueError(f"a relative margin needs a finite reference mean > 0, got {reference_mean}")
    return float(margin) * float(reference_mean)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given.

    With the ``m`` p-values sorted ascending, ``p_(0) <= … <= p_(m-1)``, the adjusted value of
    ``p_(i)`` is ``max over j <= i of min(1, (m - j) · p_(j))`` (the step-down is made monotone), the
    same as ``statsmodels.stats.multitest.multipletests(method="holm")[1]``. Rejecting where the
    adjusted value is < alpha keeps the chance of any false rejection in the family at most alpha,
    whatever the dependence between the tests. Ties get the same adjusted value."""
    ps = [float(p) for p in pvalues]
    bad = [p for p in ps if not 0.0 <= p <= 1.0]  # also rejects nan
    if bad:
        raise ValueError(f"p-values must be in [0, 1], got {bad}")
    m = len(ps)
    out = [0.0] * m
    running = 0.0
    for j, i in enumerate(sorted(range(m), key=ps.__getitem__)):
        running = max(running, min(1.0, (m - j) * ps[i]))
        out[i] = running
    return out


@dataclass(frozen=True)
class PairResult:
    """Both tests for one pair of variants (``None`` with a plain ``note`` when not testable).

    ``welch.p`` and ``tost.p`` (and ``tost.equivalent``) are the raw, per-pair values. With a
    multiple-comparison ``correction`` ("holm"), ``tost_p_adjusted`` and ``welch_p_adjusted`` are
    the adjusted p-values over the comparison's testable pairs and the verdict uses them; without
    (``None``, the adjusted fields ``None`` too) the verdict uses the raw ones."""

    a: str
    b: str
    welch: WelchResult | None
    tost: TOSTResult | None
    note: str
    tost_p_adjusted: float | None = None
    welch_p_adjusted: float | None = None
    correction: str | None = None

    @property
    def tost_p_used(self) -> float | None:
        """The TOST p-value the verdict uses: adjusted with a correction, else raw."""
        if self.tost is None:
            return None
        return self.tost_p_adjusted if self.tost_p_adjusted is not None else self.tost.p

    @property
    def welch_p_used(self) -> float | None:
        """The Welch p-value the verdict uses: adjusted with a correction, else raw."""
        if self.welch is None:
            return None
        return self.welch_p_adjusted if self.welch_p_adjusted is not None else self.welch.p

    @property
    def verdict(self) -> str:
        """One of "equivalent", "different", "inconclusive" or "no test": equivalent when the TOST
        p-value (adjusted, with a correction) is < alpha; different when not equivalent and the
        Welch p-value (adjusted likewise) is < alpha."""
        if self.welch is None or self.tost is None:
            return "no test"
        return _verdict(self.tost_p_used, self.welch_p_used, self.tost.alpha)

    @property
    def raw_verdict(self) -> str:
        """The verdict from the raw p-values, as without a correction."""
        if self.welch is None or self.tost is None:
            return "no test"
        return _verdict(self.tost.p, self.welch.p, self.tost.alpha)


def _verdict(tost_p: float, welch_p: float, alpha: float) -> str:
    if tost_p < alpha:
        return "equivalent"
    return "different" if welch_p < alpha else "inconclusive"


@dataclass(frozen=True)
class Comparison:
    """Per-variant summaries and every pairwise test of one sweep; ``correction`` is the
    multiple-comparison correction the pairs' verdicts use ("holm", or ``None``: raw p-values)."""

    summaries: dict[str, MeanCI]
    pairs: list[PairResult]
    margin: float
    relative_margin: float | None
    reference: str
    alpha: float
    confidence: float
    correction: str | None = None

    @property
    def family_size(self) -> int:
        """The number of testable pairs: the family a correction adjusts over."""
        return sum(p.tost is not None for p in self.pairs)

    def pair(self, a: str, b: str) -> PairResult:
        """The pair (a, b) in either order, as stored."""
        for p in self.pairs:
            if (p.a, p.b) in ((a, b), (b, a)):
                return p
        raise KeyError(f"no pair of '{a}' and '{b}' in this comparison")

    def notes(self) -> list[str]:
        """Plain-language lines on what could not be computed."""
        lines = [f"{name}: 1 seed — no confidence interval and no tests"
                 for name, s in self.summaries.items() if s.n < 2]
        single = {name for name, s in self.summaries.items() if s.n < 2}
        lines += [f"{p.a} vs {p.b}: {p.note}" for p in self.pairs
                  if p.note and p.a not in single and p.b not in single]
        return lines


def compare(groups: dict[str, Sequence[float]], *, margin: float = 1.0, relative: bool = False,
            alpha: float = 0.05, confidence: float = 0.95, reference: str | None = None,
            correction: str | None = "holm") -> Comparison:
    """Summarize each variant (test PPL of its finished seeds) and test every pair of variants.

    ``correction="holm"`` adjusts the TOST p-values of the testable pairs with :func:`holm`, and
    separately their Welch p-values; the verdicts use the adjusted values. ``None``: raw p-values."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    if not groups:
        raise ValueError("no variants to compare")
    empty = [name for name, vals in groups.items() if len(vals) == 0]
    if empty:
        raise ValueError(f"variants with no finished seeds: {', '.join(map(repr, empty))}")
    names = list(groups)
    if reference is None:
        reference = names[0]
    elif reference not in groups:
        raise ValueError(f"reference {reference!r} is not one of the variants: "
                         f"{', '.join(map(repr, names))}")
    _check_margin(margin, alpha)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    summaries: dict[str, MeanCI] = {}
    for name in names:
        try:
            summaries[name] = mean_ci(groups[name], confidence)
        except ValueError as e:
            raise ValueError(f"variant {name!r}: {e}") from None
    absolute = margin_for(margin, relative=relative,
                          reference_mean=summaries[reference].mean if relative else None)
    pairs: list[PairResult] = []
    for i, na in enumerate(names):
        for nb in names[i + 1:]:
            try:
                diff, se, df = _welch_parts(groups[na], groups[nb], (na, nb))
            except NotTestable as e:
                pairs.append(PairResult(na, nb, None, None, str(e).removeprefix("only ")))
                continue
            pairs.append(PairResult(na, nb, _welch(diff, se, df),
                                    _tost(diff, se, df, absolute, alpha), ""))
    if correction == "holm":
        tested = [i for i, p in enumerate(pairs) if p.tost is not None]
        tost_adj = holm([pairs[i].tost.p for i in tested])
        welch_adj = holm([pairs[i].welch.p for i in tested])
        for i, pt, pw in zip(tested, tost_adj, welch_adj):
            pairs[i] = replace(pairs[i], tost_p_adjusted=pt, welch_p_adjusted=pw, correction=correction)
    return Comparison(summaries, pairs, absolute, float(margin) if relative else None, reference,
                      alpha, confidence, correction)


# ---------------------------------------------------------------- how many seeds
DF_KINDS = ("welch", "pooled")  # the degrees of freedom tost_power can assume


def _between(lo: float, hi: float) -> float:
    """P(lo < Z < hi) for a standard normal Z, from the small tails (no cancellation near 1)."""
    if hi <= lo:
        return 0.0
    if lo > 0.0:
        return float(special.ndtr(-lo) - special.ndtr(-hi))
    return float(special.ndtr(hi) - special.ndtr(lo))


def _check_plan(sd: float, margin: float, alpha: float, diff: float, df: str) -> None:
    if not (sd > 0 and math.isfinite(sd)):  # also rejects nan
        raise ValueError(f"the between-seed sd must be a finite number > 0, got {sd}")
    _check_margin(margin, alpha)
    if not math.isfinite(diff):
        raise ValueError(f"the assumed difference must be finite, got {diff}")
    if df not in DF_KINDS:
        raise ValueError(f"df must be one of {DF_KINDS}, got {df!r}")


def tost_power(n: int, sd: float, margin: float, alpha: float = 0.05, diff: float = 0.0, *,
               df: str = "welch") -> float:
    """The probability that :func:`tost` concludes equivalence within ``±margin`` at ``alpha``, for
    two variants of ``n`` seeds each drawn from normal distributions with the common sd ``sd``
    whose means differ by ``diff``.

    With equal ``n`` the Welch standard error is the pooled one, ``se = s·sqrt(2/n)`` with
    ``s² = (s²_a + s²_b)/2``, so ``se = sd·sqrt(X / (n(n-1)))`` with ``X ~ χ²(2n-2)``, and the estimate
    ``d`` of the difference is ``N(diff, 2·sd²/n)``, independent of ``X``. TOST concludes equivalence
    iff ``|d| < margin - t_c·se`` (its (1-2α) interval lies inside the margin), where ``t_c`` is the
    upper-``alpha`` point of Student's t. Given ``se`` and ``t_c`` that is a normal probability;
    the power is its expectation, computed exactly (up to quadrature error, ~1e-9) with adaptive
    quadrature (:func:`scipy.integrate.quad`) over the quantiles of ``X``.

    ``df="welch"`` (default) is the test the lab runs: the Welch–Satterthwaite df
    ``(n-1)/(r² + (1-r)²)``, where ``r = s²_a/(s²_a + s²_b)`` is ``Beta((n-1)/2, (n-1)/2)`` and
    independent of ``X``, lies between ``n-1`` and ``2n-2``; the power is integrated over ``r`` too.
    ``df="pooled"``: Student's t with ``2n-2`` df (the pooled-variance TOST). At small ``n`` the two
    differ noticeably (n = 3, sd = 0.3·margin: 0.85 against 0.90), which is why the default is
    Welch. The noncentral-t formula ``P(T₁ > t_c) + P(T₂ < -t_c) - 1`` is not used: it leaves out
    the chance that both one-sided tests fail together (large ``se``), so it is a lower bound that
    can go negative, and it has no form for the Welch df, which varies with the data."""
    if isinstance(n, bool) or int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2 (seeds per variant), got {n}")
    n = int(n)
    sd, margin, alpha, diff = float(sd), float(margin), float(alpha), float(diff)
    _check_plan(sd, margin, alpha, diff, df)
    nu = 2 * n - 2  # s = sqrt(X) has the chi distribution with nu df
    log_norm = (nu / 2.0 - 1.0) * math.log(2.0) + math.lgamma(nu / 2.0)
    sd_diff = sd * math.sqrt(2.0 / n)  # sd of d
    se_unit = sd / math.sqrt(n * (n - 1.0))  # se = se_unit·s
    # the chi density is negligible (< 1e-40 of its peak) outside sqrt(nu) ± 10
    s_lo, s_hi = max(0.0, math.sqrt(nu) - 10.0), math.sqrt(nu) + 10.0

    def given_tc(tc: float) -> float:
        # d must lie within ±h(s), h = margin - tc·se_unit·s > 0, i.e. s < s_max
        top = min(s_hi, margin / (tc * se_unit))
        if not top > s_lo:
            return 0.0

        def at(x: float) -> float:  # the conditional power times the chi density at s = x
            if x <= 0.0:
                return 0.0
            h = margin - tc * se_unit * x
            dens = math.exp((nu - 1) * math.log(x) - x * x / 2.0 - log_norm)
            return _between((-h - diff) / sd_diff, (h - diff) / sd_diff) * dens if h > 0.0 else 0.0

        return integrate.quad(at, s_lo, top, epsabs=1e-11, epsrel=1e-10, limit=200)[0]

    if df == "pooled":
        power = given_tc(float(_t.isf(alpha, nu)))
    else:
        # r = sin²(φ/2) with φ in (0, π) of density ∝ sin^(n-2) φ, symmetric about π/2:
        # r² + (1-r)² = 1 - sin²(φ)/2, so the Welch df is (n-1)/(1 - sin²(φ)/2)
        log_w = 0.5 * math.log(math.pi) + math.lgamma((n - 1) / 2.0) - math.lgamma(n / 2.0) - math.log(2.0)

        def at_angle(phi: float) -> float:
            sin = math.sin(phi)
            if n > 2 and sin <= 0.0:
                return 0.0
            weight = math.exp((n - 2) * math.log(sin) - log_w) if n > 2 else math.exp(-log_w)
            return weight * given_tc(float(_t.isf(alpha, (n - 1) / (1.0 - sin * sin / 2.0))))

        power = integrate.quad(at_angle, 0.0, math.pi / 2.0, epsabs=1e-10, epsrel=1e-9, limit=100)[0]
    return min(1.0, max(0.0, power))


def seeds_needed(sd: float, margin: float, alpha: float = 0.05, power: float = 0.8, diff: float = 0.0,
                 max_n: int = 1000, *, df: str = "welch") -> int:
    """The smallest number of seeds per variant ``n >= 2`` for which TOST reaches ``power`` (see
    :func:`tost_power`): ``tost_power(n) >= power > tost_power(n - 1)``. ValueError with a plain
    reason when ``sd`` is not a finite number > 0, when ``|diff| >= margin`` (no ``n`` reaches it)
    or when even ``max_n`` seeds do not."""
    _check_plan(float(sd), float(margin), float(alpha), float(diff), df)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if isinstance(max_n, bool) or int(max_n) != max_n or max_n < 2:
        raise ValueError(f"max_n must be an integer >= 2, got {max_n}")
    max_n = int(max_n)
    if abs(diff) >= margin:
        raise ValueError(f"the assumed difference {diff:+.3g} PPL is not inside the margin ±{margin:.3g} PPL: "
                         f"no number of seeds gives {power:.0%} power")

    def reaches(n: int) -> bool:
        return tost_power(n, sd, margin, alpha, diff, df=df) >= power

    if reaches(2):
        return 2
    lo, hi = 2, min(4, max_n)  # lo does not reach the power; grow hi until it does, then bisect
    while not reaches(hi):
        if hi == max_n:
            raise ValueError(f"more than {max_n} seeds per variant "
                             f"({max_n} give {tost_power(max_n, sd, margin, alpha, diff, df=df):.0%} power)")
        lo, hi = hi, min(2 * hi, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class SeedPlan:
    """How many seeds per variant the pair (a, b) needs for TOST to conclude equivalence with
    ``power``: ``needed`` at the comparison's alpha; ``needed_corrected`` at ``alpha / family_size``
    (Holm's strictest step; a raw p below it stays below alpha after Holm's adjustment, so this
    many suffice whatever the other pairs give), ``None`` without a correction or with one pair.
    ``sd`` is the pooled between-seed sd of the two variants, ``diff`` the assumed true difference
    (0, or the observed one), ``have`` the finished seeds of a and b. ``needed`` is ``None`` with a
    ``note`` saying why when there is no answer."""

    a: str
    b: str
    sd: float
    margin: float
    diff: float
    alpha: float
    power: float
    have: tuple[int, int]
    needed: int | None
    needed_corrected: int | None
    family_size: int
    note: str = ""


def pooled_sd(x: MeanCI, y: MeanCI) -> float:
    """The pooled sd of two variants' seeds, ``sqrt(((nₐ-1)s²ₐ + (nᵦ-1)s²ᵦ) / (nₐ + nᵦ - 2))``; a
    single seed adds nothing (nan when neither variant has two seeds)."""
    dof = x.n + y.n - 2
    if dof < 1:
        return math.nan
    ss = math.fsum((s.n - 1) * s.sd ** 2 for s in (x, y) if s.n > 1)
    return math.sqrt(ss / dof)


def plan_seeds(comparison: Comparison, *, power: float = 0.8, observed_diff: bool = False,
               every_pair: bool = False, max_n: int = 1000) -> list[SeedPlan]:
    """A :class:`SeedPlan` per pair: the reference against every other variant (``every_pair``:
    every pair), from the pooled sd of the pair's seeds, at the comparison's margin and alpha; the
    true difference is taken to be 0, or the observed difference of the means with
    ``observed_diff``."""
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    s, ref = comparison.summaries, comparison.reference
    if every_pair:
        names = list(s)
        pairs = [(x, y) for i, x in enumerate(names) for y in names[i + 1:]]
    else:
        pairs = [(ref, v) for v in s if v != ref]
    m = comparison.family_size
    plans = []
    for a, b in pairs:
        sd = pooled_sd(s[a], s[b])
        diff = s[a].mean - s[b].mean if observed_diff else 0.0
        needed = corrected = None
        note = ""
        if not math.isfinite(sd):
            note = "1 seed of each: no spread to plan from"
        elif sd == 0.0:
            note = "no spread between the seeds (sd 0): nothing to plan from"
        else:
            try:
                needed = seeds_needed(sd, comparison.margin, comparison.alpha, power, diff, max_n)
            except ValueError as e:
                note = str(e)
            if needed is not None and comparison.correction is not None and m > 1:
                try:
                    corrected = seeds_needed(sd, comparison.margin, comparison.alpha / m, power, diff, max_n)
                except ValueError as e:
                    note = f"with {comparison.correction.capitalize()} over {m} pairs: {e}"
        plans.append(SeedPlan(a, b, sd, comparison.margin, diff, comparison.alpha, power, (s[a].n, s[b].n),
                              needed, corrected, m, note))
    return plans
