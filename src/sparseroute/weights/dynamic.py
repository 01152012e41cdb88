"""Masks that move during training: the layer base that tracks them (Sparse Architecture
Divergence, SAD) and dynamic sparse training with RigL and SET.

SAD is the share of mask bits that differ between two points of training. Every
:class:`TrackedSparseLinear` keeps two bool buffers besides its ``mask``: ``mask_start`` (the mask
training started with) and ``mask_logged`` (the mask at the last log record), so both divergences
are in the state dict and a resumed run reports what an uninterrupted one does.

RigL / SET (:class:`DynamicSparseLinear`): an unstructured mask per layer at a density chosen by
:func:`layer_densities` (ERK or uniform) for a target sparsity; weights outside the mask are zero
and stay zero. Every ``update_every`` steps, while the share of training done is below
``end_fraction``, each layer drops ``k = floor(f(t) * active)`` active weights with the smallest
|W|, f(t) = (alpha / 2)(1 + cos(pi t / T_end)), and activates ``k`` positions that were inactive
before the update: those with the largest |gradient of the loss w.r.t. the masked weight| (RigL,
captured during the update step's backward) or uniformly at random (SET, a generator seeded from
the run's seed and the step). Dropped and grown weights are set to 0 and their AdamW state
(``exp_avg``, ``exp_avg_sq``) is zeroed there, so the non-zeros per layer stay constant and a
dropped weight cannot drift back. Ties are broken towards the lower flat index.

Legend: O output features, I input features.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from sparseroute.weights.linear import Filter, SparseLinear, sparse_targets, sparsify
from sparseroute.weights.patterns import Pattern

__all__ = [
    "DENSITIES",
    "DynamicSparseLinear",
    "TrackedSparseLinear",
    "drop_and_grow",
    "drop_fraction",
    "dynamic_update",
    "erk_densities",
    "is_update_step",
    "layer_densities",
    "mask_divergence",
    "reset_optimizer_state",
    "sad_record",
    "sparse_summary",
    "sparsify_dynamic",
    "step_generator",
    "tracked_layers",
]

#: how a target sparsity is split over layers
DENSITIES = ("erk", "uniform")
#: the growth rules of :func:`dynamic_update`
GROWTH = ("gradient", "random")


class TrackedSparseLinear(SparseLinear):
    """A :class:`SparseLinear` that also keeps ``mask_start`` and ``mask_logged`` (bool buffers,
    saved in the state dict) for SAD. Subclasses configure themselves in :meth:`_setup` (called
    by the constructor and by :meth:`from_linear` with the same keyword options) and may set the
    initial mask in :meth:`_initial_mask`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, pattern: Pattern | str | None = None,
                 device=None, dtype=None, **options) -> None:
        super().__init__(in_features, out_features, bias, pattern=pattern, device=device, dtype=dtype)
        self._setup(**options)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor | None = None, pattern: Pattern | str | None = None,
                    name: str = "weight", **options) -> "TrackedSparseLinear":
        new = super().from_linear(linear, mask=mask, pattern=pattern, name=name)
        new._setup(**options)
        return new

    def _setup(self) -> None:
        self._initial_mask()
        self.register_buffer("mask_start", self.mask.clone())
        self.register_buffer("mask_logged", self.mask.clone())

    def _initial_mask(self) -> None:
        """Set ``mask`` to the mask training starts with (default: keep the one given)."""


def tracked_layers(model: nn.Module) -> list[tuple[str, TrackedSparseLinear]]:
    """The model's :class:`TrackedSparseLinear` modules, in module order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, TrackedSparseLinear)]


@torch.no_grad()
def mask_divergence(model: nn.Module, reference: str = "logged") -> float:
    """SAD: the share of the tracked layers' mask bits that differ from ``mask_logged``
    (``reference="logged"``) or ``mask_start`` (``"start"``); 0.0 without tracked layers."""
    if reference not in ("logged", "start"):
        raise ValueError(f"reference must be 'logged' or 'start'; got {reference!r}")
    flipped = total = 0
    for _, mod in tracked_layers(model):
        ref = mod.mask_logged if reference == "logged" else mod.mask_start
        flipped += int((mod.mask != ref).sum())
        total += mod.mask.numel()
    return flipped / total if total else 0.0


@torch.no_grad()
def sad_record(model: nn.Module, *, advance: bool = True) -> dict[str, float]:
    """``{"sad": share flipped since the last record, "sad_total": since the start, "sparsity":
    share of masked-out weights}`` over the tracked layers; ``advance`` makes the current masks the
    reference of the next record (``mask_logged``)."""
    kept = total = 0
    for _, mod in tracked_layers(model):
        kept += int(mod.mask.sum())
        total += mod.mask.numel()
    rec = {"sad": mask_divergence(model, "logged"), "sad_total": mask_divergence(model, "start"),
           "sparsity": 1.0 - kept / total if total else 0.0}
    if advance:
        for _, mod in tracked_layers(model):
            mod.mask_logged.copy_(mod.mask)
    return rec


def sparse_summary(model: nn.Module) -> dict[str, Any]:
    """The masks of a sparse-trained model: ``sparsity`` (masked-out share), ``sad_total`` (mask
    bits flipped since the start), ``kept_weights`` and ``masked_weights`` (counts)."""
    kept = total = 0
    for _, mod in tracked_layers(model):
        kept += int(mod.mask.sum())
        total += mod.mask.numel()
    rec = sad_record(model, advance=False)
    return {"sparsity": rec["sparsity"], "sad_total": rec["sad_total"], "kept_weights": kept,
            "masked_weights": total - kept}


# -- layer densities --------------------------------------------------------------------------------


def erk_densities(shapes: list[tuple[int, int]], density: float) -> list[float]:
    """Erdős–Rényi densities of [O, I] matrices: density_l = eps * (O + I) / (O * I), with eps
    chosen so that the kept weights total ``density`` of all weights; a layer that would exceed
    1 is kept dense and eps is solved again over the others."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1]; got {density!r}")
    sizes = [o * i for o, i in shapes]
    raw = [(o + i) / (o * i) for o, i in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[j] for j in dense)
        free = [j for j in range(len(shapes)) if j not in dense]
        if not free:
            return [1.0] * len(shapes)
        eps = budget / sum(raw[j] * sizes[j] for j in free)
        over = [j for j in free if eps * raw[j] > 1.0]
        if not over:
            return [1.0 if j in dense else eps * raw[j] for j in range(len(shapes))]
        dense.update(over)


def layer_densities(shapes: list[tuple[int, int]], sparsity: float, kind: str = "erk") -> list[float]:
    """Per-layer densities for an overall ``sparsity``: ``"erk"`` (:func:`erk_densities`) or
    ``"uniform"`` (every layer at 1 - sparsity)."""
    if kind not in DENSITIES:
        raise ValueError(f"densities must be one of {', '.join(DENSITIES)}; got {kind!r}")
    if kind == "uniform":
        return [1.0 - sparsity] * len(shapes)
    return erk_densities(shapes, 1.0 - sparsity)


# -- the layer --------------------------------------------------------------------------------------


class DynamicSparseLinear(TrackedSparseLinear):
    """A tracked SparseLinear whose mask RigL / SET move. With ``capture_grad`` set, the next
    training forward keeps the gradient of the loss w.r.t. the masked weight in ``dense_grad``
    (the controller sets it only on update steps; a plain attribute, not state)."""

    def _setup(self) -> None:
        self.capture_grad = False
        self.dense_grad: Tensor | None = None
        super()._setup()

    def masked_weight(self) -> Tensor:
        w = self.weight * self.mask
        if self.capture_grad and self.training and w.requires_grad:
            w.register_hook(self._keep_grad)
        return w

    def _keep_grad(self, grad: Tensor) -> None:
        grad = grad.detach()
        self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad + grad


def _top_among(scores: Tensor, where: Tensor, k: int) -> Tensor:
    """True at the ``k`` positions of ``where`` with the highest ``scores`` (ties: the lower flat
    index wins); positions outside ``where`` are never chosen."""
    out = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        cand = where.reshape(-1).nonzero().squeeze(1)
        order = torch.sort(scores.reshape(-1)[cand], descending=True, stable=True).indices[:k]
        out[cand[order]] = True
    return out.reshape(scores.shape)


def sparsify_dynamic(model: nn.Module, sparsity: float, *, densities: str = "erk", filter: Filter = None,
                     seed: int = 0) -> list[str]:
    """Swap the linears chosen by ``filter`` (default: all but heads and routers) for
    :class:`DynamicSparseLinear` with random masks at :func:`layer_densities` (a generator seeded
    with ``seed``, drawn in module order), zero the weights outside the masks, and return the
    swapped names. A layer whose density is 1 stays fully kept (it has nothing to move)."""
    targets = sparse_targets(model, filter)
    if not targets:
        raise ValueError("sparsify: the filter matched no nn.Linear module in the model")
    dens = layer_densities([tuple(mod.weight.shape) for _, mod in targets], sparsity, densities)
    gen = torch.Generator().manual_seed(int(seed))
    masks, patterns = {}, {}
    for (name, mod), d in zip(targets, dens):
        numel = mod.weight.numel()
        keep = min(numel, max(1, int(round(d * numel))))
        scores = torch.rand(tuple(mod.weight.shape), generator=gen)
        masks[name] = _top_among(scores, torch.ones_like(scores, dtype=torch.bool), keep).to(mod.weight.device)
        patterns[name] = None if keep == numel else Pattern(kind="unstructured", sparsity=1.0 - keep / numel,
                                                            scope="layer")
    names = sparsify(model, None, filter, masks=masks, cls=DynamicSparseLinear)
    for name in names:
        mod = model.get_submodule(name)
        mod.pattern = patterns[name]
        mod.apply_mask_()
    return names


# -- the schedule and the update --------------------------------------------------------------------


def drop_fraction(step: int, total_steps: int, *, alpha: float = 0.3, end_fraction: float = 0.75) -> float:
    """f(t) = (alpha / 2)(1 + cos(pi t / T_end)), T_end = end_fraction * total_steps; 0 from T_end on."""
    t_end = end_fraction * total_steps
    if step >= t_end:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * step / t_end))


def is_update_step(step: int, total_steps: int, *, update_every: int = 100, end_fraction: float = 0.75) -> bool:
    """Whether the masks move after ``step`` optimizer steps (``step`` counts from 1): every
    ``update_every`` steps while fewer than ``end_fraction`` of the steps are done."""
    return step > 0 and step % update_every == 0 and step < end_fraction * total_steps


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step) alone: SET's draws need no saved state."""
    digest = hashlib.sha256(f"sparseroute-set:{int(seed)}:{int(step)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: Tensor, where: Tensor) -> None:
    """Zero the optimizer's per-element state of ``param`` (Adam's ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``; SGD's ``momentum_buffer``) at ``where``."""
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
        buf = state.get(key)
        if isinstance(buf, Tensor) and buf.shape == param.shape:
            buf.masked_fill_(where, 0)


@torch.no_grad()
def drop_and_grow(layer: SparseLinear, k: int, grow_scores: Tensor) -> Tensor:
    """Drop the ``k`` active weights of smallest |W| and activate the ``k`` positions inactive
    before the call with the highest ``grow_scores`` (``k`` is capped by both counts); set the
    weight to 0 at every changed position and return the changed positions (bool [O, I])."""
    mask = layer.mask
    active = int(mask.sum())
    k = min(k, active, mask.numel() - active)
    if k <= 0:
        return torch.zeros_like(mask)
    kept = _top_among(layer.weight.detach().abs(), mask, active - k)
    grown = _top_among(grow_scores, ~mask, k)
    new = kept | grown
    changed = new != mask
    layer.weight.masked_fill_(changed, 0)
    mask.copy_(new)
    return changed


@torch.no_grad()
def dynamic_update(layers: list[DynamicSparseLinear], optimizer: torch.optim.Optimizer | None, step: int,
                   total_steps: int, *, growth: str, alpha: float = 0.3, end_fraction: float = 0.75,
                   seed: int = 0) -> int:
    """One RigL (``growth="gradient"``) or SET (``"random"``) update after ``step`` optimizer
    steps: every layer drops and grows ``floor(f(step) * active)`` weights and the optimizer's
    state is zeroed where the mask changed. Returns the number of changed mask bits. RigL needs
    each layer's ``dense_grad`` (a layer without one is left as it is); the captured gradients
    are released."""
    if growth not in GROWTH:
        raise ValueError(f"growth must be one of {', '.join(GROWTH)}; got {growth!r}")
    f = drop_fraction(step, total_steps, alpha=alpha, end_fraction=end_fraction)
    gen = step_generator(seed, step) if growth == "random" else None
    changed_bits = 0
    for layer in layers:
        if growth == "gradient":
            grad, layer.dense_grad = layer.dense_grad, None
            if grad is None:
                continue
            scores = grad.abs()
        else:
            scores = torch.rand(tuple(layer.mask.shape), generator=gen).to(layer.mask.device)
        k = int(f * int(layer.mask.sum()))
        changed = drop_and_grow(layer, k, scores)
        if optimizer is not None and bool(changed.any()):
            reset_optimizer_state(optimizer, layer.weight, changed)
        changed_bits += int(changed.sum())
    return changed_bits


def check_filter(pattern: str | None, what: str = "filter") -> None:
    """A layer filter given as text must be a valid regular expression."""
    if pattern is None:
        return
    if not isinstance(pattern, str):
        raise ValueError(f"{what} must be a regular expression searched in the layer names; got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what}: {pattern!r} is not a valid regular expression ({e})") from None
