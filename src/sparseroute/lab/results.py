"""What a finished (or partly finished) sweep looks like once read back from the store: the plain
data the statistics and the report work on, and the dotted-path view of a run configuration that
the spec's checks and the report share. Nothing here touches SQLite or torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunResult", "SweepResults", "config_leaves", "covered"]


@dataclass
class RunResult:
    """One (variant, seed) run of a sweep.

    config: the full resolved run configuration (``RunConfig.to_dict()``: ``model``, ``data``,
        ``train``). status: ``pending``, ``running``, ``done`` or ``failed``.
    final: the run's final metrics (``None`` until it is done): ``test_ppl``, ``val_ppl``,
        ``test_loss``, ``val_loss``, ``flops_per_token`` (dict by component: ``attention``,
        ``dense_ffn``, ``experts``, ``router``, ``embedding_head``, ``total``, FLOPs per token of one
        forward pass), ``active_experts_per_layer`` (list per MoE layer or ``None``),
        ``parameters``, ``parameter_counts`` (``total``, ``active``, ``experts``, ``routing``,
        ``linear_router``, ``embedding``), ``train_seconds``, ``tokens``, ``steps``.
    metrics: the per-interval log in step order; each record has ``step``, ``tokens``, ``lr``,
        ``loss`` (mean training cross-entropy over the interval), ``aux_loss`` and, for MoE
        models, ``routing``: one dict per MoE layer with ``load`` (tokens per expert summed over
        the interval, a list of E ints) and interval means of scalar statistics such as
        ``entropy``, ``imbalance``, ``dropped_fraction``, ``active_per_token`` (and ``tls``,
        ``cls`` for the relu router). A record may carry ``val`` (``{"loss", "ppl", "tokens"}``).
    """

    run_id: int
    variant: str
    seed: int
    status: str
    config: dict[str, Any]
    final: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float | None = None
    git_revision: str | None = None
    error: str | None = None


@dataclass
class SweepResults:
    """A sweep: its spec and its runs. ``variants`` keeps the spec's order; the first variant is
    the reference the report compares the others against unless the spec names another."""

    sweep_id: int
    name: str
    spec: dict[str, Any]
    variants: list[str]
    runs: list[RunResult]
    created_at: str = ""
    reference: str | None = None

    def done(self, variant: str | None = None) -> list[RunResult]:
        """Finished runs (of one variant, if given), in seed order."""
        rs = [r for r in self.runs if r.status == "done" and r.final is not None]
        if variant is not None:
            rs = [r for r in rs if r.variant == variant]
        return sorted(rs, key=lambda r: (self.variants.index(r.variant) if r.variant in self.variants else 0, r.seed))

    def test_ppl(self) -> dict[str, list[float]]:
        """Test perplexity of the finished runs, per variant (spec order; variants with none omitted)."""
        out: dict[str, list[float]] = {}
        for v in self.variants:
            vals = [float(r.final["test_ppl"]) for r in self.done(v)]
            if vals:
                out[v] = vals
        return out


def config_leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    """The leaves of a nested dict by dotted path, in order (``{"train": {"lr": 3e-3}}`` ->
    ``{"train.lr": 3e-3}``); a list, ``None`` or an empty table is a leaf."""
    if not isinstance(d, dict) or not d:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(config_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def covered(path: str, allowed) -> bool:
    """Whether the dotted ``path`` is one of ``allowed`` or lies under one of them."""
    return any(path == a or path.startswith(a + ".") for a in allowed)
