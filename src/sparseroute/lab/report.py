"""The report of a sweep: a terminal summary (a rich table) and one self-contained HTML file.

* :func:`comparison_of` runs the statistics (:func:`sparseroute.lab.stats.compare`) on the test
  perplexity of the finished runs, against the sweep's reference variant.
* :func:`summary_table` / :func:`print_summary`: one row per variant (spec order) with its router,
  runs done, mean test PPL ± CI half-width, val PPL, expert FLOPs per token, routing parameters
  and the TOST verdict against the reference; then the notes and every tested pair.
* :func:`write_report`: a single HTML file (inline CSS, plots as base64 PNG data URIs, nothing
  loaded from elsewhere), written atomically: loss curves, test PPL with CIs, the TOST p-value
  matrix, expert-load heatmaps, PPL vs expert FLOPs, routing parameters, the tables, the notes,
  the per-run table and the sweep spec; when finished runs carry them, also the routing profile,
  the halting trade-off of multi-hop variants and the experts' favourite tokens.

The figures come from :mod:`sparseroute.lab.plots`, the table and notes from
:mod:`sparseroute.lab.summary`, the diagnostics sections from
:mod:`sparseroute.lab.report_sections`. The output depends only on the results (no timestamps), so the
same results give the same file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sparseroute.fileio import atomic_write_text
from sparseroute.lab.results import SweepResults
from sparseroute.lab.stats import Comparison

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
    _e,
    _html_table,
    _plot_section,
    halting_section,
    routing_profile_section,
    specialisation_section,
)
from sparseroute.lab.summary import (
    _DASH,
    _HTML_COLOR,
    _ci_label,
    _fmt,
    _fmt_p,
    _get,
    _headers,
    _margin_text,
    _num,
    _report_notes,
    _summary_rows,
    _title,
    comparison_of,
    print_summary,
    summary_table,
)

__all__ = ["comparison_of", "summary_table", "print_summary", "write_report"]

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


def _verdict_html(verdict: str) -> str:
    if not verdict:
        return _DASH
    return f'<span class="verdict" style="color:{_HTML_COLOR.get(verdict, "#1f2328")}">{_e(verdict)}</span>'


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
    # routing diagnostics: each "" (left out) when no finished run has the data
    for section in (routing_profile_section(results), halting_section(results, comparison),
                    specialisation_section(results, comparison)):
        if section:
            body.append(section)

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
    atomic_write_text(path, document)
    return path
