"""Sparse attention in a sweep's report: one row per variant with its attention router, test PPL,
the selection statistics of its block-sparse attention layers, their FLOPs and the time per
training step. Present only when some variant's configuration has ``model.attention``.

Where the numbers come from (each averaged over the variant's finished seeds):

* density, blocks per query, recall, mass: ``final["attention_profile"]``, the eval-mode
  statistics of the final model on validation text (per sparse layer, token-weighted; a cell is
  the mean over layers, the per-layer values follow in brackets in the HTML). A run without it
  (stopped before it was stored) falls back to the mean of its training log's ``attention``
  records, and the cell is marked "(train)".
* attention FLOPs per token: ``final["flops_per_token"]["attention"]`` (forward; on sparse layers
  the QKᵀ and AV products scaled by the router's ``density_estimate``).
* seconds per step: ``final["step_seconds"]`` (batch, forward, backward, optimizer; evaluation
  and checkpoints excluded); runs stored before it existed give ``train_seconds / steps``
  (evaluations included), marked "≈". Wall-clock: compare variants of one sweep on one machine.

:func:`attention_table` is the terminal table, :func:`attention_section` the HTML section.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from sparseroute.lab.report_sections import Block, Cell, Section, _html, _table
from sparseroute.lab.results import RunResult, SweepResults
from sparseroute.lab.stats import Comparison
from sparseroute.lab.summary import (
    layer_profile_means,
    _DASH,
    _console,
    _count,
    _fmt,
    _get,
    _mean,
    _num,
    _si,
    _summary_rows,
    _variant_config,
)

__all__ = ["ATTENTION_STATS", "attention_rows", "attention_table", "attention_section", "print_attention_summary"]

#: (statistic of ``BlockRouting.stats``, header, digits)
ATTENTION_STATS = (
    ("density", "density", 3),
    ("blocks_per_query", "blocks/query", 2),
    ("recall", "recall", 3),
    ("mass", "mass", 3),
)


def _attention_of(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    a = _get(cfg, "model", "attention")
    return a if isinstance(a, dict) else None


def attention_name(cfg: dict[str, Any] | None) -> str:
    """``"moba (top_k=3, bs 64)"``, or ``"dense (SDPA)"`` for a model without sparse attention."""
    a = _attention_of(cfg)
    if a is None:
        return "dense (SDPA)"
    opts = a.get("router_options") or {}
    inner = [f"{k}={v}" for k, v in opts.items()] + [f"bs {a.get('block_size', 64)}"]
    return f"{a.get('router', 'moba')} ({', '.join(inner)})"


def _layers_text(cfg: dict[str, Any] | None) -> str:
    a, n = _attention_of(cfg), _get(cfg, "model", "n_layers")
    if a is None:
        return _DASH
    layers = a.get("layers", "all")
    if layers == "all":
        return f"all {n}" if isinstance(n, int) else "all"
    if layers == "every_other" and isinstance(n, int):
        return ", ".join(str(i) for i in range(1, n, 2))
    return ", ".join(str(i) for i in layers) if isinstance(layers, list) else str(layers)


def _eval_layers(runs: Sequence[RunResult]) -> list[dict[str, float]] | None:
    """Per sparse layer, each ``final["attention_profile"]`` statistic averaged over the runs that have it."""
    return layer_profile_means(runs, "attention_profile")


def _training_means(runs: Sequence[RunResult]) -> dict[str, float]:
    """Each statistic of the training log's ``attention`` records, averaged over records, then runs."""
    per_run: dict[str, list[float]] = {}
    for r in runs:
        sums: dict[str, list[float]] = {}
        for rec in r.metrics:
            att = rec.get("attention") if isinstance(rec, dict) else None
            for k, v in (att.items() if isinstance(att, dict) else ()):
                if (x := _num(v)) is not None:
                    sums.setdefault(k, []).append(x)
        for k, v in sums.items():
            per_run.setdefault(k, []).append(sum(v) / len(v))
    return {k: sum(v) / len(v) for k, v in per_run.items()}


@dataclass(frozen=True)
class AttentionRow:
    """One variant: its attention router and layers, test PPL text (as in the summary table), per
    statistic of :data:`ATTENTION_STATS` the mean value and the per-layer values, whether they come
    from the training log, attention FLOPs per token, attention router parameters, and seconds per
    step (with ``step_estimated`` when only ``train_seconds / steps`` was there)."""

    variant: str
    attention: str
    layers: str
    test: str
    stats: dict[str, tuple[float | None, list[float]]]
    from_training: bool
    flops: float | None
    router_params: float | None
    step_seconds: float | None
    step_estimated: bool


def attention_rows(results: SweepResults, comparison: Comparison | None) -> list[AttentionRow] | None:
    """One row per variant (spec order), or ``None`` when no variant has sparse attention."""
    configs = {v: _variant_config(results, v) for v in results.variants}
    if not any(_attention_of(cfg) is not None for cfg in configs.values()):
        return None
    tests = {r.variant: r.test for r in _summary_rows(results, comparison)}
    rows = []
    for v in results.variants:
        done, cfg = results.done(v), configs[v]
        layers = _eval_layers(done)
        train = _training_means(done) if layers is None else {}
        stats: dict[str, tuple[float | None, list[float]]] = {}
        for key, _, _ in ATTENTION_STATS:
            if layers is not None:
                per_layer = [lay[key] for lay in layers if key in lay]
                stats[key] = (_mean(per_layer), per_layer if len(per_layer) > 1 else [])
            else:
                stats[key] = (train.get(key), [])
        step = [x for r in done if (x := _num(_get(r.final, "step_seconds"))) is not None]
        estimated = False
        if not step:
            step = [s / n for r in done if (s := _num(_get(r.final, "train_seconds"))) is not None
                    and (n := _num(_get(r.final, "steps")))]
            estimated = bool(step)
        params = [x for r in done if (x := _num(_get(r.final, "parameter_counts", "attention_routing"))) is not None]
        flops = [x for r in done if (x := _num(_get(r.final, "flops_per_token", "attention"))) is not None]
        rows.append(AttentionRow(
            variant=v, attention=attention_name(cfg), layers=_layers_text(cfg), test=tests.get(v, _DASH),
            stats=stats, from_training=layers is None and bool(train), flops=_mean(flops),
            router_params=params[0] if params else None, step_seconds=_mean(step), step_estimated=estimated,
        ))
    return rows


def _headers() -> list[str]:
    return ["variant", "attention", "sparse layers", "test PPL", *(h for _, h, _ in ATTENTION_STATS),
            "attention FLOPs/tok", "attention router params", "s/step"]


def _step_text(row: AttentionRow) -> str:
    if row.step_seconds is None:
        return _DASH
    return ("≈" if row.step_estimated else "") + _fmt(row.step_seconds, 3)


def _cells(row: AttentionRow, *, per_layer: bool) -> list[Cell]:
    cells: list[Cell] = [row.variant, row.attention, row.layers, row.test]
    for key, _, digits in ATTENTION_STATS:
        mean, layers = row.stats[key]
        text = _fmt(mean, digits) + (" (train)" if row.from_training and mean is not None else "")
        if per_layer and layers:
            each = " / ".join(_fmt(x, digits) for x in layers)
            cells.append(_html('{} <span class="caption">({})</span>', text, each))
        else:
            cells.append(text)
    cells += [_si(row.flops), _count(row.router_params), _step_text(row)]
    return cells


CAPTION = (
    "Sparse attention per variant, averaged over its finished seeds. Density: kept fraction of the causal "
    "score matrix; blocks/query: key blocks a query block reads; recall: share of the heaviest key blocks of "
    "dense attention (as many as kept) that the router selected; mass: the dense attention probability on "
    "the selected blocks (both on sampled query blocks). Eval mode on validation text with the final model, "
    "mean over the sparse layers (HTML: per layer in brackets); \"(train)\": from the training log instead. "
    "Attention FLOPs: forward, per token, sparse layers charged by the router's density estimate. s/step: "
    "wall-clock seconds of one training step (\"≈\": train seconds / steps, evaluations included)."
)


def attention_table(results: SweepResults, comparison: Comparison | None) -> RichTable | None:
    """The terminal table (see the module docstring), or ``None`` without sparse attention."""
    rows = attention_rows(results, comparison)
    if rows is None:
        return None
    table = RichTable(title=Text("Sparse attention"), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                      caption=Text(CAPTION), caption_justify="left")
    for i, h in enumerate(_headers()):
        table.add_column(Text(h), justify="left" if i < 3 else "right", no_wrap=i == 0)
    for row in rows:
        cells = _cells(row, per_layer=False)
        table.add_row(Text(str(cells[0]), style="bold"), *(Text(str(c)) for c in cells[1:]))
    return table


def print_attention_summary(results: SweepResults, comparison: Comparison | None,
                            console: Console | None = None) -> None:
    """Print :func:`attention_table` (nothing without sparse attention)."""
    table = attention_table(results, comparison)
    if table is not None:
        _console(console).print(table)


def attention_section(results: SweepResults, comparison: Comparison | None) -> Section | None:
    """The ``attention`` section of the HTML report, or ``None`` without sparse attention."""
    rows = attention_rows(results, comparison)
    if rows is None:
        return None
    headers = _headers()
    table = _table(headers, [_cells(r, per_layer=True) for r in rows], numeric=range(3, len(headers)),
                   table_id="attention-table")
    return Section("attention", "Sparse attention", CAPTION, blocks=(Block(table),))
