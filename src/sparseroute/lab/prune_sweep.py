"""Pruning sweeps: every (model, method, repair, pattern) of a :class:`PruneSweepSpec` pruned
one-shot by :func:`sparseroute.lab.prune.run_prune`, with a fidelity-vs-sparsity report.

A pruning sweep differs from a training sweep: its jobs start from the same trained model, so the
model is trained once (``"lm"``: a run of the sweep's own ``lm`` settings, in ``<sweep>/lm``; a
run folder; or ``"minilm"``, the pretrained sentence encoder) and each job prunes a copy. The
sweep is a row in the results store (``sparseroute runs list`` shows it, ``sparseroute report``
rewrites its report); each finished job is one JSON file in ``<sweep>/results/`` written
atomically, so a killed sweep resumes where it stopped: a finished job is never redone, an
interrupted one starts over (its half-written output folder is removed first).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from markupsafe import Markup

from sparseroute.fileio import LockBusy, atomic_write_text, file_lock, write_json_atomic
from sparseroute.lab.plots import _new_figure, _png_data_uri
from sparseroute.lab.report import check_report_path
from sparseroute.lab.report_sections import Block, Section, _table, number_sections, render
from sparseroute.lab.store import Store
from sparseroute.train.config import RunConfig, resolve_run
from sparseroute.weights.patterns import parse_pattern

__all__ = ["PruneSweepSpec", "SweepJob", "run_prune_sweep", "write_prune_report", "is_prune_spec"]

KIND = "prune"
METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class SweepJob:
    """One job of a pruning sweep: which model, method, repair and pattern (the pruning itself is
    :class:`sparseroute.lab.prune.PruneJob`)."""

    model: str
    method: str
    repair: str | None
    pattern: str

    @property
    def key(self) -> str:
        """The job's file name: e.g. ``lm-wanda+dsnot-2of4``."""
        model = "lm" if self.model == "lm" else Path(self.model).name or self.model
        repair = f"+{self.repair}" if self.repair else ""
        return f"{model}-{self.method}{repair}-{self.pattern.replace(':', 'of').replace('/', '-')}"


@dataclass(frozen=True, kw_only=True)
class PruneSweepSpec:
    """models: ``"lm"`` (trained first from ``lm``, a nested settings dict like a training
    sweep's base), ``"minilm"`` or run folders. methods × repairs × patterns are pruned for each;
    ``calib``: calibration sequences (LM) or texts (MiniLM); ``heldout``: MiniLM's held-out texts."""

    name: str = "prune"
    description: str = ""
    models: tuple[str, ...] = ("lm", "minilm")
    lm: dict[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] = METHODS
    repairs: tuple[str | None, ...] = (None, "dsnot")
    patterns: tuple[str, ...] = ("0.5", "2:4", "4:8", "0.7")
    calib: int = 128
    heldout: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("models", "methods", "repairs", "patterns"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if not value:
                raise ValueError(f"{name}: a pruning sweep needs at least one")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods: unknown {', '.join(map(repr, unknown))}; known: {', '.join(METHODS)}")
        bad = [r for r in self.repairs if r not in (None, "dsnot")]
        if bad:
            raise ValueError(f"repairs: unknown {', '.join(map(repr, bad))}; known: none (null) and dsnot")
        for p in self.patterns:
            parse_pattern(p)
        for name in ("calib", "heldout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1; got {v!r}")
        if "lm" in self.models:
            self.lm_config()  # validated now, before anything runs

    def lm_config(self) -> RunConfig:
        return resolve_run(self.lm)

    def jobs(self) -> list[SweepJob]:
        """Every job, in report order (model, pattern, method, repair)."""
        return [SweepJob(m, meth, rep, pat) for m in self.models for pat in self.patterns
                for meth in self.methods for rep in self.repairs]

    def run_order(self) -> list[SweepJob]:
        """The jobs in the order they run: each repair's whole grid before the next repair's, and
        within it pattern by pattern with every method on every model, so that a sweep stopped
        early leaves comparable results on all models."""
        return [SweepJob(m, meth, rep, pat) for rep in self.repairs for pat in self.patterns
                for meth in self.methods for m in self.models]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "name": self.name, "description": self.description, "models": list(self.models),
                "lm": self.lm, "methods": list(self.methods), "repairs": list(self.repairs),
                "patterns": list(self.patterns), "calib": self.calib, "heldout": self.heldout, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneSweepSpec":
        d = {k: v for k, v in d.items() if k != "kind"}
        return cls(**d)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def with_changes(self, *, settings: list[str] | None = None, seeds: tuple[int, ...] | None = None) -> "PruneSweepSpec":
        """``--set`` changes the trained LM's settings; ``--seeds`` takes its first seed (pruning
        is deterministic given the model and calibration data)."""
        from sparseroute.train.config import apply_setting

        lm = json.loads(json.dumps(self.lm))
        for item in settings or []:
            apply_setting(lm, item)
        d = self.to_dict()
        d["lm"] = lm
        if seeds:
            d["seed"] = int(seeds[0])
        return PruneSweepSpec.from_dict(d)


def is_prune_spec(spec: dict[str, Any]) -> bool:
    """Whether a stored sweep spec is a pruning sweep's."""
    return spec.get("kind") == KIND


def _register(store: Store, spec: PruneSweepSpec, new: bool) -> tuple[int, bool]:
    fingerprint = spec.fingerprint()
    found = None if new else store.find_sweep(spec.name, fingerprint)
    if found is not None:
        return found, False
    return store.create_sweep(spec.name, fingerprint, spec.to_dict(), f"{spec.name}-{{id}}", []), True


def _train_lm(spec: PruneSweepSpec, folder: Path, progress: bool, say: Callable[[str], None]) -> None:
    from sparseroute.train.corpus import prepare_run
    from sparseroute.train.loop import train

    if (folder / "final.json").exists():
        return
    resume = (folder / "config.json").exists()
    say(f"training the LM to prune in {folder} ({'resumed' if resume else 'new'})")
    cfg, corpus = prepare_run(spec.lm_config(), progress=progress)  # the vocabulary fitted to the corpus
    train(None if resume else cfg, folder, resume=resume, progress=progress, corpus=corpus)


def run_prune_sweep(store: Store, spec: PruneSweepSpec, *, new: bool = False, progress: bool = True,
                    say: Callable[[str], None] | None = None) -> int:
    """Run every pending job of ``spec`` (training its LM first when it has ``"lm"``) and write the
    report; returns the sweep id."""
    from sparseroute.lab.prune import run_prune

    say = say or (lambda msg: print(msg, file=sys.stderr))
    sweep_id, created = _register(store, spec, new)
    sweep_dir = store.path.parent / store.sweep(sweep_id)["dir"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    jobs = spec.jobs()
    say(f"sweep {sweep_id} ({spec.name}, {len(jobs)} pruning jobs) {'created' if created else 'resumed'} in "
        f"{store.path}; folders under {sweep_dir}")
    try:
        lock = file_lock(sweep_dir / ".lock", timeout=0)
    except LockBusy:
        raise ValueError(f"sweep {sweep_id} ({spec.name}) is being run by another process; wait for it or stop "
                         "it") from None
    with lock:
        if "lm" in spec.models:
            _train_lm(spec, sweep_dir / "lm", progress, say)
        results_dir = sweep_dir / "results"
        results_dir.mkdir(exist_ok=True)
        for i, job in enumerate(spec.run_order(), 1):
            result_path = results_dir / f"{job.key}.json"
            if result_path.exists():
                continue
            out = sweep_dir / "pruned" / job.key
            if out.exists():  # an interrupted attempt of this job: start it over
                shutil.rmtree(out)
            model = str(sweep_dir / "lm") if job.model == "lm" else job.model
            t0 = time.perf_counter()
            result = run_prune(model, job.method, job.pattern, out=out, repair=job.repair, calib=spec.calib,
                               heldout=spec.heldout, seed=spec.seed, progress=progress)
            result = {**result, "model": job.model, "job": job.key, "wall_seconds": time.perf_counter() - t0}
            write_json_atomic(result_path, result)
            say(f"[{i}/{len(jobs)}] {job.key}: {result['fidelity_metric']} {result['fidelity']:.4g} "
                f"(dense {result['dense_fidelity']:.4g}), {result['seconds']:.1f} s")
        store.mark_sweep_finished(sweep_id)
    path = write_prune_report(store, sweep_id)
    say(f"report: {path}")
    return sweep_id


def prune_results(store: Store, sweep_id: int) -> tuple[PruneSweepSpec, list[dict[str, Any]]]:
    """The spec of a pruning sweep and its finished jobs' results, in the spec's job order."""
    row = store.sweep(sweep_id)
    spec = PruneSweepSpec.from_dict(json.loads(row["spec_json"]))
    folder = store.path.parent / row["dir"] / "results"
    out = []
    for job in spec.jobs():
        path = folder / f"{job.key}.json"
        if path.exists():
            out.append({**json.loads(path.read_text()), "method": job.method, "repair": job.repair,
                        "pattern": job.pattern, "model": job.model})
    return spec, out


def _plot(spec: PruneSweepSpec, results: list[dict[str, Any]], model: str):
    rows = [r for r in results if r["model"] == model]
    if not rows:
        return None
    fig = _new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    order = sorted(spec.patterns, key=lambda p: (parse_pattern(p).sparsity, parse_pattern(p).kind != "nm"))
    x = np.arange(len(order))
    colors = {"magnitude": "#8c8c8c", "wanda": "#1f77b4", "sparsegpt": "#d62728"}
    for method in spec.methods:
        for repair in spec.repairs:
            ys = [next((r["fidelity"] for r in rows if r["method"] == method and r["repair"] == repair
                        and r["pattern"] == p), np.nan) for p in order]
            ax.plot(x, ys, marker="o", color=colors.get(method), linestyle="--" if repair else "-",
                    label=method + (f" + {repair}" if repair else ""))
    dense = rows[0]["dense_fidelity"]
    ax.axhline(dense, color="black", linewidth=0.8, linestyle=":", label="dense")
    ax.set_xticks(x, [f"{p}\n({parse_pattern(p).sparsity:.0%})" for p in order])
    metric = rows[0]["fidelity_metric"]
    ax.set_ylabel("test PPL (lower is better)" if metric == "test_ppl" else "embedding cosine to dense")
    if metric == "test_ppl":
        ax.set_yscale("log")
    ax.set_xlabel("pattern (sparsity)")
    ax.set_title(model)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _fmt(v: Any, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}g}"


def write_prune_report(store: Store, sweep_id: int, out: str | Path | None = None) -> Path:
    """Write the pruning sweep's HTML report (default: report.html in its folder) and return its path."""
    row = store.sweep(sweep_id)
    path = check_report_path(out or store.path.parent / row["dir"] / "report.html")
    spec, results = prune_results(store, sweep_id)
    sections = []
    for model in spec.models:
        rows = [r for r in results if r["model"] == model]
        fig = _plot(spec, results, model)
        table = _table(
            ("pattern", "method", "fidelity", "dense", "sparsity", "prune s"),
            [(r["pattern"], r["method"] + (f" + {r['repair']}" if r["repair"] else ""), _fmt(r["fidelity"]),
              _fmt(r["dense_fidelity"]), f"{r['sparsity']:.3f}", f"{r['seconds']:.1f}") for r in rows],
            numeric=(2, 3, 4, 5), table_id=f"prune-{Path(model).name}",
        )
        metric = rows[0]["fidelity_metric"] if rows else ""
        caption = ("test PPL of the pruned LM on its test split (lower is better)" if metric == "test_ppl"
                   else "mean cosine of the pruned model's sentence embeddings to the dense model's on held-out "
                   "standard-library docstrings (higher is better)")
        image = Markup(_png_data_uri(fig)) if fig is not None else None
        sections.append(Section(f"model-{Path(model).name}", f"Fidelity vs sparsity: {model}", caption,
                                () if rows else ("no finished job yet",), image, (Block(table),)))
    document = render("prune_report.html.j2", title=f"sparseroute pruning report: {spec.name} (sweep {sweep_id})",
                      name=f"{spec.name} (sweep {sweep_id})", created_at=row["created_at"],
                      n_done=len(results), n_jobs=len(spec.jobs()), sections=number_sections(sections),
                      spec=json.dumps(spec.to_dict(), indent=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, document)
    return path


def print_prune_summary(store: Store, sweep_id: int) -> None:
    """One line per finished job, grouped by model."""
    spec, results = prune_results(store, sweep_id)
    for model in spec.models:
        rows = [r for r in results if r["model"] == model]
        if not rows:
            continue
        print(f"{model}: {rows[0]['fidelity_metric']} (dense {_fmt(rows[0]['dense_fidelity'])})")
        for r in rows:
            print(f"  {r['pattern']:>6}  {r['method'] + (' + ' + r['repair'] if r['repair'] else ''):<20} "
                  f"{_fmt(r['fidelity']):>10}  {r['seconds']:8.1f} s")
