"""Building blocks of the HTML sweep report and its routing diagnostics sections.

The report is rendered by Jinja2 from the templates in ``sparseroute/lab/templates/`` (the page,
its layout with the inline CSS, and macros for tables and sections). Python builds plain data for
them: a :class:`Table` (headers, rows of cells, numeric columns), a :class:`Section` (title,
caption, notes, the plot as a PNG data URI, tables), numbered 1..n by :func:`number_sections` among
the sections actually present. Every value the templates print is escaped by the engine, except
:class:`markupsafe.Markup`, which marks HTML deliberately (verdict spans, error boxes, data URIs).

The routing diagnostics sections are each present only when some finished run carries the data:

* ``routing-profile``: per variant, the eval-mode routing statistics of ``final["routing_profile"]``
  (mean over layers, then per layer; each averaged over seeds), the routing fluctuation between
  two checkpoints and the router–expert coupling of ``final["diagnostics"]``.
* ``halting``: PPL change vs MoE FLOPs saved per halting threshold τ (multi-hop variants with
  ``final["halting"]``) and one table per variant.
* ``specialisation``: the tokens each expert receives most often as top-1, with their lift, for
  the reference variant and at most two others (their first finished seed).
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from matplotlib.figure import Figure

from sparseroute.lab.plots import HALTING_TARGET_SAVED_PCT, _new_figure, _plot_halting, _png_data_uri
from sparseroute.lab.results import RunResult, SweepResults
from sparseroute.lab.stats import Comparison
from sparseroute.lab.summary import (
    _DASH,
    HALTING_PPL_LIMIT_PCT,
    _fmt,
    _get,
    _halting_line,
    _mean,
    _moe_layer_labels,
    _moe_of,
    _num,
    _router_name,
    _routing_profile,
    _variant_colors,
    _variant_config,
    halting_summary,
)

_SPECIALISATION_VARIANTS = 3  # the reference variant and at most two others


Cell = str | Markup  # a table cell: text (escaped when rendered) or Markup (HTML as it is)


@dataclass(frozen=True)
class Table:
    """A table of the report; ``numeric`` holds the indices of the right-aligned columns."""

    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    numeric: frozenset[int]
    table_id: str


def _table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], numeric: Iterable[int], *,
           table_id: str) -> Table:
    return Table(tuple(headers), tuple(tuple(r) for r in rows), frozenset(numeric), table_id)


@dataclass(frozen=True)
class Block:
    """A table of a section, with an optional ``<h3>`` heading before it and a caption after it."""

    table: Table
    heading: str = ""
    caption: str = ""


@dataclass(frozen=True)
class Section:
    """A numbered section: ``<h2>{number}. {title}</h2>``, the caption, the notes, the plot (a PNG
    data URI) and the tables. ``number`` is 0 until :func:`number_sections` sets it."""

    id: str
    title: str
    caption: str = ""
    notes: tuple[str, ...] = ()
    image: Markup | None = None
    blocks: tuple[Block, ...] = ()
    number: int = 0


def number_sections(sections: Iterable[Section | None]) -> list[Section]:
    """The sections present (``None``: left out), in order, numbered 1..n without gaps."""
    return [replace(sec, number=i) for i, sec in enumerate((x for x in sections if x is not None), 1)]


def _plot_section(section_id: str, title: str, caption: str, fig: Figure | None, *, notes: Sequence[str] = (),
                  blocks: Sequence[Block] = ()) -> Section | None:
    """A section with the figure as a PNG data URI (drawn now); ``None`` with nothing to show."""
    if fig is None and not notes and not blocks:
        return None
    image = Markup(_png_data_uri(fig)) if fig is not None else None  # base64 only: safe in an attribute
    return Section(section_id, title, caption, tuple(notes), image, tuple(blocks))


def _escape(value: Any) -> Markup:
    """``value`` as HTML: Markup as it is, anything else escaped with the entities of
    :func:`html.escape` (``&quot;``, ``&#x27;``), which the report has always used: the engine's
    ``finalize`` hook, so every ``{{ … }}`` of the templates goes through it."""
    if hasattr(value, "__html__"):
        return Markup(value.__html__())
    return Markup(html.escape(str(value), quote=True))


def _html(fragment: str, *args: Any) -> Markup:
    """A small HTML fragment: ``fragment`` is a literal with ``{}`` fields, ``args`` are escaped."""
    return Markup(fragment.format(*map(_escape, args)))


@functools.cache
def _environment() -> Environment:
    # PackageLoader finds the templates next to this module, in a source tree or an installed package
    return Environment(loader=PackageLoader("sparseroute.lab", "templates"), autoescape=True,
                       finalize=_escape, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                       keep_trailing_newline=True)


def render(template: str, **context: Any) -> str:
    """Render one of the report's templates (``sparseroute/lab/templates/``) with ``context``."""
    return _environment().get_template(template).render(**context)


# ---------------------------------------------------------------- routing profile
_PROFILE_COLUMNS = (  # (statistic, header, digits, always shown)
    ("entropy", "entropy", 3, True),
    ("imbalance", "imbalance", 3, True),
    ("active_per_token", "active experts/token", 2, True),
    ("hop_cos", "hop cos(Δh0, Δh1)", 3, False),
    ("hops_per_token", "hops/token", 3, False),
    ("tls", "TLS", 3, False),
    ("load_entropy", "load entropy", 3, False),  # low beside a high CLS8: collapse, not locality
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


def _profile_cell(layers: list[dict[str, float]], key: str, digits: int) -> Cell:
    vals = [lay.get(key) for lay in layers]
    present = [v for v in vals if v is not None]
    if not present:
        return _DASH
    text = _fmt(sum(present) / len(present), digits)
    if len(vals) > 1:
        return _html('{} <span class="caption">({})</span>', text, " / ".join(_fmt(v, digits) for v in vals))
    return text


def routing_profile_section(results: SweepResults) -> Section | None:
    """The ``routing-profile`` section, or ``None`` when no finished run has routing diagnostics."""
    data = {}
    for v in results.variants:
        done = results.done(v)
        prof, fl, cp = _routing_profile(done), _fluctuation(done), _coupling(done)
        if prof is not None or fl is not None or cp is not None:
            data[v] = (prof or [], fl, cp)
    if not data:
        return None
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
        row: list[Cell] = [v, _router_name(cfg), ", ".join(_moe_layer_labels(cfg, len(prof))) or _DASH]
        row += [_profile_cell(prof, k, d) for k, _, d in cols]
        if show_fl:
            steps = ", ".join(f"{a}→{b}" for a, b in fl[1]) if fl is not None else ""
            row.append(_DASH if fl is None else f"{fl[0] * 100:.1f}%" + (f" (steps {steps})" if steps else ""))
        if show_cp:
            row.append(_DASH if cp is None else cp if isinstance(cp, str) else _fmt(cp, 3))
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
    table = _table(headers, rows, numeric=range(3, len(headers)), table_id="routing-profile-table")
    return Section("routing-profile", "Routing profile", caption, blocks=(Block(table),))


# ---------------------------------------------------------------- halting
def _pct(x: Any, scale: float = 100.0, sign: bool = False) -> str:
    v = _num(x)
    return _DASH if v is None else f"{v * scale:{'+' if sign else ''}.2f}"


def halting_section(results: SweepResults, comparison: Comparison | None) -> Section | None:
    """The ``halting`` section (plot and one table per variant), or ``None`` without halting data."""
    summaries = halting_summary(results)
    fig = _plot_halting(results, comparison)
    if not summaries or fig is None:
        return None
    tables = []
    for i, (v, h) in enumerate(summaries.items()):
        best = h["best"]
        rows = [[f"{row['tau']:g}" + (" ★" if row is best else ""), _fmt(_num(row.get("ppl")), 3),
                 _pct(row.get("ppl_change_pct"), 1.0, sign=True), _pct(row.get("moe_flops_saved")),
                 _pct(row.get("time_saved")), str(row["seeds"])] for row in h["curve"]]
        table = _table(["τ", "PPL", "Δ PPL %", "MoE FLOPs saved %", "time saved %", "seeds"], rows,
                       numeric=range(6), table_id=f"halting-table-{i}")
        tables.append(Block(table, f"{v} ({h['runs']} run{'s' if h['runs'] != 1 else ''})", _halting_line(v, h)))
    caption = (f"Relative-norm halting of multi-hop MoE layers, evaluated zero-shot on validation text per "
               f"threshold τ (τ = 0: no halting, the baseline). One point per τ, mean over the seeds that "
               f"evaluated it; MoE FLOPs saved = share of routed (token, expert) work not dispatched. Shaded: "
               f"the target, ≥{HALTING_TARGET_SAVED_PCT:g}% saved at ≤ +{HALTING_PPL_LIMIT_PCT:g}% PPL; ★ in "
               f"the tables: the τ saving the most within +{HALTING_PPL_LIMIT_PCT:g}% PPL. Time saved is "
               f"wall-clock and noisy.")
    return _plot_section("halting", "Halting: PPL vs MoE FLOPs saved", caption, fig, blocks=tables)


# ---------------------------------------------------------------- expert specialisation
def _token_text(token: Any, byte_tokens: bool) -> str:
    if byte_tokens and isinstance(token, int) and 0 <= token < 128 and (chr(token).isprintable()
                                                                         or chr(token) in "\n\t"):
        return repr(chr(token))
    return str(token)


def specialisation_section(results: SweepResults, comparison: Comparison | None) -> Section | None:
    """The ``specialisation`` section, or ``None`` when no finished run has expert specialisation data."""
    ref = comparison.reference if comparison is not None else results.reference
    order = sorted(results.variants, key=lambda v: v != ref)
    picked: list[tuple[str, RunResult]] = []
    for v in order:
        run = next((r for r in results.done(v)
                    if isinstance(_get(r.final, "diagnostics", "expert_specialisation"), list)), None)
        if run is not None and len(picked) < _SPECIALISATION_VARIANTS:
            picked.append((v, run))
    if not picked:
        return None
    blocks = []
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
        table = _table(["layer", "expert", "top tokens (lift)"], rows, numeric={1},
                       table_id=f"specialisation-table-{i}")
        blocks.append(Block(table, f"{v} (seed {run.seed})"))
    caption = ("Per layer and expert, the input tokens routed to it most often as top-1 on validation text "
               "(one finished seed), with their lift: the token's share of the expert's tokens over its share "
               "of the text (1 = no preference). Byte tokens are shown as characters.")
    return Section("specialisation", "Expert specialisation", caption, blocks=tuple(blocks))


# ---------------------------------------------------------------- sparse weights
def _sad_curve(runs: Sequence[RunResult]) -> tuple[list[float], list[float]] | None:
    """(tokens, mean over the runs of the interval SAD) from the runs' ``sparse.sad`` records."""
    by_step: dict[int, list[float]] = {}
    tokens: dict[int, float] = {}
    for r in runs:
        for rec in r.metrics:
            sad = _num(_get(rec, "sparse", "sad"))
            if sad is not None and isinstance(rec.get("step"), int):
                by_step.setdefault(rec["step"], []).append(sad)
                tokens[rec["step"]] = float(rec.get("tokens", rec["step"]))
    if not by_step:
        return None
    steps = sorted(by_step)
    return [tokens[s] for s in steps], [sum(by_step[s]) / len(by_step[s]) for s in steps]


def sparse_weights_section(results: SweepResults) -> Section | None:
    """Variants with sparse weights trained from scratch (``train.sparsity``): pattern, method, final
    sparsity and Sparse Architecture Divergence (mask bits flipped since the start), and the SAD of
    each logging interval over training; None when no variant has sparse weights."""
    rows, curves = [], []
    for v in results.variants:
        train = _get(_variant_config(results, v), "train") or {}
        if not train.get("sparsity"):
            continue
        done = results.done(v)
        sparsity = [x for x in (_num(_get(r.final, "sparse", "sparsity")) for r in done) if x is not None]
        sad = [x for x in (_num(_get(r.final, "sparse", "sad_total")) for r in done) if x is not None]
        rows.append((v, str(train["sparsity"]), str(train.get("sparse_method", "")), str(len(done)),
                     f"{_mean(sparsity):.4f}" if sparsity else "—", f"{_mean(sad):.4f}" if sad else "—"))
        curve = _sad_curve(done)
        if curve is not None:
            curves.append((v, curve))
    if not rows:
        return None
    fig = None
    if curves:
        colors = _variant_colors(results)
        fig = _new_figure(6.4, 3.2)
        ax = fig.add_subplot()
        for v, (x, y) in curves:
            ax.plot(x, y, label=v, color=colors[v])
        ax.set_xlabel("tokens")
        ax.set_ylabel("mask bits flipped per interval")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.legend(fontsize=8)
    table = _table(("variant", "pattern", "method", "finished runs", "sparsity", "SAD since start"),
                   rows, numeric=(3, 4, 5), table_id="sparse-weights")
    return _plot_section(
        "sparse-weights", "Sparse weights",
        "Weight sparsity trained from scratch: the share of masked-out weights of the sparse layers at the end, "
        "and the Sparse Architecture Divergence (share of mask bits that differ from the first mask; per "
        "logging interval in the plot, mean over seeds). Dense layers (the embedding and head) are not counted.",
        fig, blocks=(Block(table),),
    )
