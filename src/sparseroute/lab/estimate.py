"""What a sweep will cost before it starts: the wall-clock of its runs on this machine.

A run's time is its steps times the seconds a training step takes (forward, backward, clipping and
the optimizer step of the run's own model, batch and sequence length, measured here at the
threads a sweep's worker gets), plus its evaluations (a forward over the evaluation tokens costs
about a third of a training step's work per token). Where the store already holds finished runs
of the same variant of a sweep with the same name, their measured training time is used instead,
and one of them is also timed, so that the ratio of its real time to its timed steps (what
logging, checkpoints and the end-of-run diagnostics add) scales the other variants' figures.
The runs are then placed on ``jobs`` workers in plan order, each taking the next run when it is
free (what :func:`sparseroute.lab.runner.run_sweep` does), and the sweep's time is when the last
one finishes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sparseroute.train.config import RunConfig
from sparseroute.train.loop import build_model, clip_grad_norm, make_optimizer
from sparseroute.weights.training import SparseTraining

__all__ = ["Estimate", "estimate_sweep", "measure_step_seconds", "format_duration", "worker_threads"]

#: a forward over a token costs about this share of a training step's work on it (forward 1,
#: backward 2)
FORWARD_SHARE = 1 / 3


def worker_threads(jobs: int) -> int:
    """The intra-op threads each of ``jobs`` workers gets (as the runner sets them)."""
    return max(1, (os.cpu_count() or 1) // jobs)


def _model_config(cfg: RunConfig):
    model = cfg.model
    if cfg.data.tokenizer == "bpe":  # the BPE is fitted when the runs are registered: its nominal size
        model = model.replace(vocab_size=cfg.data.bpe_vocab_size)
    return model


def measure_step_seconds(cfg: RunConfig, *, steps: int = 2, threads: int = 1, seed: int = 0) -> float:
    """Median seconds of ``steps`` training steps (after one untimed) of the run's model on random
    tokens, at ``threads`` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        # the run's own model (with sparse weights, their layers and per-step mask work too)
        model = build_model(dataclasses.replace(cfg, model=_model_config(cfg)))
        model.train()
        tc = cfg.train
        opt = make_optimizer(model, tc)
        sparse_cfg = tc.sparse_training()
        sparse = None if sparse_cfg is None else SparseTraining(model, sparse_cfg, total_steps=tc.steps, seed=tc.seed)
        V = model.config.vocab_size
        ids = torch.randint(V, (tc.batch_size, tc.seq_len + 1))
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            if sparse is not None:
                sparse.begin_step(i)
            out = model(ids[:, :-1])
            loss = F.cross_entropy(out.logits.reshape(-1, V), ids[:, 1:].reshape(-1)) + out.aux_loss()
            loss.backward()
            clip_grad_norm(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            opt.step()
            if sparse is not None:
                sparse.after_optimizer_step(i, opt)
            opt.zero_grad(set_to_none=True)
            model.after_optimizer_step()
            if i:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


def _evaluations(cfg: RunConfig) -> int:
    """Evaluations a run makes over ``eval_tokens``: one per ``eval_every`` steps, and the final
    validation and test ones."""
    tc = cfg.train
    steps = tc.steps
    periodic = (steps - 1) // tc.eval_every if tc.eval_every else 0
    return periodic + 2


def run_seconds(cfg: RunConfig, step_seconds: float) -> float:
    tc = cfg.train
    per_token = step_seconds / (tc.batch_size * tc.seq_len)
    return tc.steps * step_seconds + _evaluations(cfg) * tc.eval_tokens * per_token * FORWARD_SHARE


@dataclass
class Estimate:
    """seconds: the sweep's wall-clock with ``jobs`` workers. per_variant: a run's seconds.
    sources: per variant, where its figure comes from (finished runs, timed steps, scaled)."""

    seconds: float
    jobs: int
    threads: int
    per_variant: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        parts = ", ".join(f"{v} {format_duration(s)}" for v, s in self.per_variant.items())
        return (f"estimated wall-clock on this machine: {format_duration(self.seconds)} with --jobs {self.jobs} "
                f"({self.threads} thread(s) a run); a run: {parts}")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h} h {m:02d} min"
    if m:
        return f"{m} min {s:02d} s"
    return f"{s} s"


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without what differs between runs of one variant: the seed, and the
    vocabulary size a BPE is fitted to when the sweep is registered."""
    out = {section: dict(values) for section, values in config.items() if isinstance(values, dict)}
    out.get("train", {}).pop("seed", None)
    out.get("model", {}).pop("vocab_size", None)
    return out


def _finished_seconds(store, name: str, variant: str, cfg: RunConfig) -> list[float]:
    """Training seconds of the finished runs in ``store`` of this variant of a sweep named
    ``name`` whose configuration is this one's (a changed budget or setting does not count)."""
    if store is None:
        return []
    rows = store.conn.execute(
        "SELECT r.train_seconds, r.config_json FROM runs r JOIN sweeps s ON r.sweep_id = s.id "
        "WHERE s.name = ? AND r.variant = ? AND r.status = 'done' AND r.train_seconds IS NOT NULL",
        (name, variant),
    ).fetchall()
    want = _comparable(json.loads(json.dumps(cfg.to_dict())))  # tuples as the stored JSON's lists
    return [float(r[0]) for r in rows if _comparable(json.loads(r[1])) == want]


def estimate_sweep(spec, plan, *, jobs: int = 1, store=None, steps: int = 2, progress=None) -> Estimate:
    """The wall-clock of ``plan`` (``spec.plan()``) with ``jobs`` workers; ``store`` (a
    :class:`sparseroute.lab.store.Store`, optional) supplies finished runs' times.
    ``progress(message)`` is told which variant is being measured."""
    threads = worker_threads(jobs)
    per_variant: dict[str, float] = {}
    sources: dict[str, str] = {}
    finished: dict[str, float] = {}
    for v in spec.variants:
        cfg = next(p.config for p in plan if p.variant == v.name)
        done = _finished_seconds(store, spec.name, v.name, cfg)
        if done:
            finished[v.name] = statistics.mean(done)
    measure = [v.name for v in spec.variants if v.name not in finished]
    if finished and measure:  # one finished variant calibrates what the timed steps leave out
        measure.append(next(iter(finished)))
    timed: dict[str, float] = {}
    for name in measure:
        cfg = next(p.config for p in plan if p.variant == name)
        if progress is not None:
            progress(f"timing {steps} training steps of {name}")
        timed[name] = run_seconds(cfg, measure_step_seconds(cfg, steps=steps, threads=threads))
    # a finished run also spent time on logging, checkpoints and the end-of-run diagnostics: scale
    # the timed steps by what that run took over what its own timed steps say
    calibrated = [n for n in timed if n in finished]
    scale = finished[calibrated[0]] / timed[calibrated[0]] if calibrated else None
    for v in spec.variants:
        if v.name in finished:
            per_variant[v.name] = finished[v.name]
            sources[v.name] = "finished runs"
        elif scale is not None:
            per_variant[v.name] = timed[v.name] * scale
            sources[v.name] = f"{steps} timed steps x {scale:.2f} (a finished run's overhead)"
        else:
            per_variant[v.name] = timed[v.name]
            sources[v.name] = f"{steps} timed steps (a lower bound: logging, checkpoints and diagnostics not timed)"
    # plan order onto `jobs` workers, each taking the next run when it is free
    free = [0.0] * jobs
    for p in plan:
        i = min(range(jobs), key=free.__getitem__)
        free[i] += per_variant[p.variant]
    return Estimate(seconds=max(free), jobs=jobs, threads=threads, per_variant=per_variant, sources=sources)


def estimate_as_dict(e: Estimate) -> dict[str, Any]:
    return {"seconds": e.seconds, "jobs": e.jobs, "threads": e.threads, "per_variant": e.per_variant,
            "sources": e.sources}
