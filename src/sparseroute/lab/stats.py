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
from dataclasses import dataclass

from scipy import stats

_t = stats.t


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


@dataclass(frozen=True)
class PairResult:
    """Both tests for one pair of variants (``None`` with a plain ``note`` when not testable)."""

    a: str
    b: str
    welch: WelchResult | None
    tost: TOSTResult | None
    note: str

    @property
    def verdict(self) -> str:
        """One of "equivalent", "different", "inconclusive" or "no test"."""
        if self.welch is None or self.tost is None:
            return "no test"
        if self.tost.equivalent:
            return "equivalent"
        return "different" if self.welch.p < self.tost.alpha else "inconclusive"


@dataclass(frozen=True)
class Comparison:
    """Per-variant summaries and every pairwise test of one sweep."""

    summaries: dict[str, MeanCI]
    pairs: list[PairResult]
    margin: float
    relative_margin: float | None
    reference: str
    alpha: float
    confidence: float

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
            alpha: float = 0.05, confidence: float = 0.95, reference: str | None = None) -> Comparison:
    """Summarize each variant (test PPL of its finished seeds) and test every pair of variants."""
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
    return Comparison(summaries, pairs, absolute, float(margin) if relative else None, reference,
                      alpha, confidence)
