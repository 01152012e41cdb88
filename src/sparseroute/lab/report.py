"""The report of a sweep: a terminal summary (a rich table) and one self-contained HTML file.

* :func:`comparison_of` runs the statistics (:func:`sparseroute.lab.stats.compare`) on the test
  perplexity of the finished runs, against the sweep's reference variant.
* :func:`summary_table` / :func:`print_summary`: one row per variant (spec order) with its router,
  runs done, mean test PPL ± CI half-width, val PPL, expert FLOPs per token, routing parameters
  and the TOST verdict against the reference; then the notes and every tested pair.
* :func:`write_report`: a single HTML file (inline CSS, plots as base64 PNG data URIs, nothing
  loaded from elsewhere), written atomically: loss curves, test PPL with CIs, the TOST p-value
  matrix, expert-load heatmaps, PPL vs expert FLOPs, routing parameters, the tables, the notes,
  the per-run table and the sweep spec.

Plots are drawn on bare :class:`matplotlib.figure.Figure` objects with the Agg canvas, so pyplot's
global state is never touched. The output depends only on the results (no timestamps), so the
same results give the same file.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sparseroute.lab.results import RunResult, SweepResults
from sparseroute.lab.stats import Comparison, PairResult, compare

__all__ = ["comparison_of", "summary_table", "print_summary", "write_report"]

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
            test = f"{summary.mean:.3f} ± {(summary.high - summary.low) / 2:.3f}"
        elif summary is not None:
            test = f"{summary.mean:.3f} (1 seed: no CI)"
        elif test_values:
            test = f"{_mean(test_values):.3f}"
        else:
            test = _DASH
        delta, p, verdict = _DASH, _DASH, ""
        if comparison is not None:
            if v == ref:
                verdict = "reference"
            elif summary is None:
                verdict = "no test"
            else:
                delta = f"{summary.mean - comparison.summaries[ref].mean:+.3f}"
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
                val=_fmt(_mean(_final_values(done, "val_ppl"))),
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
        "runs done",
        f"test PPL (mean ± {conf})",
        "val PPL",
        f"Δ test PPL vs {ref}",
        "expert FLOPs/token",
        "routing params",
        "TOST p",
        f"verdict vs {ref}",
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
    table = Table(title=Text(_title(results, comparison, margin_text)), title_justify="left")
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
    console = console if console is not None else Console()
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


# ---------------------------------------------------------------- plots
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _message_figure(message: str) -> Figure:
    fig = _new_figure(6.0, 1.6)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11, color="#555555")
    return fig


def _png_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    finally:
        fig.clear()
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _loss_curve(runs: Sequence[RunResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(tokens, mean, min, max) of the training loss over the runs, records aligned by step."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        for rec in r.metrics:
            step, tokens, loss = rec.get("step"), _num(rec.get("tokens")), _num(rec.get("loss"))
            if not isinstance(step, int) or tokens is None or loss is None:
                continue
            by_step.setdefault(step, []).append((tokens, loss))
    if not by_step:
        return None
    steps = sorted(by_step)
    tokens = np.array([np.mean([t for t, _ in by_step[s]]) for s in steps])
    losses = [np.array([l for _, l in by_step[s]]) for s in steps]
    return (
        tokens,
        np.array([x.mean() for x in losses]),
        np.array([x.min() for x in losses]),
        np.array([x.max() for x in losses]),
    )


def _plot_loss_curves(results: SweepResults, comparison: Comparison | None) -> Figure:
    colors = _variant_colors(results)
    curves = {v: c for v in results.variants if (c := _loss_curve(results.done(v))) is not None}
    if not curves:
        return _message_figure("No finished run has logged training loss yet.")
    fig = _new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    for v, (tokens, mean, lo, hi) in curves.items():
        n = len(results.done(v))
        ax.plot(tokens, mean, color=colors[v], lw=1.6, label=f"{v} (n={n})")
        ax.fill_between(tokens, lo, hi, color=colors[v], alpha=0.2, lw=0)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (cross-entropy, nats)")
    ax.set_title("Training loss: mean over seeds, band = min–max over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_test_ppl(results: SweepResults, comparison: Comparison | None) -> Figure:
    if comparison is None:
        return _message_figure("No finished run: no test perplexity yet.")
    colors = _variant_colors(results)
    names = list(comparison.summaries)
    fig = _new_figure(max(5.0, 1.3 * len(names) + 2.5), 4.5)
    ax = fig.add_subplot()
    ref = comparison.summaries[comparison.reference]
    ax.axhspan(
        ref.mean - comparison.margin,
        ref.mean + comparison.margin,
        color="#999999",
        alpha=0.15,
        lw=0,
        label=f"{comparison.reference} mean ± margin ({comparison.margin:.3g} PPL)",
    )
    for i, v in enumerate(names):
        s = comparison.summaries[v]
        values = [float(r.final["test_ppl"]) for r in results.done(v)]
        offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(i + 0.25 + offsets, values, s=14, color=colors[v], alpha=0.6, lw=0)
        if s.n >= 2 and math.isfinite(s.low) and math.isfinite(s.high):
            ax.errorbar(
                [i], [s.mean], yerr=[[s.mean - s.low], [s.high - s.mean]], fmt="o", color=colors[v], capsize=6, ms=7
            )
        else:
            ax.plot([i], [s.mean], marker="D", color=colors[v], ms=7, ls="none")
            ax.annotate("1 seed", (i, s.mean), xytext=(8, 6), textcoords="offset points", fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("test perplexity")
    ax.set_title(f"Test PPL: mean with {comparison.confidence * 100:g}% CI (dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def _plot_tost_matrix(results: SweepResults, comparison: Comparison | None) -> Figure:
    if comparison is None or len(comparison.summaries) < 2:
        return _message_figure("Fewer than two variants have finished runs: no pair to test.")
    names = list(comparison.summaries)
    n = len(names)
    p = np.full((n, n), np.nan)
    labels = [["" for _ in range(n)] for _ in range(n)]
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                labels[i][j] = _DASH
                continue
            pair = comparison.pair(a, b)
            if pair.tost is not None:
                p[i, j] = pair.tost.p
                labels[i][j] = f"p={pair.tost.p:.2g}\n{pair.verdict}"
            else:
                labels[i][j] = "no test"
    size = max(4.5, 1.25 * n + 2.0)
    fig = _new_figure(size + 1.2, size)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdYlGn_r"].with_extremes(bad="#e4e4e4")
    im = ax.imshow(np.ma.masked_invalid(p), cmap=cmap, vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            dark = math.isfinite(p[i, j]) and not 0.2 <= p[i, j] <= 0.8
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(n), names, rotation=30 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), names)
    ax.set_title(f"TOST p-value (margin ±{comparison.margin:.3g} PPL; equivalent if p < {comparison.alpha:g})")
    fig.colorbar(im, ax=ax, label="TOST p (max of the two one-sided p)", shrink=0.8)
    return fig


def _expert_load(runs: Sequence[RunResult]) -> list[np.ndarray] | None:
    """Per MoE layer, the share of routed tokens each expert got, over all records of the runs."""
    totals: list[np.ndarray] | None = None
    for r in runs:
        for rec in r.metrics:
            routing = rec.get("routing")
            if not isinstance(routing, list) or not routing:
                continue
            loads = [layer.get("load") if isinstance(layer, dict) else None for layer in routing]
            if totals is None:
                totals = [np.zeros(len(l) if isinstance(l, list) else 0) for l in loads]
            for i, load in enumerate(loads):
                if i < len(totals) and isinstance(load, list) and len(load) == len(totals[i]):
                    totals[i] += np.asarray(load, dtype=float)
    if not totals or not any(t.size for t in totals):
        return None
    return [t / t.sum() if t.sum() > 0 else t for t in totals]


def _moe_variants(results: SweepResults) -> tuple[list[str], list[str]]:
    moe, dense = [], []
    for v in results.variants:
        cfg = _variant_config(results, v)
        if cfg is None:
            continue
        (moe if _moe_of(cfg) is not None else dense).append(v)
    return moe, dense


def _plot_expert_load(results: SweepResults, comparison: Comparison | None) -> Figure | None:
    """One (layer × expert) heatmap per MoE variant with logged loads; None when there is none."""
    moe, _ = _moe_variants(results)
    shares = {v: s for v in moe if (s := _expert_load(results.done(v))) is not None}
    if not shares:
        return None
    heights = [0.45 * len(s) + 1.4 for s in shares.values()]
    width = max(6.0, 0.55 * max(max(len(row) for row in s) for s in shares.values()) + 3.0)
    fig = _new_figure(width, sum(heights) + 0.3)
    axes = fig.subplots(len(shares), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (v, s) in zip(axes, shares.items()):
        E = max(len(row) for row in s)
        grid = np.full((len(s), E), np.nan)
        for i, row in enumerate(s):
            grid[i, : len(row)] = row
        im = ax.imshow(grid, cmap="viridis", vmin=0.0, aspect="auto")
        if grid.size <= 256:
            hi = np.nanmax(grid) if np.isfinite(grid).any() else 0.0
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    if math.isfinite(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j] * 100:.0f}", ha="center", va="center", fontsize=7,
                                color="black" if grid[i, j] > 0.6 * hi else "white")
        cfg = _variant_config(results, v)
        ax.set_yticks(range(len(s)), _moe_layer_labels(cfg, len(s)))
        ax.set_xticks(range(E), [str(e) for e in range(E)])
        ax.set_xlabel("expert")
        n = len(results.done(v))
        ax.set_title(
            f"{v} ({_router_name(cfg)}, {n} run{'s' if n != 1 else ''}): share of tokens per expert, % "
            f"(uniform = {100 / E:.1f}%)",
            fontsize=9,
        )
        fig.colorbar(im, ax=ax, label="share", shrink=0.9)
    return fig


def _plot_ppl_vs_flops(results: SweepResults, comparison: Comparison | None) -> Figure:
    colors = _variant_colors(results)
    points: dict[str, list[tuple[float, float]]] = {}
    for v in results.variants:
        for r in results.done(v):
            x, y = _num(_get(r.final, "flops_per_token", "experts")), _num(_get(r.final, "test_ppl"))
            if x is not None and y is not None:
                points.setdefault(v, []).append((x, y))
    if not points:
        return _message_figure("No finished run reports expert FLOPs and test PPL.")
    fig = _new_figure(7.5, 4.5)
    ax = fig.add_subplot()
    markers = "osD^vPX*"
    for k, (v, pts) in enumerate(points.items()):  # distinct hollow markers: runs of equal FLOPs overlap
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=42, label=v, marker=markers[k % len(markers)],
                   facecolors="none", edgecolors=[colors[v]], linewidths=1.4)
    ax.set_xlabel("expert (MoE) FLOPs per token, forward (dense FFN layers not counted)")
    ax.set_ylabel("test perplexity")
    ax.set_title("Test PPL vs expert FLOPs per token (one point per run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_routing_params(results: SweepResults, comparison: Comparison | None) -> Figure:
    rows = []
    for v in results.variants:
        for r in results.done(v):
            counts = _get(r.final, "parameter_counts")
            routing, linear = _num(_get(counts, "routing")), _num(_get(counts, "linear_router"))
            if routing is not None:
                rows.append((v, routing, linear if linear is not None else 0.0))
                break
    if not rows:
        return _message_figure("No finished run reports its parameter counts.")
    colors = _variant_colors(results)
    fig = _new_figure(max(5.0, 1.3 * len(rows) + 2.5), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    w = 0.38
    bars = ax.bar(x - w / 2, [r[1] for r in rows], w, color=[colors[r[0]] for r in rows], label="routing parameters")
    lin = ax.bar(x + w / 2, [r[2] for r in rows], w, color="#bbbbbb", hatch="//", edgecolor="#777777",
                 label="a linear router (D·E per layer)")
    for group in (bars, lin):
        ax.bar_label(group, labels=[f"{int(b.get_height()):,}" for b in group], fontsize=7, padding=2)
    ax.set_xticks(x, [f"{r[0]}\n({_router_name(_variant_config(results, r[0]))})" for r in rows])
    ax.set_ylabel("parameters (all MoE layers)")
    ax.set_title("Routing parameters per variant")
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
  padding:0 1rem;color:#1f2328;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem;
  margin-top:2rem}
.meta{color:#57606a}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.25rem .55rem;vertical-align:top}
th{background:#f6f8fa;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{font-weight:600}
img{max-width:100%;height:auto;border:1px solid #eaeef2;margin:.4rem 0}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.85rem}
.error{white-space:pre-wrap;font-family:monospace;font-size:.8rem;color:#cf222e;max-width:40rem}
.caption{color:#57606a;font-size:.9rem}
.note{color:#9a6700}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _verdict_html(verdict: str) -> str:
    if not verdict:
        return _DASH
    return f'<span class="verdict" style="color:{_HTML_COLOR.get(verdict, "#1f2328")}">{_e(verdict)}</span>'


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int], *, table_id: str,
                raw: frozenset[int] | set[int] = frozenset()) -> str:
    """A table; cells are escaped unless their column is in ``raw`` (already HTML)."""
    out = [f'<table id="{_e(table_id)}"><thead><tr>']
    out += [f"<th>{_e(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            cls = ' class="num"' if i in numeric else ""
            out.append(f"<td{cls}>{cell if i in raw else _e(cell)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _plot_section(section_id: str, title: str, caption: str, fig: Figure | None, extra: str = "") -> str:
    parts = [f'<section id="{section_id}"><h2>{_e(title)}</h2>']
    if caption:
        parts.append(f'<p class="caption">{_e(caption)}</p>')
    if extra:
        parts.append(extra)
    if fig is not None:
        parts.append(f'<img id="plot-{section_id}" alt="{_e(title)}" src="{_png_data_uri(fig)}">')
    parts.append("</section>")
    return "".join(parts)


def _render_html(
    results: SweepResults, comparison: Comparison | None, *, margin: float, relative: bool, alpha: float
) -> str:
    margin_text = _margin_text(comparison, margin, relative)
    name = f"{results.name} (sweep {results.sweep_id})"
    n_done = len(results.done())
    body: list[str] = [f"<h1>Sweep report: {_e(name)}</h1>"]
    meta = [
        f"created {_e(results.created_at)}" if results.created_at else "",
        f"reference variant: <b>{_e(comparison.reference)}</b>" if comparison is not None else "",
        f"equivalence margin: <b>{_e(margin_text)}</b>",
        f"α = {_e(f'{comparison.alpha if comparison is not None else alpha:g}')}",
        f"{n_done} of {len(results.runs)} runs finished",
    ]
    body.append(f'<p class="meta">{" · ".join(m for m in meta if m)}</p>')

    # summary table
    rows = _summary_rows(results, comparison)
    body.append('<section id="summary"><h2>Summary</h2>')
    body.append(f'<p class="caption">{_e(_title(results, comparison, margin_text))}</p>')
    body.append(
        _html_table(
            _headers(comparison),
            [
                [r.variant, r.router, r.runs, r.test, r.val, r.delta, r.flops, r.routing, r.p, _verdict_html(r.verdict)]
                for r in rows
            ],
            numeric={2, 3, 4, 5, 6, 7, 8},
            raw={9},
            table_id="summary-table",
        )
    )
    body.append(
        '<p class="caption">Expert FLOPs: forward FLOPs per token of the routed and shared experts over all MoE '
        "layers (0 for dense models). Routing params: learned routing parameters over all MoE layers.</p></section>"
    )

    # notes
    notes = _report_notes(results, comparison)
    body.append('<section id="notes"><h2>Notes</h2>')
    body.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>" if notes else "<p>None.</p>")
    body.append("</section>")

    # TOST pairs
    body.append('<section id="tost-pairs"><h2>Equivalence tests (TOST) of every pair</h2>')
    if comparison is None or not comparison.pairs:
        body.append("<p>No pair to test.</p>")
    else:
        body.append(
            f'<p class="caption">diff = mean(a) − mean(b) in test PPL; equivalent when the '
            f"{_e(_ci_label(comparison))} of diff lies within {_e(margin_text)}, i.e. both one-sided p &lt; "
            f"{_e(f'{comparison.alpha:g}')}; different when not equivalent and Welch p &lt; "
            f"{_e(f'{comparison.alpha:g}')}.</p>"
        )
        pair_rows = []
        for pr in comparison.pairs:
            t, w = pr.tost, pr.welch
            pair_rows.append(
                [
                    pr.a,
                    pr.b,
                    f"{t.diff:+.3f}" if t is not None else _DASH,
                    f"[{t.ci_low:+.3f}, {t.ci_high:+.3f}]" if t is not None else _DASH,
                    _fmt_p(t.p_lower) if t is not None else _DASH,
                    _fmt_p(t.p_upper) if t is not None else _DASH,
                    _fmt_p(t.p) if t is not None else _DASH,
                    _fmt_p(w.p) if w is not None else _DASH,
                    _verdict_html(pr.verdict),
                    pr.note,
                ]
            )
        body.append(
            _html_table(
                ["a", "b", "diff", _ci_label(comparison), "p_lower", "p_upper", "TOST p", "Welch p", "verdict", "note"],
                pair_rows,
                numeric={2, 3, 4, 5, 6, 7},
                raw={8},
                table_id="tost-table",
            )
        )
    body.append("</section>")

    # plots
    body.append(
        _plot_section(
            "loss-curves",
            "1. Training loss",
            "Training cross-entropy vs tokens, finished runs only; line = mean over seeds (records aligned "
            "by step), band = min–max over seeds.",
            _plot_loss_curves(results, comparison),
        )
    )
    body.append(
        _plot_section(
            "test-ppl",
            "2. Test perplexity",
            "Mean test PPL per variant with its t-based confidence interval (error bars); a variant with a "
            "single finished seed is drawn as a diamond labelled “1 seed” (no CI). The grey band is the "
            "reference mean ± the equivalence margin.",
            _plot_test_ppl(results, comparison),
        )
    )
    body.append(
        _plot_section(
            "tost-matrix",
            "3. TOST matrix",
            "TOST p-value of each pair of variants (symmetric), with the verdict; grey cells: no test "
            "(a single seed, or no spread).",
            _plot_tost_matrix(results, comparison),
        )
    )
    moe, dense = _moe_variants(results)
    load_fig = _plot_expert_load(results, comparison)
    load_notes = []
    if dense:
        load_notes.append(f"Dense variants skipped (no experts): {', '.join(dense)}.")
    no_load = [v for v in moe if _expert_load(results.done(v)) is None]
    if no_load:
        load_notes.append(f"No expert loads logged by a finished run of: {', '.join(no_load)}.")
    if load_fig is None:
        load_notes.append("No expert-load heatmap: no MoE variant has finished runs with logged loads.")
    body.append(
        _plot_section(
            "expert-load",
            "4. Expert load per layer",
            "Share of routed (token, expert) assignments each expert received, summed over all logged "
            "intervals of all finished runs of a variant and normalised per layer.",
            load_fig,
            extra="".join(f'<p class="note">{_e(n)}</p>' for n in load_notes),
        )
    )
    body.append(
        _plot_section(
            "ppl-vs-flops",
            "5. Test PPL vs expert FLOPs",
            "One point per finished run: its test PPL against the forward FLOPs per token of its experts "
            "(measured active experts for variable-k routers).",
            _plot_ppl_vs_flops(results, comparison),
        )
    )
    body.append(
        _plot_section(
            "routing-params",
            "6. Routing parameters",
            "Learned routing parameters over all MoE layers per variant, next to what a linear router "
            "(D·E per layer) would have.",
            _plot_routing_params(results, comparison),
        )
    )

    # runs
    run_rows = []
    order = {v: i for i, v in enumerate(results.variants)}
    for r in sorted(results.runs, key=lambda r: (order.get(r.variant, len(order)), r.variant, r.seed, r.run_id)):
        secs = r.train_seconds if r.train_seconds is not None else _num(_get(r.final, "train_seconds"))
        run_rows.append(
            [
                r.variant,
                str(r.seed),
                r.status,
                _fmt(_num(_get(r.final, "test_ppl"))),
                _fmt(_num(secs), 1),
                r.git_revision or _DASH,
                f'<div class="error">{_e(r.error)}</div>' if r.error else "",
            ]
        )
    body.append('<section id="runs"><h2>Runs</h2>')
    body.append(
        _html_table(
            ["variant", "seed", "status", "test PPL", "train seconds", "git revision", "error"],
            run_rows,
            numeric={1, 3, 4},
            raw={6},
            table_id="runs-table",
        )
    )
    body.append("</section>")

    # spec
    spec = json.dumps(results.spec, indent=2, sort_keys=False, ensure_ascii=False, default=str)
    body.append(f'<section id="spec"><h2>Sweep spec</h2><pre>{_e(spec)}</pre></section>')

    title = f"sparseroute sweep report: {name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and os.replace: the
    old file stays as it was, and no temporary file is left, if anything fails."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_report(
    results: SweepResults, path: str | os.PathLike[str], *, margin: float = 1.0, relative: bool = False,
    alpha: float = 0.05,
) -> Path:
    """Write the HTML report of ``results`` to ``path`` (its folder is created if needed) and
    return the path. The file is self-contained and replaced atomically."""
    path = Path(path)
    comparison = comparison_of(results, margin=margin, relative=relative, alpha=alpha)
    document = _render_html(results, comparison, margin=margin, relative=relative, alpha=alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, document.encode("utf-8"))
    return path
