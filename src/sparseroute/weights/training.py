"""Sparse training from scratch: N:M masks recomputed from |W| at every step (STE, SR-STE and the
progressive schedules), the configuration of a run's sparse training, and the controller that the
training loop calls.

**N:M** (:class:`NMSparseLinear`): the dense weight W is kept; every training forward takes the
mask M of the top-n |W| in each group of m consecutive inputs and computes with W ⊙ M. Backward
to the dense W: ``ste`` passes the gradient g (w.r.t. the masked weight) unmasked; ``sr-ste``
adds λ·(1 − M) ⊙ W (λ = 2e-4), which pulls the pruned weights towards zero. In eval mode the
forward uses the target N:M mask of the current weights, so the evaluated model is exactly N:M.

**Progressive** (``method="progressive"``, SR-STE's backward, λ included): ``kind="mask"``
computes with W ⊙ (M + (1 − M)·m_t), m_t falling linearly from 1 at step 0 to 0 at
``decay_fraction`` of training (hard N:M from there on); ``kind="structure"`` trains
(m−1):m, (m−2):m, …, (n+1):m over equal windows of the first ``decay_fraction`` of training and
n:m from there on. Both are pure functions of the step, given by the controller.

**The mask buffer** holds the mask of the current training step (the binary M, also during mask
decay); SAD (see :mod:`.dynamic`) is measured on it. After each optimizer step the controller
recomputes it from the updated weights, so a checkpoint holds the mask of its own weights, and
the next forward (and any evaluation before it) reuses it instead of computing it again.

**Methods** (:data:`SPARSE_METHODS`): ``ste``, ``sr-ste``, ``progressive`` train N:M patterns;
``rigl``, ``set`` (:mod:`.dynamic`) train unstructured masks at a sparsity like ``0.9``.

Legend: O output features, I input features, G groups of m.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from sparseroute.registry import Registry
from sparseroute.weights.dynamic import (
    DENSITIES,
    DynamicSparseLinear,
    TrackedSparseLinear,
    check_filter,
    dynamic_update,
    is_update_step,
    sad_record,
    sparsify_dynamic,
    tracked_layers,
)
from sparseroute.weights.linear import sparse_targets, sparsify
from sparseroute.weights.patterns import Pattern, nm_mask, parse_pattern

__all__ = [
    "NMSparseLinear",
    "SPARSE_METHODS",
    "SparseMethod",
    "SparseTraining",
    "SparseTrainingConfig",
    "check_sparse_fit",
    "fast_nm_mask",
    "mask_decay_value",
    "sparsify_for_training",
    "structure_n",
    "structure_stages",
]

NM_METHODS = ("ste", "sr-ste", "progressive")
PROGRESSIVE_KINDS = ("mask", "structure")


# -- masks and the masked weight --------------------------------------------------------------------


def fast_nm_mask(scores_OI: Tensor, n: int, m: int) -> Tensor:
    """:func:`~sparseroute.weights.patterns.nm_mask` (the same mask, ties included: the lower
    index wins) by pairwise comparisons within each group instead of a sort; faster for m <= 8."""
    if m > 8:
        return nm_mask(scores_OI, n, m)
    O, I = scores_OI.shape
    cols = [c.contiguous() for c in scores_OI.reshape(O, I // m, m).unbind(-1)]  # m x [O, G]
    kept = []
    for i in range(m):
        # rank of column i in its group: earlier columns beat it when >=, later ones when >
        rank = torch.zeros(cols[i].shape, dtype=torch.uint8, device=scores_OI.device)
        for j in range(m):
            if j != i:
                rank += (cols[j] >= cols[i]) if j < i else (cols[j] > cols[i])
        kept.append(rank < n)
    return torch.stack(kept, -1).reshape(O, I)


class _MaskedWeight(torch.autograd.Function):
    """Forward W ⊙ scale (scale: the bool mask, or the decayed float mask); backward to W:
    g where kept, g + λ·W where pruned (λ = 0: the straight-through g everywhere)."""

    @staticmethod
    def forward(ctx, weight: Tensor, scale: Tensor, keep: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        if lam:
            ctx.save_for_backward(weight, keep)
        return weight * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.lam:
            return grad, None, None, None
        weight, keep = ctx.saved_tensors
        return torch.where(keep, grad, grad + ctx.lam * weight), None, None, None


def mask_decay_value(step: int, total_steps: int, decay_fraction: float) -> float:
    """m_t of mask decay: 1 at step 0, falling linearly to 0 at ``decay_fraction`` of the steps."""
    t_end = decay_fraction * total_steps
    return 0.0 if step >= t_end else 1.0 - step / t_end


def structure_stages(n: int, m: int) -> list[Pattern]:
    """The patterns of structure decay: (m−1):m, (m−2):m, …, n:m."""
    return [Pattern(kind="nm", n=k, m=m) for k in range(m - 1, n - 1, -1)]


def structure_n(step: int, total_steps: int, n: int, m: int, decay_fraction: float) -> int:
    """The n of structure decay at ``step``: the stages before n:m share the first
    ``decay_fraction`` of the steps equally; n:m from there on."""
    stages = m - 1 - n  # the stages before the target
    t_end = decay_fraction * total_steps
    if stages <= 0 or step >= t_end:
        return n
    return m - 1 - min(stages - 1, int(step * stages // t_end))


class NMSparseLinear(TrackedSparseLinear):
    """A linear trained with an N:M mask recomputed from |W| (see the module docstring).

    Options: ``method`` (ste, sr-ste, progressive), ``lam`` (λ of SR-STE and progressive),
    ``kind`` and ``decay_fraction`` (progressive). :meth:`set_step` gives the schedule the
    training step; without it (or in eval mode) the layer is hard N:M at its target pattern.
    """

    def _setup(self, method: str = "sr-ste", lam: float = 2e-4, kind: str = "mask",
               decay_fraction: float = 0.5) -> None:
        if self.pattern is None or self.pattern.kind != "nm":
            raise ValueError(f"NMSparseLinear needs an N:M pattern (e.g. 2:4); got {self.pattern}")
        if method not in NM_METHODS:
            raise ValueError(f"method must be one of {', '.join(NM_METHODS)}; got {method!r}")
        if kind not in PROGRESSIVE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(PROGRESSIVE_KINDS)}; got {kind!r}")
        self.method, self.kind, self.decay_fraction = method, kind, float(decay_fraction)
        self.lam = 0.0 if method == "ste" else float(lam)
        self.step: int | None = None
        self.total_steps: int | None = None
        self._fresh_n: int | None = None  # the n the mask buffer was refreshed for (until a training forward)
        super()._setup()

    def _initial_mask(self) -> None:
        self.set_step(0, 1)
        self.mask.copy_(self._compute_mask(self.stage_n()))
        self.set_step(None, None)

    def set_step(self, step: int | None, total_steps: int | None) -> None:
        """The training step the schedule is at (plain attributes: a pure function of the step)."""
        self.step, self.total_steps = step, total_steps

    def stage_n(self) -> int:
        """The n of the training mask at the current step."""
        p = self.pattern
        if self.method != "progressive" or self.kind != "structure" or self.step is None:
            return p.n
        return structure_n(self.step, self.total_steps, p.n, p.m, self.decay_fraction)

    def decay_value(self) -> float:
        """m_t: the value the pruned weights are multiplied by in the training forward."""
        if self.method != "progressive" or self.kind != "mask" or self.step is None:
            return 0.0
        return mask_decay_value(self.step, self.total_steps, self.decay_fraction)

    def _compute_mask(self, n: int) -> Tensor:
        return fast_nm_mask(self.weight.detach().abs(), n, self.pattern.m)

    @torch.no_grad()
    def refresh_mask(self) -> None:
        """Recompute the mask buffer from the current weights at the current step's stage; the
        next training forward (and evaluations before it) reuse it."""
        n = self.stage_n()
        self.mask.copy_(self._compute_mask(n))
        self._fresh_n = n

    def masked_weight(self) -> Tensor:
        if not self.training:
            n = self.pattern.n
            mask = self.mask if self._fresh_n == n else self._compute_mask(n)
            return self.weight * mask
        n = self.stage_n()
        if self._fresh_n != n:
            with torch.no_grad():
                self.mask.copy_(self._compute_mask(n))
        self._fresh_n = None  # the weights change after this step's backward
        decay = self.decay_value()
        scale = self.mask if decay == 0.0 else torch.where(self.mask, 1.0, decay).to(self.weight.dtype)
        return _MaskedWeight.apply(self.weight, scale, self.mask, self.lam)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._fresh_n = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        extra = f", method={self.method}" + (f", lam={self.lam:g}" if self.lam else "")
        if self.method == "progressive":
            extra += f", kind={self.kind}, decay_fraction={self.decay_fraction:g}"
        return super().extra_repr() + extra


# -- the configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseMethod:
    """A sparse training method: the pattern kind it trains (``nm`` or ``unstructured``), the
    options it reads, and how it swaps a model's linears."""

    pattern_kind: str
    options: tuple[str, ...]
    build: Callable[[nn.Module, "SparseTrainingConfig", int], list[str]]
    description: str


#: sparse training methods by name
SPARSE_METHODS: Registry[SparseMethod] = Registry("sparse training method")


def _build_nm(model: nn.Module, cfg: "SparseTrainingConfig", seed: int) -> list[str]:
    return sparsify(model, cfg.pattern, cfg.filter, cls=NMSparseLinear, method=cfg.method, lam=cfg.lam,
                    kind=cfg.kind, decay_fraction=cfg.decay_fraction)


def _build_dynamic(model: nn.Module, cfg: "SparseTrainingConfig", seed: int) -> list[str]:
    return sparsify_dynamic(model, cfg.pattern.sparsity, densities=cfg.densities, filter=cfg.filter, seed=seed)


_DYNAMIC = ("update_every", "alpha", "end_fraction", "densities", "filter")
for _name, _method in {
    "ste": SparseMethod("nm", ("filter",), _build_nm, "N:M from |W| every step, straight-through gradient"),
    "sr-ste": SparseMethod("nm", ("lam", "filter"), _build_nm, "N:M from |W| every step, g + λ(1−M)⊙W"),
    "progressive": SparseMethod("nm", ("lam", "kind", "decay_fraction", "filter"), _build_nm,
                                "SR-STE with mask decay or structure decay"),
    "rigl": SparseMethod("unstructured", _DYNAMIC, _build_dynamic, "drop by |W|, grow by |dense gradient|"),
    "set": SparseMethod("unstructured", _DYNAMIC, _build_dynamic, "drop by |W|, grow at random"),
}.items():
    SPARSE_METHODS.register(_name)(_method)


def _label(name: str) -> str:
    """How a field is called in a run's settings (``train.sparse_options.<name>``)."""
    return {"sparsity": "sparsity", "method": "sparse_method"}.get(name, f"sparse_options.{name}")


@dataclass(frozen=True, kw_only=True)
class SparseTrainingConfig:
    """Sparse training of a run (``train.sparsity``, ``train.sparse_method`` and
    ``train.sparse_options``; error messages use those names).

    sparsity: an N:M pattern (``"2:4"``) for ste / sr-ste / progressive, an unstructured
        sparsity (``"0.9"``) for rigl / set (split over the layers by ``densities``).
    method: a name of :data:`SPARSE_METHODS`.
    lam: λ of SR-STE (sr-ste, progressive). kind, decay_fraction: progressive (see the module
        docstring). update_every (ΔT), alpha, end_fraction, densities (erk or uniform): rigl / set.
    filter: a regular expression searched in the names of the linears to sparsify (default: all
        but output heads and routers).
    An option the method does not read must keep its default.
    """

    sparsity: str
    method: str = "sr-ste"
    lam: float = 2e-4
    kind: str = "mask"
    decay_fraction: float = 0.5
    update_every: int = 100
    alpha: float = 0.3
    end_fraction: float = 0.75
    densities: str = "erk"
    filter: str | None = None

    def __post_init__(self) -> None:
        try:
            pattern = parse_pattern(self.sparsity)
        except ValueError as e:
            raise ValueError(f"sparsity: {e}") from None
        object.__setattr__(self, "sparsity", str(pattern))
        if not isinstance(self.method, str) or self.method not in SPARSE_METHODS:
            raise ValueError(f"sparse_method must be one of {', '.join(SPARSE_METHODS.names())}; got {self.method!r}")
        spec = SPARSE_METHODS.get(self.method)
        if pattern.kind == "block":
            raise ValueError(f"sparsity={self.sparsity}: block patterns are not trained from scratch; give an N:M "
                             f"pattern (e.g. 2:4) or an unstructured sparsity (e.g. 0.9)")
        if pattern.kind != spec.pattern_kind:
            if spec.pattern_kind == "nm":
                raise ValueError(f"sparse_method={self.method} trains N:M masks but sparsity={self.sparsity} is "
                                 f"unstructured; give an N:M pattern (e.g. 2:4) or use sparse_method rigl or set")
            raise ValueError(f"sparse_method={self.method} trains unstructured masks but sparsity={self.sparsity} is "
                             f"N:M; give a sparsity like 0.9 or use sparse_method sr-ste, ste or progressive")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("lam", "kind", "decay_fraction", "update_every", "alpha", "end_fraction", "densities", "filter"):
            if name not in spec.options and getattr(self, name) != defaults[name]:
                users = [m for m in SPARSE_METHODS.names() if name in SPARSE_METHODS.get(m).options]
                raise ValueError(f"{_label(name)} applies to sparse_method {', '.join(users)}, not {self.method}")
        self._check_values()

    def _check_values(self) -> None:
        def number(name: str, ok: Callable[[float], bool], allowed: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                raise ValueError(f"{_label(name)} must be a number {allowed}; got {v!r}")
            object.__setattr__(self, name, float(v))

        number("lam", lambda v: 0 <= v < float("inf"), ">= 0")
        number("decay_fraction", lambda v: 0 <= v <= 1, "in [0, 1]")
        number("alpha", lambda v: 0 < v <= 1, "in (0, 1]")
        number("end_fraction", lambda v: 0 < v <= 1, "in (0, 1]")
        v = self.update_every
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{_label('update_every')} must be an int >= 1 (steps between mask updates); got {v!r}")
        for name, allowed in (("kind", PROGRESSIVE_KINDS), ("densities", DENSITIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_label(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        check_filter(self.filter, _label("filter"))

    @classmethod
    def from_settings(cls, sparsity: str | float, method: str,
                      options: dict[str, Any] | None) -> "SparseTrainingConfig":
        """The config of ``train.sparsity`` / ``sparse_method`` / ``sparse_options``; an unknown
        option raises ValueError listing those of the method."""
        options = dict(options or {})
        spec = SPARSE_METHODS.get(method) if isinstance(method, str) and method in SPARSE_METHODS else None
        if spec is not None:
            unknown = sorted(set(options) - set(spec.options))
            if unknown:
                raise ValueError(f"sparse_options: unknown option(s) {', '.join(map(str, unknown))} for sparse_method "
                                 f"{method}; allowed: {', '.join(spec.options)}")
        if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
            sparsity = f"{sparsity}"
        return cls(sparsity=sparsity, method=method, **options)

    @property
    def pattern(self) -> Pattern:
        return parse_pattern(self.sparsity)


# -- building and the controller --------------------------------------------------------------------


def sparsify_for_training(model: nn.Module, cfg: SparseTrainingConfig, *, seed: int = 0) -> list[str]:
    """Swap the model's linears (``cfg.filter``) for the method's sparse layers in place; returns
    their names. ``seed`` fixes RigL / SET's initial masks."""
    return SPARSE_METHODS.get(cfg.method).build(model, cfg, seed)


def check_sparse_fit(model: nn.Module, cfg: SparseTrainingConfig) -> None:
    """Raise ValueError when ``cfg`` cannot sparsify ``model`` (no layer chosen, or a layer whose
    shape does not carry the pattern); reads shapes only (a model on the meta device will do)."""
    targets = sparse_targets(model, cfg.filter)
    if not targets:
        raise ValueError(f"{_label('filter')}={cfg.filter!r} matches no linear layer of the model")
    for name, mod in targets:
        cfg.pattern.check_shape(tuple(mod.weight.shape), name)


class SparseTraining:
    """What the training loop calls for a sparse run: :meth:`begin_step` before the forward,
    :meth:`after_optimizer_step` after ``optimizer.step()``, :meth:`log_record` at each log
    record. Holds no state of its own: the masks and SAD references are buffers of the layers,
    the schedules are functions of the step."""

    def __init__(self, model: nn.Module, cfg: SparseTrainingConfig, *, total_steps: int, seed: int = 0) -> None:
        self.model, self.cfg, self.total_steps, self.seed = model, cfg, int(total_steps), int(seed)
        self.nm = [mod for _, mod in tracked_layers(model) if isinstance(mod, NMSparseLinear)]
        self.dynamic = [mod for _, mod in tracked_layers(model) if isinstance(mod, DynamicSparseLinear)]

    def _updates_after(self, step: int) -> bool:
        """Whether RigL / SET move the masks after optimizer step ``step`` (0-based)."""
        c = self.cfg
        return bool(self.dynamic) and is_update_step(step + 1, self.total_steps, update_every=c.update_every,
                                                     end_fraction=c.end_fraction)

    def begin_step(self, step: int) -> None:
        """Before the forward of step ``step`` (0-based): the schedules' step, and RigL's gradient
        capture on update steps."""
        for mod in self.nm:
            mod.set_step(step, self.total_steps)
        capture = self.cfg.method == "rigl" and self._updates_after(step)
        for mod in self.dynamic:
            mod.capture_grad = capture

    @torch.no_grad()
    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        """After ``optimizer.step()`` of step ``step``: N:M masks recomputed from the new weights
        (at the next step's stage); RigL / SET drop and grow on update steps (zeroing the
        optimizer's state where the mask changed)."""
        for mod in self.nm:
            mod.set_step(step + 1, self.total_steps)
            mod.refresh_mask()
        if self._updates_after(step):
            dynamic_update(self.dynamic, optimizer, step + 1, self.total_steps,
                           growth="gradient" if self.cfg.method == "rigl" else "random", alpha=self.cfg.alpha,
                           end_fraction=self.cfg.end_fraction, seed=self.seed)
        for mod in self.dynamic:
            mod.capture_grad = False
            mod.dense_grad = None

    def log_record(self) -> dict[str, Any]:
        """SAD since the last record and since the start, and the sparsity; for progressive
        training also the current ``pattern`` (structure decay) or ``mask_value`` (mask decay)."""
        rec: dict[str, Any] = sad_record(self.model)
        if self.cfg.method == "progressive" and self.nm:
            mod = self.nm[0]
            if self.cfg.kind == "structure":
                rec["pattern"] = f"{mod.stage_n()}:{mod.pattern.m}"
            else:
                rec["mask_value"] = mod.decay_value()
        return rec
