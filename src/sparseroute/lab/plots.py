"""The report's figures, drawn on bare :class:`matplotlib.figure.Figure` objects with the Agg canvas
(pyplot's global state is never touched): loss curves, test PPL with CIs, the TOST matrix,
expert-load heatmaps, PPL vs expert FLOPs, routing parameters and the halting trade-off of
multi-hop variants."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sparseroute.lab.results import RunResult, SweepResults
from sparseroute.lab.stats import Comparison

from sparseroute.lab.summary import (
    _DASH,
    _DPI,
    HALTING_PPL_LIMIT_PCT,
    _get,
    _moe_layer_labels,
    _moe_of,
    _num,
    _router_name,
    _variant_colors,
    _variant_config,
    halting_summary,
)

HALTING_TARGET_SAVED_PCT = 25.0  # halting target: at least this share of the MoE FLOPs saved

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
                p[i, j] = pair.tost_p_used  # the p-value the verdict uses (adjusted with a correction)
                labels[i][j] = f"p={p[i, j]:.2g}\n{pair.verdict}"
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
    which = "TOST p-value"
    if comparison.correction is not None:
        which = f"{comparison.correction.capitalize()}-adjusted TOST p-value over {comparison.family_size} pairs"
    ax.set_title(f"{which}\n(margin ±{comparison.margin:.3g} PPL; equivalent if p < {comparison.alpha:g})")
    fig.colorbar(im, ax=ax, label="TOST p (max of the two one-sided p)"
                 + (", adjusted" if comparison.correction is not None else ""), shrink=0.8)
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


def _plot_halting(results: SweepResults, comparison: Comparison | None) -> Figure | None:
    """PPL change vs MoE FLOPs saved per halting threshold τ (means over seeds), one line per
    multi-hop variant with halting data, over the shaded target region; None when there is none."""
    curves = {}
    for v, h in halting_summary(results).items():
        pts = [(row["moe_flops_saved"] * 100, row["ppl_change_pct"], row["tau"]) for row in h["curve"]
               if _num(row.get("moe_flops_saved")) is not None and _num(row.get("ppl_change_pct")) is not None]
        if pts:
            curves[v] = (pts, h["runs"])
    if not curves:
        return None
    colors = _variant_colors(results)
    xs = [p[0] for pts, _ in curves.values() for p in pts]
    ys = [p[1] for pts, _ in curves.values() for p in pts]
    x_lo, x_hi = min(0.0, min(xs)) - 3.0, max(HALTING_TARGET_SAVED_PCT + 15.0, max(xs) + 8.0)
    y_pad = 0.1 * max(1.0, max(ys) - min(ys))
    y_lo, y_hi = min(-0.5, min(ys)) - y_pad, max(HALTING_PPL_LIMIT_PCT + 0.5, max(ys)) + y_pad
    fig = _new_figure(7.5, 4.8)
    ax = fig.add_subplot()
    ax.fill_between([HALTING_TARGET_SAVED_PCT, x_hi], y_lo, HALTING_PPL_LIMIT_PCT, color="#2da44e", alpha=0.12,
                    lw=0, label=f"target: ≥{HALTING_TARGET_SAVED_PCT:g}% MoE FLOPs saved at ≤ "
                                f"+{HALTING_PPL_LIMIT_PCT:g}% PPL")
    ax.axhline(0.0, color="#999999", lw=0.8)
    for v, (pts, n) in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=5, lw=1.5, color=colors[v],
                label=f"{v} (n={n})")
        for x, y, tau in pts:
            ax.annotate(f"τ={tau:g}", (x, y), xytext=(4, 5), textcoords="offset points", fontsize=7,
                        color=colors[v])
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("MoE (routed-expert) FLOPs saved vs τ = 0, %")
    ax.set_ylabel("PPL change vs τ = 0, %")
    ax.set_title("Relative-norm halting: PPL cost vs MoE FLOPs saved (mean over seeds per τ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig
