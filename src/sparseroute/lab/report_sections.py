"""HTML building blocks of the sweep report (escaping, tables, plot sections) and its routing
diagnostics sections, each present only when some finished run carries the data:

* ``routing-profile``: per variant, the eval-mode routing statistics of ``final["routing_profile"]``
  (mean over layers, then per layer; each averaged over seeds), the routing fluctuation between
  two checkpoints and the router–expert coupling of ``final["diagnostics"]``.
* ``halting``: PPL change vs MoE FLOPs saved per halting threshold τ (multi-hop variants with
  ``final["halting"]``) and one table per variant.
* ``specialisation``: the tokens each expert receives most often as top-1, with their lift, for
  the reference variant and at most two others (their first finished seed).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from sparseroute.lab.plots import HALTING_TARGET_SAVED_PCT, _plot_halting, _png_data_uri
from sparseroute.lab.results import RunResult, SweepResults
from sparseroute.lab.stats import Comparison
from sparseroute.lab.summary import (
    _DASH,
    HALTING_PPL_LIMIT_PCT,
    _fmt,
    _get,
    _halting_line,
    _moe_layer_labels,
    _moe_of,
    _num,
    _router_name,
    _routing_profile,
    _variant_config,
    halting_summary,
)

_SPECIALISATION_VARIANTS = 3  # the reference variant and at most two others


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


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


def _plot_section(section_id: str, title: str, caption: str, fig: Figure | None, extra: str = "",
                  after: str = "") -> str:
    """A section with a caption, ``extra`` HTML, the figure as a PNG data URI and ``after`` HTML."""
    parts = [f'<section id="{section_id}"><h2>{_e(title)}</h2>']
    if caption:
        parts.append(f'<p class="caption">{_e(caption)}</p>')
    if extra:
        parts.append(extra)
    if fig is not None:
        parts.append(f'<img id="plot-{section_id}" alt="{_e(title)}" src="{_png_data_uri(fig)}">')
    parts.append(after)
    parts.append("</section>")
    return "".join(parts)


# ---------------------------------------------------------------- routing profile
_PROFILE_COLUMNS = (  # (statistic, header, digits, always shown)
    ("entropy", "entropy", 3, True),
    ("imbalance", "imbalance", 3, True),
    ("active_per_token", "active experts/token", 2, True),
    ("hop_cos", "hop cos(Δh0, Δh1)", 3, False),
    ("hops_per_token", "hops/token", 3, False),
    ("tls", "TLS", 3, False),
)


def _fluctuation(runs: Sequence[RunResult]) -> tuple[float, list[tuple[int, int]]] | None:
    """Mean over layers and runs of the share of tokens whose top-1 expert changed, and the step ranges."""
    means, ranges = [], []
    for r in runs:
        fl = _get(r.final, "diagnostics", "routing_fluctuation")
        vals = [y for x in (_get(fl, "per_layer") or ()) if (y := _num(x)) is not None]
        if vals:
            means.append(sum(vals) / len(vals))
            a, b = _num(_get(fl, "from_step")), _num(_get(fl, "to_step"))
            if a is not None and b is not None and (int(a), int(b)) not in ranges:
                ranges.append((int(a), int(b)))
    return (sum(means) / len(means), ranges) if means else None


def _coupling(runs: Sequence[RunResult]) -> float | str | None:
    """Mean |cos| over experts, layers and runs; "n/a" when the router has no direction."""
    vals, seen = [], False
    for r in runs:
        layers = _get(r.final, "diagnostics", "router_expert_coupling")
        seen |= isinstance(layers, list)
        for layer in layers if isinstance(layers, list) else ():
            vals += [y for x in (layer if isinstance(layer, list) else ()) if (y := _num(x)) is not None]
    if vals:
        return sum(vals) / len(vals)
    return "n/a (no router direction)" if seen else None


def _profile_cell(layers: list[dict[str, float]], key: str, digits: int) -> str:
    vals = [lay.get(key) for lay in layers]
    present = [v for v in vals if v is not None]
    if not present:
        return _DASH
    text = _e(_fmt(sum(present) / len(present), digits))
    if len(vals) > 1:
        text += f' <span class="caption">({_e(" / ".join(_fmt(v, digits) for v in vals))})</span>'
    return text


def routing_profile_section(results: SweepResults) -> str:
    """The ``routing-profile`` section, or "" when no finished run has routing diagnostics."""
    data = {}
    for v in results.variants:
        done = results.done(v)
        prof, fl, cp = _routing_profile(done), _fluctuation(done), _coupling(done)
        if prof is not None or fl is not None or cp is not None:
            data[v] = (prof or [], fl, cp)
    if not data:
        return ""
    keys = {k for prof, _, _ in data.values() for lay in prof for k in lay}
    multi_hop = "hop_cos" in keys or any((_moe_of(_variant_config(results, v)) or {}).get("hops", 1) > 1 for v in data)
    cls_keys = sorted((k for k in keys if k.startswith("cls") and k[3:].isdigit()), key=lambda k: int(k[3:]))
    cols = [(k, h, d) for k, h, d, always in _PROFILE_COLUMNS
            if always or (k in keys and (k != "hops_per_token" or multi_hop))]
    cols += [(k, k.upper(), 3) for k in cls_keys]
    show_fl = any(fl is not None for _, fl, _ in data.values())
    show_cp = any(cp is not None for _, _, cp in data.values())
    headers = ["variant", "router", "MoE layers"] + [h for _, h, _ in cols]
    headers += ["routing fluctuation"] * show_fl + ["router–expert |cos|"] * show_cp
    rows = []
    for v, (prof, fl, cp) in data.items():
        cfg = _variant_config(results, v)
        row = [_e(v), _e(_router_name(cfg)), _e(", ".join(_moe_layer_labels(cfg, len(prof))) or _DASH)]
        row += [_profile_cell(prof, k, d) for k, _, d in cols]
        if show_fl:
            steps = ", ".join(f"{a}→{b}" for a, b in fl[1]) if fl is not None else ""
            row.append(_DASH if fl is None else _e(f"{fl[0] * 100:.1f}%" + (f" (steps {steps})" if steps else "")))
        if show_cp:
            row.append(_DASH if cp is None else _e(cp if isinstance(cp, str) else _fmt(cp, 3)))
        rows.append(row)
    caption = ("Eval-mode routing statistics on validation text, token-weighted per layer and averaged over "
               "the finished seeds; a cell is the mean over MoE layers, the values per layer follow in "
               "brackets. Imbalance: max expert load over the mean load.")
    if "hop_cos" in keys:
        caption += " Hop cos: cos(Δh0, Δh1) of the first two hops' updates (1 = collinear)."
    if show_fl:
        caption += (" Routing fluctuation: share of tokens whose top-1 expert differs between an earlier "
                    "checkpoint and the final model (mean over layers and seeds).")
    if show_cp:
        dims = sorted({int(d) for v, (_, _, cp) in data.items() if isinstance(cp, float)
                       and (d := _num(_get(_variant_config(results, v), "model", "d_model")))})
        chance = ", ".join(f"≈ {math.sqrt(2 / (math.pi * d)):.3f} for D = {d}" for d in dims)
        caption += (" Router–expert |cos|: per expert, |cos| between its router direction and the top "
                    "left-singular vector of its input weights, mean over experts, layers and seeds; random "
                    f"directions in D dims give about sqrt(2/(πD)){f' ({chance})' if chance else ''}.")
    return ('<section id="routing-profile"><h2>7. Routing profile</h2>'
            f'<p class="caption">{_e(caption)}</p>'
            + _html_table(headers, rows, numeric=set(range(3, len(headers))), raw=set(range(len(headers))),
                          table_id="routing-profile-table")
            + "</section>")


# ---------------------------------------------------------------- halting
def _pct(x: Any, scale: float = 100.0, sign: bool = False) -> str:
    v = _num(x)
    return _DASH if v is None else f"{v * scale:{'+' if sign else ''}.2f}"


def halting_section(results: SweepResults, comparison: Comparison | None) -> str:
    """The ``halting`` section (plot and one table per variant), or "" without halting data."""
    summaries = halting_summary(results)
    fig = _plot_halting(results, comparison)
    if not summaries or fig is None:
        return ""
    tables = []
    for i, (v, h) in enumerate(summaries.items()):
        best = h["best"]
        rows = [[f"{row['tau']:g}" + (" ★" if row is best else ""), _fmt(_num(row.get("ppl")), 3),
                 _pct(row.get("ppl_change_pct"), 1.0, sign=True), _pct(row.get("moe_flops_saved")),
                 _pct(row.get("time_saved")), str(row["seeds"])] for row in h["curve"]]
        tables.append(f"<h3>{_e(v)} ({h['runs']} run{'s' if h['runs'] != 1 else ''})</h3>")
        tables.append(_html_table(["τ", "PPL", "Δ PPL %", "MoE FLOPs saved %", "time saved %", "seeds"], rows,
                                  numeric={0, 1, 2, 3, 4, 5}, table_id=f"halting-table-{i}"))
        tables.append(f'<p class="caption">{_e(_halting_line(v, h))}</p>')
    caption = (f"Relative-norm halting of multi-hop MoE layers, evaluated zero-shot on validation text per "
               f"threshold τ (τ = 0: no halting, the baseline). One point per τ, mean over the seeds that "
               f"evaluated it; MoE FLOPs saved = share of routed (token, expert) work not dispatched. Shaded: "
               f"the target, ≥{HALTING_TARGET_SAVED_PCT:g}% saved at ≤ +{HALTING_PPL_LIMIT_PCT:g}% PPL; ★ in "
               f"the tables: the τ saving the most within +{HALTING_PPL_LIMIT_PCT:g}% PPL. Time saved is "
               f"wall-clock and noisy.")
    return _plot_section("halting", "8. Halting: PPL vs MoE FLOPs saved", caption, fig, after="".join(tables))


# ---------------------------------------------------------------- expert specialisation
def _token_text(token: Any, byte_tokens: bool) -> str:
    if byte_tokens and isinstance(token, int) and 0 <= token < 128 and (chr(token).isprintable()
                                                                         or chr(token) in "\n\t"):
        return repr(chr(token))
    return str(token)


def specialisation_section(results: SweepResults, comparison: Comparison | None) -> str:
    """The ``specialisation`` section, or "" when no finished run has expert specialisation data."""
    ref = comparison.reference if comparison is not None else results.reference
    order = sorted(results.variants, key=lambda v: v != ref)
    picked: list[tuple[str, RunResult]] = []
    for v in order:
        run = next((r for r in results.done(v)
                    if isinstance(_get(r.final, "diagnostics", "expert_specialisation"), list)), None)
        if run is not None and len(picked) < _SPECIALISATION_VARIANTS:
            picked.append((v, run))
    if not picked:
        return ""
    parts = ['<section id="specialisation"><h2>9. Expert specialisation</h2>',
             '<p class="caption">Per layer and expert, the input tokens routed to it most often as top-1 on '
             "validation text (one finished seed), with their lift: the token's share of the expert's tokens "
             "over its share of the text (1 = no preference). Byte tokens are shown as characters.</p>"]
    for i, (v, run) in enumerate(picked):
        spec = run.final["diagnostics"]["expert_specialisation"]
        byte_tokens = _get(run.config, "data", "tokenizer") == "bytes"
        labels = _moe_layer_labels(run.config, len(spec))
        rows = []
        for label, layer in zip(labels, spec):
            for e, top in enumerate(layer if isinstance(layer, list) else []):
                toks = [f"{_token_text(t[0], byte_tokens)} {lift:.1f}×" for t in top
                        if isinstance(t, (list, tuple)) and len(t) >= 3 and (lift := _num(t[2])) is not None]
                rows.append([label, str(e), ", ".join(toks) or _DASH])
        parts.append(f"<h3>{_e(v)} (seed {_e(run.seed)})</h3>")
        parts.append(_html_table(["layer", "expert", "top tokens (lift)"], rows, numeric={1},
                                 table_id=f"specialisation-table-{i}"))
    parts.append("</section>")
    return "".join(parts)
