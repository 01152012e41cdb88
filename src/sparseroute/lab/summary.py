"""The terminal summary of a sweep and the helpers the report shares: :func:`comparison_of` runs
the statistics on the finished runs' test perplexity against the reference variant;
:func:`summary_table` / :func:`print_summary` show one row per variant, the notes, every tested
pair and, for multi-hop variants, hop collinearity and the best halting threshold.
:func:`halting_summary` and :func:`hop_collinearity` condense the runs' ``final["halting"]`` and
``final["routing_profile"]`` (also used by the benchmark scripts)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sparseroute.lab.results import RunResult, SweepResults, config_leaves, covered
from sparseroute.lab.stats import Comparison, PairResult, compare

__all__ = ["comparison_of", "summary_table", "print_summary", "halting_summary", "hop_collinearity",
           "deliberate_differences", "HALTING_PPL_LIMIT_PCT"]

_RICH_STYLE = {
    "equivalent": "bold green",
    "different": "bold red",
    "inconclusive": "yellow",
    "no test": "dim",
    "reference": "bold cyan",
}
_HTML_COLOR = {
    "equivalent": "#1a7f37",
    "different": "#cf222e",
    "inconclusive": "#9a6700",
    "no test": "#6e7781",
    "reference": "#0969da",
}
_DASH = "—"
_DPI = 100
HALTING_PPL_LIMIT_PCT = 0.5  # halting target: the PPL may grow by at most this many percent


# ---------------------------------------------------------------- statistics
def comparison_of(
    results: SweepResults, *, margin: float = 1.0, relative: bool = False, alpha: float = 0.05
) -> Comparison | None:
    """The statistics of the sweep's finished runs (test PPL per variant), against the reference:
    ``results.reference`` when it has finished runs, else the first variant that has. ``None``
    when no run is finished yet."""
    groups = results.test_ppl()
    if not groups:
        return None
    reference = _reference_of(results, groups)
    return compare(groups, margin=margin, relative=relative, alpha=alpha, reference=reference)


def _reference_of(results: SweepResults, groups: dict[str, Any]) -> str:
    if results.reference is not None and results.reference in groups:
        return results.reference
    return next(iter(groups))


# ---------------------------------------------------------------- small helpers
def _num(x: Any) -> float | None:
    """``x`` as a finite float, else None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(x: float | None, digits: int = 3) -> str:
    return _DASH if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return _DASH
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _si(x: float | None) -> str:
    """1234567 -> '1.23M' (FLOPs)."""
    if x is None:
        return _DASH
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}"
    return f"{x:.3g}"


def _count(x: float | None) -> str:
    return _DASH if x is None else f"{int(round(x)):,}"


def _variant_runs(results: SweepResults, variant: str) -> list[RunResult]:
    return sorted((r for r in results.runs if r.variant == variant), key=lambda r: (r.seed, r.run_id))


def _variant_config(results: SweepResults, variant: str) -> dict[str, Any] | None:
    """The configuration of a variant: its first finished run's, else any of its runs'."""
    for r in results.done(variant) + _variant_runs(results, variant):
        if isinstance(r.config, dict):
            return r.config
    return None


def _moe_of(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    moe = _get(cfg, "model", "moe")
    return moe if isinstance(moe, dict) else None


def _router_name(cfg: dict[str, Any] | None) -> str:
    if _get(cfg, "model") is None:
        return "?"
    moe = _moe_of(cfg)
    return "dense" if moe is None else str(moe.get("router", "topk"))


def _moe_layer_labels(cfg: dict[str, Any] | None, n: int) -> list[str]:
    """Labels of the ``n`` MoE layers (their layer indices when the config says which)."""
    model, moe = _get(cfg, "model"), _moe_of(cfg)
    idx: list[int] = []
    if moe is not None and isinstance(model.get("n_layers"), int):
        layers, L = moe.get("layers", "all"), model["n_layers"]
        if layers == "all":
            idx = list(range(L))
        elif layers == "every_other":
            idx = list(range(1, L, 2))
        elif isinstance(layers, (list, tuple)):
            with contextlib.suppress(TypeError, ValueError):
                idx = sorted(int(i) for i in layers)
    if len(idx) != n:
        return [f"MoE {i}" for i in range(n)]
    return [f"layer {i}" for i in idx]


def _final_values(runs: Sequence[RunResult], *keys: str) -> list[float]:
    out = []
    for r in runs:
        v = _num(_get(r.final, *keys))
        if v is not None:
            out.append(v)
    return out


def _margin_text(comparison: Comparison | None, margin: float, relative: bool) -> str:
    if comparison is not None:
        if comparison.relative_margin is not None:
            return (
                f"±{comparison.relative_margin * 100:g}% of the reference mean "
                f"(= ±{comparison.margin:.4g} PPL)"
            )
        return f"±{comparison.margin:g} PPL"
    return f"±{margin * 100:g}% of the reference mean" if relative else f"±{margin:g} PPL"


def _ci_label(comparison: Comparison) -> str:
    return f"{(1 - 2 * comparison.alpha) * 100:g}% CI"


def _variant_colors(results: SweepResults) -> dict[str, Any]:
    cmap = matplotlib.colormaps["tab10" if len(results.variants) <= 10 else "tab20"]
    return {v: cmap(i % cmap.N) for i, v in enumerate(results.variants)}


# ---------------------------------------------------------------- routing diagnostics of the runs
def _routing_profile(runs: Sequence[RunResult]) -> list[dict[str, float]] | None:
    """Per MoE layer, each ``final["routing_profile"]`` statistic averaged over the runs that have it."""
    acc: list[dict[str, list[float]]] = []
    for r in runs:
        prof = _get(r.final, "routing_profile")
        for i, layer in enumerate(prof if isinstance(prof, list) else []):
            while len(acc) <= i:
                acc.append({})
            for k, v in (layer.items() if isinstance(layer, dict) else ()):
                if (x := _num(v)) is not None:
                    acc[i].setdefault(k, []).append(x)
    return [{k: sum(v) / len(v) for k, v in lay.items()} for lay in acc] if any(acc) else None


def hop_collinearity(results: SweepResults) -> dict[str, float]:
    """Per variant with multi-hop layers, cos(Δh_0, Δh_1) (``hop_cos``) of its finished runs'
    routing profiles: per layer averaged over seeds, then over layers (spec order)."""
    out = {}
    for v in results.variants:
        cos = [lay["hop_cos"] for lay in _routing_profile(results.done(v)) or () if "hop_cos" in lay]
        if cos:
            out[v] = sum(cos) / len(cos)
    return out


def halting_summary(results: SweepResults, *, max_ppl_change_pct: float = HALTING_PPL_LIMIT_PCT
                    ) -> dict[str, dict[str, Any]]:
    """Per variant whose finished runs carry ``final["halting"]`` (spec order): ``curve``, the rows
    averaged over the seeds that evaluated each τ (every numeric field, plus ``seeds``), by τ;
    ``best``, the curve row with τ > 0 and ``ppl_change_pct <= max_ppl_change_pct`` that saves the
    largest share of MoE FLOPs (``moe_flops_saved``), or None; ``runs``, the runs with data."""
    out: dict[str, dict[str, Any]] = {}
    for v in results.variants:
        by_tau: dict[float, list[dict[str, Any]]] = {}
        n_runs = 0
        for r in results.done(v):
            rows = _get(r.final, "halting")
            rows = [row for row in rows if isinstance(row, dict) and _num(row.get("tau")) is not None] \
                if isinstance(rows, list) else []
            n_runs += bool(rows)
            for row in rows:
                by_tau.setdefault(round(float(row["tau"]), 9), []).append(row)
        curve = []
        for tau, rows in sorted(by_tau.items()):
            keys = dict.fromkeys(k for row in rows for k in row if k != "tau")
            vals = {k: [x for row in rows if (x := _num(row.get(k))) is not None] for k in keys}
            curve.append({"tau": tau, "seeds": len(rows), **{k: _mean(x) for k, x in vals.items() if x}})
        ok = [row for row in curve if row["tau"] > 0 and "moe_flops_saved" in row
              and row.get("ppl_change_pct", math.inf) <= max_ppl_change_pct]
        best = max(ok, key=lambda row: (row["moe_flops_saved"], -row["ppl_change_pct"], -row["tau"]), default=None)
        if curve:
            out[v] = {"curve": curve, "best": best, "runs": n_runs}
    return out


def _halting_line(variant: str, summary: dict[str, Any]) -> str:
    best = summary["best"]
    if best is None:
        return f"{variant}: halting: no τ keeps PPL within +{HALTING_PPL_LIMIT_PCT:g}%"
    return (f"{variant}: halting τ={best['tau']:g} saves {best['moe_flops_saved'] * 100:.1f}% of MoE FLOPs "
            f"at {best['ppl_change_pct']:+.2f}% PPL")


# ---------------------------------------------------------------- the summary rows
@dataclass(frozen=True)
class _Row:
    variant: str
    router: str
    runs: str
    test: str
    val: str
    delta: str
    flops: str
    routing: str
    p: str
    verdict: str  # a PairResult verdict, "reference", or "" when nothing is compared


def _summary_rows(results: SweepResults, comparison: Comparison | None) -> list[_Row]:
    rows = []
    ref = comparison.reference if comparison is not None else None
    for v in results.variants:
        done = results.done(v)
        summary = comparison.summaries.get(v) if comparison is not None else None
        test_values = _final_values(done, "test_ppl")
        if summary is not None and summary.n >= 2 and math.isfinite(summary.low) and math.isfinite(summary.high):
            test = f"{summary.mean:.2f} ± {(summary.high - summary.low) / 2:.2f}"
        elif summary is not None:
            test = f"{summary.mean:.2f} (1 seed: no CI)"
        elif test_values:
            test = f"{_mean(test_values):.2f}"
        else:
            test = _DASH
        delta, p, verdict = _DASH, _DASH, ""
        if comparison is not None:
            if v == ref:
                verdict = "reference"
            elif summary is None:
                verdict = "no test"
            else:
                delta = f"{summary.mean - comparison.summaries[ref].mean:+.2f}"
                pair = comparison.pair(ref, v)
                verdict = pair.verdict
                if pair.tost is not None:
                    p = _fmt_p(pair.tost.p)
        routing = _final_values(done, "parameter_counts", "routing")
        rows.append(
            _Row(
                variant=v,
                router=_router_name(_variant_config(results, v)),
                runs=f"{len(done)}/{len(_variant_runs(results, v))}",
                test=test,
                val=_fmt(_mean(_final_values(done, "val_ppl")), 2),
                delta=delta,
                flops=_si(_mean(_final_values(done, "flops_per_token", "experts"))),
                routing=_count(routing[0]) if routing else _DASH,
                p=p,
                verdict=verdict,
            )
        )
    return rows


def _headers(comparison: Comparison | None) -> list[str]:
    conf = f"{comparison.confidence * 100:g}% CI" if comparison is not None else "CI"
    ref = comparison.reference if comparison is not None else "reference"
    return [
        "variant",
        "router",
        "runs",
        f"test PPL ± {conf}",
        "val PPL",
        f"Δ vs {ref}",
        "expert FLOPs/tok",
        "routing params",
        "TOST p",
        f"vs {ref}",
    ]


def _title(results: SweepResults, comparison: Comparison | None, margin_text: str) -> str:
    head = f"Sweep {results.name!r} (id {results.sweep_id})"
    if comparison is None:
        return f"{head} — no finished run yet"
    return f"{head} — test PPL equivalence (TOST, α={comparison.alpha:g}), margin {margin_text}"


def summary_table(results: SweepResults, comparison: Comparison | None) -> Table:
    """One row per variant (spec order): router, runs done/total, mean test PPL ± CI half-width,
    val PPL, difference to the reference, expert FLOPs per token (forward), routing parameters
    and the TOST p-value and verdict against the reference variant."""
    margin_text = _margin_text(comparison, 1.0, False) if comparison is not None else ""
    table = Table(title=Text(_title(results, comparison, margin_text)), title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for i, h in enumerate(_headers(comparison)):
        table.add_column(Text(h), justify="left" if i < 2 else "right", no_wrap=i == 0)
    for row in _summary_rows(results, comparison):
        table.add_row(
            Text(row.variant, style="bold"),
            Text(row.router),
            Text(row.runs),
            Text(row.test),
            Text(row.val),
            Text(row.delta),
            Text(row.flops),
            Text(row.routing),
            Text(row.p),
            Text(row.verdict or _DASH, style=_RICH_STYLE.get(row.verdict, "")),
        )
    return table


# ---------------------------------------------------------------- notes and pair lines
def deliberate_differences(results: SweepResults) -> list[str]:
    """One line per configuration field in which the variants differ because the spec's
    ``allow_differences`` lets them (``"train.lr — linear 0.003, cosine 0.001"``), from the runs'
    stored configurations; empty when the spec allows none."""
    allowed = results.spec.get("allow_differences") or []
    if not isinstance(allowed, list) or not allowed:
        return []
    leaves = {}
    for v in results.variants:
        cfg = _variant_config(results, v)
        if isinstance(cfg, dict):
            leaves[v] = config_leaves(cfg)
    paths = dict.fromkeys(p for lv in leaves.values() for p in lv if covered(p, allowed) and p != "train.seed")
    lines = []
    for path in paths:
        values = {v: lv.get(path) for v, lv in leaves.items()}
        if len({repr(x) for x in values.values()}) > 1:
            lines.append(f"{path} — " + ", ".join(f"{v} {_value_text(x)}" for v, x in values.items()))
    return lines


def _value_text(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:g}"
    if isinstance(x, str):
        return x
    return "none" if x is None else str(x)


def _report_notes(results: SweepResults, comparison: Comparison | None) -> list[str]:
    """What the reader must know: unfinished runs, variants left out, single seeds, fallbacks."""
    notes: list[str] = []
    statuses: dict[str, int] = {}
    for r in results.runs:
        if not (r.status == "done" and r.final is not None):
            statuses[r.status] = statuses.get(r.status, 0) + 1
    if statuses:
        detail = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        notes.append(
            f"{sum(statuses.values())} of {len(results.runs)} runs are not finished ({detail}); "
            "the statistics use finished runs only."
        )
    notes.extend(f"Deliberate difference (allow_differences): {line}." for line in deliberate_differences(results))
    if comparison is None:
        notes.append("No run has finished yet: there is nothing to compare.")
        return notes
    for v in results.variants:
        if v not in comparison.summaries:
            notes.append(f"{v}: no finished run — left out of the statistics and the plots.")
    if results.reference is not None and results.reference != comparison.reference:
        notes.append(
            f"The spec's reference {results.reference!r} has no finished run; "
            f"the comparison uses {comparison.reference!r} instead."
        )
    notes.extend(comparison.notes())
    if len(comparison.summaries) < 2:
        notes.append("Only one variant has finished runs: there is no pair to test.")
    return notes


def _pair_line(pair: PairResult, comparison: Comparison) -> str:
    if pair.tost is None or pair.welch is None:
        return f"{pair.a} vs {pair.b}: no test ({pair.note})" if pair.note else f"{pair.a} vs {pair.b}: no test"
    t = pair.tost
    return (
        f"{pair.a} vs {pair.b}: diff {t.diff:+.3f} PPL, {_ci_label(comparison)} [{t.ci_low:+.3f}, {t.ci_high:+.3f}] "
        f"within ±{comparison.margin:.4g}? p_lower={_fmt_p(t.p_lower)}, p_upper={_fmt_p(t.p_upper)}, "
        f"TOST p={_fmt_p(t.p)}, Welch p={_fmt_p(pair.welch.p)} -> {pair.verdict}"
    )


def print_summary(results: SweepResults, comparison: Comparison | None, console: Console | None = None) -> None:
    """Print the summary table, the notes and one line per tested pair."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # a file or a pipe: no terminal to wrap for, keep rows on one line
            console = Console(width=max(console.width, 140))
    console.print(summary_table(results, comparison))
    notes = _report_notes(results, comparison)
    if notes:
        console.print(Text("Notes:", style="bold"))
        for n in notes:
            console.print(Text(f"  • {n}"))
    if comparison is not None and comparison.pairs:
        console.print(Text(f"TOST pairs (margin {_margin_text(comparison, 1.0, False)}, α={comparison.alpha:g}):", style="bold"))
        for pair in comparison.pairs:
            console.print(Text(f"  {_pair_line(pair, comparison)}", style=_RICH_STYLE.get(pair.verdict, "")))
    lines = [f"{v}: cos(Δh0, Δh1) = {c:.2f} (mean over layers and seeds)" for v, c in hop_collinearity(results).items()]
    lines += [_halting_line(v, h) for v, h in halting_summary(results).items()]
    if lines:
        console.print(Text("Multi-hop routing:", style="bold"))
        for line in lines:
            console.print(Text(f"  {line}"))
