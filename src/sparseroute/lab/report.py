"""The report of a sweep: a terminal summary (a rich table) and one self-contained HTML file.

* :func:`comparison_of` runs the statistics (:func:`sparseroute.lab.stats.compare`) on the test
  perplexity of the finished runs, against the sweep's reference variant; the verdicts use
  Holm-adjusted p-values over the testable pairs unless ``correction=None``.
* :func:`summary_table` / :func:`print_summary`: one row per variant (spec order) with its router,
  runs done, mean test PPL ± CI half-width, val PPL, expert FLOPs per token, routing parameters,
  the raw and adjusted TOST p-values and the verdict against the reference; then the notes and
  every tested pair. :func:`print_seed_plans`: the seeds each pair needs (``report --plan-seeds``).
* :func:`write_report`: a single HTML file (inline CSS, plots as base64 PNG data URIs, nothing
  loaded from elsewhere), written atomically: the summary, every pair's raw and adjusted p-values,
  the seeds each pair needs when plans are given, loss curves, test PPL with CIs, the TOST p-value
  matrix, expert-load heatmaps, PPL vs expert FLOPs, routing parameters, the tables, the notes,
  the per-run table and the sweep spec; when finished runs carry them, also the routing profile,
  the halting trade-off of multi-hop variants and the experts' favourite tokens; for sweeps with
  sparse attention (``model.attention``) a table of each variant's attention router, test PPL,
  density, recall, mass, attention FLOPs and seconds per step
  (:mod:`sparseroute.lab.attention_summary`, also printed after the terminal summary). The
  sections present are numbered 1..n in order.

The HTML comes from the Jinja2 templates in ``sparseroute/lab/templates/`` (autoescaped; see
:mod:`sparseroute.lab.report_sections`), the figures from :mod:`sparseroute.lab.plots`, the table
and notes from :mod:`sparseroute.lab.summary`, the diagnostics sections from
:mod:`sparseroute.lab.report_sections`. The output depends only on the results (no timestamps), so the
same results give the same file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console

from sparseroute.fileio import atomic_write_text
from sparseroute.lab.attention_summary import attention_section, print_attention_summary
from sparseroute.lab.results import SweepResults
from sparseroute.lab.stats import Comparison, SeedPlan

from sparseroute.lab.plots import (
    _expert_load,
    _moe_variants,
    _plot_expert_load,
    _plot_loss_curves,
    _plot_ppl_vs_flops,
    _plot_routing_params,
    _plot_test_ppl,
    _plot_tost_matrix,
)
from sparseroute.lab.report_sections import (
    Cell,
    Section,
    Table,
    _html,
    _plot_section,
    _table,
    halting_section,
    number_sections,
    render,
    routing_profile_section,
    sparse_weights_section,
    specialisation_section,
)
from sparseroute.lab.summary import (
    _DASH,
    _HTML_COLOR,
    _ci_label,
    _console,
    _correction_name,
    _correction_text,
    _fmt,
    _fmt_p,
    _get,
    _have_text,
    _headers,
    _margin_text,
    _num,
    _plan_heading,
    _report_notes,
    _row_values,
    _summary_rows,
    _title,
    comparison_of,
    print_seed_plans,
    summary_table,
)
from sparseroute.lab.summary import print_summary as _print_summary

__all__ = ["comparison_of", "summary_table", "print_summary", "print_seed_plans", "write_report",
           "check_report_path"]

def print_summary(results: SweepResults, comparison: Comparison | None, console: Console | None = None) -> None:
    """:func:`sparseroute.lab.summary.print_summary` (the table, the notes, the pairs, multi-hop
    lines), then the sparse attention table when some variant has sparse attention."""
    console = _console(console)
    _print_summary(results, comparison, console)
    print_attention_summary(results, comparison, console)


# ---------------------------------------------------------------- HTML
def _verdict_html(verdict: str) -> Cell:
    if not verdict:
        return _DASH
    return _html('<span class="verdict" style="color:{}">{}</span>', _HTML_COLOR.get(verdict, "#1f2328"), verdict)


def _summary_table(results: SweepResults, comparison: Comparison | None) -> Table:
    headers = _headers(comparison)
    rows = [[*_row_values(r, comparison), _verdict_html(r.verdict)] for r in _summary_rows(results, comparison)]
    return _table(headers, rows, numeric=range(2, len(headers) - 1), table_id="summary-table")


def _pairs_table(comparison: Comparison | None) -> Table | None:
    """Every tested pair with both one-sided p-values, the CI of diff, the raw and (with a
    correction) adjusted TOST and Welch p-values; ``None`` with no pair."""
    if comparison is None or not comparison.pairs:
        return None
    adjusted = comparison.correction is not None
    rows = []
    for pr in comparison.pairs:
        t, w = pr.tost, pr.welch
        note = pr.note
        if pr.raw_verdict != pr.verdict:
            note = f"{note}; " if note else ""
            note += f"{pr.raw_verdict} from the raw p"
        rows.append(
            [
                pr.a,
                pr.b,
                f"{t.diff:+.3f}" if t is not None else _DASH,
                f"[{t.ci_low:+.3f}, {t.ci_high:+.3f}]" if t is not None else _DASH,
                _fmt_p(t.p_lower) if t is not None else _DASH,
                _fmt_p(t.p_upper) if t is not None else _DASH,
                _fmt_p(t.p) if t is not None else _DASH,
                *([_fmt_p(pr.tost_p_adjusted)] if adjusted else []),
                _fmt_p(w.p) if w is not None else _DASH,
                *([_fmt_p(pr.welch_p_adjusted)] if adjusted else []),
                _verdict_html(pr.verdict),
                note,
            ]
        )
    name = _correction_name(comparison)
    headers = ["a", "b", "diff", _ci_label(comparison), "p_lower", "p_upper", "TOST p",
               *([f"TOST p ({name})"] if adjusted else []), "Welch p", *([f"Welch p ({name})"] if adjusted else []),
               "verdict", "note"]
    return _table(headers, rows, numeric=range(2, len(headers) - 2), table_id="tost-table")


def _plans_table(plans: list[SeedPlan] | None) -> Table | None:
    """One row per planned pair: pooled sd, margin, assumed difference, seeds now and needed."""
    if not plans:
        return None
    holm = any(p.needed_corrected is not None for p in plans)
    m = plans[0].family_size
    rows = []
    for p in plans:
        known = math.isfinite(p.sd)
        rows.append([
            p.a, p.b, _fmt(p.sd, 3) if known else _DASH, f"{p.margin:.3g}", f"{p.diff:+.3f}",
            _have_text(p.have).removeprefix("have "),
            str(p.needed) if p.needed is not None else _DASH,
            *([str(p.needed_corrected) if p.needed_corrected is not None else _DASH] if holm else []),
            p.note,
        ])
    headers = ["a", "b", "pooled sd (PPL)", "margin (PPL)", "assumed diff (PPL)", "seeds now",
               f"seeds needed ({plans[0].power:.0%} power)", *([f"with Holm over {m} pairs (α/{m})"] if holm else []),
               "note"]
    return _table(headers, rows, numeric=range(2, len(headers) - 1), table_id="seed-plan-table")


def _sections(results: SweepResults, comparison: Comparison | None) -> list[Section]:
    """The numbered sections of the report: the plots, then the routing diagnostics that have data,
    numbered 1..n among those present. The figures are drawn in this order."""
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
    return number_sections([
        _plot_section(
            "loss-curves",
            "Training loss",
            "Training cross-entropy vs tokens, finished runs only; line = mean over seeds (records aligned "
            "by step), band = min–max over seeds.",
            _plot_loss_curves(results, comparison),
        ),
        _plot_section(
            "test-ppl",
            "Test perplexity",
            "Mean test PPL per variant with its t-based confidence interval (error bars); a variant with a "
            "single finished seed is drawn as a diamond labelled “1 seed” (no CI). The grey band is the "
            "reference mean ± the equivalence margin.",
            _plot_test_ppl(results, comparison),
        ),
        _plot_section(
            "tost-matrix",
            "TOST matrix",
            "TOST p-value of each pair of variants (symmetric) that the verdict uses (adjusted for the number "
            "of pairs unless --no-correction), with the verdict; grey cells: no test (a single seed, or no spread).",
            _plot_tost_matrix(results, comparison),
        ),
        _plot_section(
            "expert-load",
            "Expert load per layer",
            "Share of routed (token, expert) assignments each expert received, summed over all logged "
            "intervals of all finished runs of a variant and normalised per layer.",
            load_fig,
            notes=load_notes,
        ),
        _plot_section(
            "ppl-vs-flops",
            "Test PPL vs expert FLOPs",
            "One point per finished run: its test PPL against the forward FLOPs per token of its experts "
            "(measured active experts for variable-k routers).",
            _plot_ppl_vs_flops(results, comparison),
        ),
        _plot_section(
            "routing-params",
            "Routing parameters",
            "Learned routing parameters over all MoE layers per variant, next to what a linear router "
            "(D·E per layer) would have.",
            _plot_routing_params(results, comparison),
        ),
        attention_section(results, comparison),  # None without sparse attention
        sparse_weights_section(results),  # None without sparse weights
        # routing diagnostics: each None (left out) when no finished run has the data
        routing_profile_section(results),
        halting_section(results, comparison),
        specialisation_section(results, comparison),
    ])


def _runs_table(results: SweepResults) -> Table:
    rows = []
    order = {v: i for i, v in enumerate(results.variants)}
    for r in sorted(results.runs, key=lambda r: (order.get(r.variant, len(order)), r.variant, r.seed, r.run_id)):
        secs = r.train_seconds if r.train_seconds is not None else _num(_get(r.final, "train_seconds"))
        rows.append(
            [
                r.variant,
                str(r.seed),
                r.status,
                _fmt(_num(_get(r.final, "test_ppl"))),
                _fmt(_num(secs), 1),
                r.git_revision or _DASH,
                _html('<div class="error">{}</div>', r.error) if r.error else "",
            ]
        )
    return _table(["variant", "seed", "status", "test PPL", "train seconds", "git revision", "error"], rows,
                  numeric={1, 3, 4}, table_id="runs-table")


def _render_html(
    results: SweepResults, comparison: Comparison | None, *, margin: float, relative: bool, alpha: float,
    plans: list[SeedPlan] | None = None,
) -> str:
    margin_text = _margin_text(comparison, margin, relative)
    correction = _correction_text(comparison)
    name = f"{results.name} (sweep {results.sweep_id})"
    return render(
        "report.html.j2",
        title=f"sparseroute sweep report: {name}",
        name=name,
        created_at=results.created_at,
        reference=comparison.reference if comparison is not None else None,
        margin_text=margin_text,
        alpha=f"{comparison.alpha if comparison is not None else alpha:g}",
        n_done=len(results.done()),
        n_runs=len(results.runs),
        summary_caption=_title(results, comparison, margin_text) + (f"; TOST {correction}" if correction else ""),
        correction_text=correction,
        correction_name=_correction_name(comparison) if comparison is not None and comparison.correction else "",
        summary=_summary_table(results, comparison),
        notes=_report_notes(results, comparison),
        ci_label=_ci_label(comparison) if comparison is not None else "",
        n_tested=comparison.family_size if comparison is not None else 0,
        pairs=_pairs_table(comparison),
        plans=_plans_table(plans),
        plan_heading=_plan_heading(plans, comparison) if plans and comparison is not None else "",
        sections=_sections(results, comparison),
        runs=_runs_table(results),
        spec=json.dumps(results.spec, indent=2, sort_keys=False, ensure_ascii=False, default=str),
    )


def check_report_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path if the report can be written there; ValueError (naming the path) when it
    is a folder or lies under a file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; the report is a file, e.g. {path / 'report.html'}")
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"cannot write the report {path}: {parent} is a file, not a folder")
            break
    return path


def write_report(
    results: SweepResults, path: str | os.PathLike[str], *, margin: float = 1.0, relative: bool = False,
    alpha: float = 0.05, correction: str | None = "holm", plans: list[SeedPlan] | None = None,
) -> Path:
    """Write the HTML report of ``results`` to ``path`` (its folder is created if needed) and
    return the path. The file is self-contained and replaced atomically. A ``path`` that is a
    folder or lies under a file raises ValueError before anything is written. ``correction``: as
    :func:`comparison_of`; ``plans`` (:func:`sparseroute.lab.stats.plan_seeds` of the same
    comparison) adds the "Seeds needed" section."""
    path = check_report_path(path)
    comparison = comparison_of(results, margin=margin, relative=relative, alpha=alpha, correction=correction)
    document = _render_html(results, comparison, margin=margin, relative=relative, alpha=alpha, plans=plans)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, document)
    return path
