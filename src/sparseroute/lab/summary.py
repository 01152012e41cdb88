"""The terminal summary of a sweep and the helpers the report shares: :func:`comparison_of` runs
the statistics on the finished runs' test perplexity against the reference variant (verdicts from
Holm-adjusted p-values unless ``correction=None``); :func:`summary_table` / :func:`print_summary`
show one row per variant, the notes, every tested pair (raw and adjusted p) and, for multi-hop
variants, hop collinearity and the best halting threshold; :func:`print_seed_plans` prints the
seeds each pair needs for TOST to reach a power (:func:`sparseroute.lab.stats.plan_seeds`).
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
from sparseroute.lab.stats import Comparison, PairResult, SeedPlan, compare

__all__ = ["comparison_of", "summary_table", "print_summary", "print_seed_plans", "halting_summary",
           "hop_collinearity", "deliberate_differences", "HALTING_PPL_LIMIT_PCT"]

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
    results: SweepResults, *, margin: float = 1.0, relative: bool = False, alpha: float = 0.05,
    correction: str | None = "holm",
) -> Comparison | None:
    """The statistics of the sweep's finished runs (test PPL per variant), against the reference:
    ``results.reference`` when it has finished runs, else the first variant that has. ``None``
    when no run is finished yet. ``correction``: as :func:`sparseroute.lab.stats.compare`."""
    groups = results.test_ppl()
    if not groups:
        return None
    reference = _reference_of(results, groups)
    return compare(groups, margin=margin, relative=relative, alpha=alpha, reference=reference,
                   correction=correction)


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
    """The MoE router (``dense`` without MoE), with `` + NAME attention`` when the attention is
    block-sparse."""
    if _get(cfg, "model") is None:
        return "?"
    moe = _moe_of(cfg)
    name = "dense" if moe is None else str(moe.get("router", "topk"))
    attention = _get(cfg, "model", "attention")
    if isinstance(attention, dict):
        name += f" + {attention.get('router', 'moba')} attention"
    return name


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


_CORRECTION_NAME = {"holm": "Holm"}


def _correction_name(comparison: Comparison) -> str:
    return _CORRECTION_NAME.get(comparison.correction or "", str(comparison.correction))


def _pairs_word(n: int) -> str:
    return f"{n} pair{'s' if n != 1 else ''}"


def _correction_text(comparison: Comparison | None) -> str:
    """Which p-values the verdicts use: "verdicts from Holm-adjusted p over 3 pairs" or raw."""
    if comparison is None:
        return ""
    if comparison.correction is None:
        return "verdicts from raw p (no multiple-comparison correction)"
    return f"verdicts from {_correction_name(comparison)}-adjusted p over {_pairs_word(comparison.family_size)}"


def _variant_colors(results: SweepResults) -> dict[str, Any]:
    cmap = matplotlib.colormaps["tab10" if len(results.variants) <= 10 else "tab20"]
    return {v: cmap(i % cmap.N) for i, v in enumerate(results.variants)}


# ---------------------------------------------------------------- routing diagnostics of the runs
def _routing_profile(runs: Sequence[RunResult]) -> list[dict[str, float]] | None:
    """Per MoE layer, each ``final["routing_profile"]`` statistic averaged over the runs that have it."""
    return layer_profile_means(runs, "routing_profile")


def layer_profile_means(runs: Sequence[RunResult], key: str) -> list[dict[str, float]] | None:
    """Per layer, each statistic of the per-layer list ``final[key]`` averaged over the runs that
    have it (None when no run has one)."""
    acc: list[dict[str, list[float]]] = []
    for r in runs:
        prof = _get(r.final, key)
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
    p: str  # the raw TOST p against the reference
    p_adjusted: str  # the adjusted one (the verdict's), or a dash
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
        delta, p, p_adjusted, verdict = _DASH, _DASH, _DASH, ""
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
                    p_adjusted = _fmt_p(pair.tost_p_adjusted)
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
                p_adjusted=p_adjusted,
                verdict=verdict,
            )
        )
    return rows


def _adjusted_column(comparison: Comparison | None) -> bool:
    """Whether the tables have a column of adjusted p-values (with a correction)."""
    return comparison is not None and comparison.correction is not None


def _row_values(row: _Row, comparison: Comparison | None) -> list[str]:
    """The cells of a summary row before the verdict, in :func:`_headers`' order."""
    cells = [row.variant, row.router, row.runs, row.test, row.val, row.delta, row.flops, row.routing, row.p]
    return cells + [row.p_adjusted] * _adjusted_column(comparison)


def _headers(comparison: Comparison | None) -> list[str]:
    conf = f"{comparison.confidence * 100:g}% CI" if comparison is not None else "CI"
    ref = comparison.reference if comparison is not None else "reference"
    adjusted = [f"TOST p ({_correction_name(comparison)})"] if _adjusted_column(comparison) else []
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
        *adjusted,
        f"vs {ref}",
    ]


def vocabulary(results: SweepResults) -> str:
    """The runs' vocabulary in words ("BPE 8192", "bytes (256)"; several when they differ), so that
    a table says which regime its perplexities come from."""
    seen = []
    for r in results.runs:
        data = r.config.get("data", {})
        if data.get("tokenizer") == "bpe":
            said = f"BPE {r.config.get('model', {}).get('vocab_size', data.get('bpe_vocab_size'))}"
        else:
            said = "bytes (256)"
        if said not in seen:
            seen.append(said)
    return " / ".join(seen)


def _title(results: SweepResults, comparison: Comparison | None, margin_text: str) -> str:
    vocab = vocabulary(results)
    head = f"Sweep {results.name!r} (id {results.sweep_id}{', vocabulary ' + vocab if vocab else ''})"
    if comparison is None:
        return f"{head} — no finished run yet"
    return f"{head} — test PPL equivalence (TOST, α={comparison.alpha:g}), margin {margin_text}"


def summary_table(results: SweepResults, comparison: Comparison | None) -> Table:
    """One row per variant (spec order): router, runs done/total, mean test PPL ± CI half-width,
    val PPL, difference to the reference, expert FLOPs per token (forward), routing parameters,
    the raw TOST p-value against the reference variant, the adjusted one (with a correction) and
    the verdict; the caption says which p-values the verdicts use."""
    margin_text = _margin_text(comparison, 1.0, False) if comparison is not None else ""
    caption = _correction_text(comparison)
    table = Table(title=Text(_title(results, comparison, margin_text)), title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, caption=Text(f"TOST {caption}") if caption else None, caption_justify="left")
    for i, h in enumerate(_headers(comparison)):
        table.add_column(Text(h), justify="left" if i < 2 else "right", no_wrap=i == 0)
    for row in _summary_rows(results, comparison):
        cells = _row_values(row, comparison)
        table.add_row(
            Text(cells[0], style="bold"),
            *(Text(c) for c in cells[1:]),
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


def still_falling(results: SweepResults) -> list[str]:
    """The finished runs whose convergence check (``final["convergence"]``, stored by the training
    loop) flags them as still falling, as "variant seed N (-x.x%)"."""
    out = []
    for r in results.runs:
        conv = (r.final or {}).get("convergence") if r.status == "done" else None
        if conv and conv.get("still_falling"):
            out.append(f"{r.variant} seed {r.seed} ({100 * conv['relative_change']:+.1f}%)")
    return out


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
    falling = still_falling(results)
    if falling:
        notes.append(
            "Still falling at the end (validation loss down by more than 1% over the last 20% of training): "
            + ", ".join(falling) + "; equivalence at this budget says little about where these runs end up."
        )
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
    name = _correction_name(comparison)
    tost_adj = f" ({name} {_fmt_p(pair.tost_p_adjusted)})" if pair.tost_p_adjusted is not None else ""
    welch_adj = f" ({name} {_fmt_p(pair.welch_p_adjusted)})" if pair.welch_p_adjusted is not None else ""
    raw = f" (raw p: {pair.raw_verdict})" if pair.raw_verdict != pair.verdict else ""
    return (
        f"{pair.a} vs {pair.b}: diff {t.diff:+.3f} PPL, {_ci_label(comparison)} [{t.ci_low:+.3f}, {t.ci_high:+.3f}] "
        f"within ±{comparison.margin:.4g}? p_lower={_fmt_p(t.p_lower)}, p_upper={_fmt_p(t.p_upper)}, "
        f"TOST p={_fmt_p(t.p)}{tost_adj}, Welch p={_fmt_p(pair.welch.p)}{welch_adj} -> {pair.verdict}{raw}"
    )


def _console(console: Console | None) -> Console:
    if console is None:
        console = Console()
        if not console.is_terminal:  # a file or a pipe: no terminal to wrap for, keep rows on one line
            console = Console(width=max(console.width, 140))
    return console


def print_summary(results: SweepResults, comparison: Comparison | None, console: Console | None = None) -> None:
    """Print the summary table, the notes and one line per tested pair."""
    console = _console(console)
    console.print(summary_table(results, comparison))
    notes = _report_notes(results, comparison)
    if notes:
        console.print(Text("Notes:", style="bold"))
        for n in notes:
            console.print(Text(f"  • {n}"))
    if comparison is not None and comparison.pairs:
        console.print(Text(f"TOST pairs (margin {_margin_text(comparison, 1.0, False)}, α={comparison.alpha:g}; "
                           f"{_correction_text(comparison)}):", style="bold"))
        for pair in comparison.pairs:
            console.print(Text(f"  {_pair_line(pair, comparison)}", style=_RICH_STYLE.get(pair.verdict, "")))
    lines = [f"{v}: cos(Δh0, Δh1) = {c:.2f} (mean over layers and seeds)" for v, c in hop_collinearity(results).items()]
    lines += [_halting_line(v, h) for v, h in halting_summary(results).items()]
    if lines:
        console.print(Text("Multi-hop routing:", style="bold"))
        for line in lines:
            console.print(Text(f"  {line}"))


# ---------------------------------------------------------------- seeds planner
def _have_text(have: tuple[int, int]) -> str:
    return f"have {have[0]}" if have[0] == have[1] else f"have {have[0]} and {have[1]}"


def _plan_heading(plans: Sequence[SeedPlan], comparison: Comparison) -> str:
    power = plans[0].power if plans else 0.8
    diffs = "as observed" if plans and any(p.diff != 0.0 for p in plans) else "0"
    return (f"Seeds per variant for TOST to conclude equivalence with {power:.0%} power (α={comparison.alpha:g}, "
            f"margin {_margin_text(comparison, 1.0, False)}, true difference {diffs}; normal seeds with the "
            f"pair's pooled sd)")


def _plan_line(plan: SeedPlan) -> str:
    """``"topk vs cosine: sd 0.42 PPL, margin 1 PPL -> 5 seeds per variant for 80% power (have 3); 7
    with Holm over 3 pairs (at α/3)"``; the reason instead when there is no answer."""
    head = f"{plan.a} vs {plan.b}: "
    if not math.isfinite(plan.sd) or plan.sd == 0.0:
        return f"{head}{plan.note} ({_have_text(plan.have)})"
    head += f"sd {plan.sd:.3g} PPL, margin {plan.margin:.3g} PPL"
    if plan.diff != 0.0:
        head += f", assumed difference {plan.diff:+.3g} PPL"
    if plan.needed is None:
        return f"{head} -> {plan.note} ({_have_text(plan.have)})"
    line = f"{head} -> {plan.needed} seeds per variant for {plan.power:.0%} power ({_have_text(plan.have)})"
    if plan.needed_corrected is not None:
        m = plan.family_size
        line += f"; {plan.needed_corrected} with Holm over {m} pairs (at α/{m})"
    elif plan.note:
        line += f"; {plan.note}"
    return line


def print_seed_plans(plans: Sequence[SeedPlan], comparison: Comparison | None, console: Console | None = None) -> None:
    """Print one line per planned pair (:func:`sparseroute.lab.stats.plan_seeds`) under a heading
    that says what the plan assumes."""
    console = _console(console)
    if comparison is None or not plans:
        console.print(Text("Seeds needed: no pair to plan (fewer than two variants have finished runs)."))
        return
    console.print(Text(f"{_plan_heading(plans, comparison)}:", style="bold"))
    for plan in plans:
        console.print(Text(f"  {_plan_line(plan)}"))
