"""One-shot pruning of a trained model: magnitude, Wanda and SparseGPT, optionally repaired by
DSnoT, driven layer by layer on calibration batches (:mod:`.calibration`).

``prune(model, "wanda", "2:4", calib)`` swaps the pruned linears for :class:`SparseLinear`
(masks satisfying the pattern, masked weights zeroed) and returns a :class:`PruneReport`.
Methods are found by name in :data:`PRUNERS`, repairs in :data:`REPAIRS`.

Legend: O output features, I input features of a linear.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from sparseroute.registry import Registry
from sparseroute.weights.calibration import (
    Batch,
    LinearStats,
    block_targets,
    find_blocks,
    layerwise,
    normalize_calibration,
)
from sparseroute.weights.dsnot import DSnoTConfig, dsnot_repair
from sparseroute.weights.linear import Filter, SparseLinear, sparsify
from sparseroute.weights.patterns import Pattern, mask_from_scores, parse_pattern, sparsity_of
from sparseroute.weights.sparsegpt import SparseGPTConfig, sparsegpt_prune

__all__ = ["PRUNERS", "REPAIRS", "LayerRecord", "PruneMethod", "PruneReport", "RepairMethod",
           "layer_reconstruction_error", "prune", "wanda_scores"]

#: ``fn(weight_OI, pattern, stats or None, config, name) -> (mask_OI, new weight_OI or None)``
PruneFn = Callable[[Tensor, Pattern, LinearStats | None, Any, str], tuple[Tensor, Tensor | None]]
#: ``fn(dense_OI, weight_OI, mask_OI, pattern, stats, config, name) -> (mask_OI, new weight_OI or None)``
RepairFn = Callable[[Tensor, Tensor, Tensor, Pattern, LinearStats, Any, str], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True, kw_only=True)
class PruneMethod:
    """A pruning method: its function, whether it reads calibration statistics (and XᵀX), the
    pattern kinds it supports and its options' dataclass (None: it takes none)."""

    fn: PruneFn
    calibrated: bool
    hessian: bool = False
    kinds: tuple[str, ...] = ("unstructured", "nm", "block")
    config: type | None = None


@dataclass(frozen=True, kw_only=True)
class RepairMethod:
    """A mask repair run after a method: its function, pattern kinds and options' dataclass."""

    fn: RepairFn
    kinds: tuple[str, ...] = ("unstructured", "nm")
    config: type | None = None


PRUNERS: Registry[PruneMethod] = Registry("pruning method")
REPAIRS: Registry[RepairMethod] = Registry("mask repair")


def wanda_scores(weight_OI: Tensor, sq_norm_I: Tensor) -> Tensor:
    """Wanda's score |W_ij|·‖X_j‖₂, with ``sq_norm_I`` = ‖X_j‖₂² (Σ over calibration tokens)."""
    return weight_OI.detach().abs().float() * sq_norm_I.to(weight_OI.device).float().sqrt()[None, :]


def layer_reconstruction_error(W_OI: Tensor, W_hat_OI: Tensor, H_II: Tensor) -> float:
    """‖(W − Ŵ)Xᵀ‖² = Σ_o ΔW_o H ΔW_oᵀ with H = XᵀX (float64)."""
    d_OI = W_OI.double() - W_hat_OI.double().to(W_OI.device)
    return float(((d_OI @ H_II.double().to(d_OI.device)) * d_OI).sum())


def _magnitude(weight_OI: Tensor, pattern: Pattern, stats: LinearStats | None, config: Any,
               name: str) -> tuple[Tensor, Tensor | None]:
    return mask_from_scores(weight_OI.abs(), pattern, name), None


def _wanda(weight_OI: Tensor, pattern: Pattern, stats: LinearStats, config: Any,
           name: str) -> tuple[Tensor, Tensor | None]:
    return mask_from_scores(wanda_scores(weight_OI, stats.sq_norm_I), pattern, name), None


def _sparsegpt(weight_OI: Tensor, pattern: Pattern, stats: LinearStats, config: Any,
               name: str) -> tuple[Tensor, Tensor | None]:
    return sparsegpt_prune(weight_OI, stats.hessian(), pattern, config, name)


def _dsnot(dense_OI: Tensor, weight_OI: Tensor, mask_OI: Tensor, pattern: Pattern, stats: LinearStats,
           config: Any, name: str) -> tuple[Tensor, Tensor | None]:
    return dsnot_repair(dense_OI, weight_OI, mask_OI, stats.mean_I, stats.var_I, stats.sq_norm_I, pattern,
                        config, name)


PRUNERS.register("magnitude")(PruneMethod(fn=_magnitude, calibrated=False))
PRUNERS.register("wanda")(PruneMethod(fn=_wanda, calibrated=True))
PRUNERS.register("sparsegpt")(PruneMethod(fn=_sparsegpt, calibrated=True, hessian=True,
                                          kinds=("unstructured", "nm"), config=SparseGPTConfig))
REPAIRS.register("dsnot")(RepairMethod(fn=_dsnot, config=DSnoTConfig))


@dataclass
class LayerRecord:
    """One pruned linear: qualified name, [O, I] shape, share of zeros in its mask, seconds spent
    choosing the mask, and (calibrated runs) ‖(W−Ŵ)X‖²/‖WX‖² on its calibration inputs."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    seconds: float
    error: float | None = None


@dataclass
class PruneReport:
    """What :func:`prune` did: the method, pattern and repair, total seconds, calibration tokens
    (positions reaching the first block; 0 without calibration) and one record per linear."""

    method: str
    pattern: str
    repair: str | None
    seconds: float
    calib_tokens: int
    layers: list[LayerRecord] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """The share of zeros over all pruned weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sparsity"] = self.sparsity
        return out


@dataclass(frozen=True, kw_only=True)
class _EngineOptions:
    report_error: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.report_error, bool):
            raise ValueError(f"prune option report_error must be True or False; got {self.report_error!r}")


def _split_options(options: dict[str, Any] | None, method: str, pm: PruneMethod, repair: str | None,
                   rm: RepairMethod | None) -> tuple[Any, Any, _EngineOptions]:
    """The options dict split into the method's config, the repair's config and the engine's."""
    options = dict(options or {})
    parts: list[tuple[str, type | None]] = [(method, pm.config), (repair or "", rm.config if rm else None),
                                            ("prune", _EngineOptions)]
    allowed = {f.name: owner for owner, cls in parts if cls is not None for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"prune: unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}"
                         f"{f' with repair {repair!r}' if repair else ''}; allowed: {', '.join(sorted(allowed))}")
    configs = []
    for owner, cls in parts:
        kw = {k: v for k, v in options.items() if allowed.get(k) == owner}
        configs.append(cls(**kw) if cls is not None else None)
    return configs[0], configs[1], configs[2]


def _check_kinds(what: str, name: str, kinds: tuple[str, ...], pattern: Pattern) -> None:
    if pattern.kind not in kinds:
        raise ValueError(f"{what} {name!r} does not support {pattern.kind} pattern {pattern}; "
                         f"it supports: {', '.join(kinds)}")


def prune(model: nn.Module, method: str, pattern: Pattern | str | float,
          calib: Batch | Iterable[Batch] | None = None, *, filter: Filter = None, repair: str | None = None,
          blocks: Sequence[nn.Module | str] | None = None, progress: bool = False,
          options: dict[str, Any] | None = None) -> PruneReport:
    """Prune the linears inside the model's repeated blocks (``filter`` as in ``sparsify``;
    linears outside the blocks, e.g. a pooler or the output head, stay dense) to ``pattern``.

    ``method``: a name in :data:`PRUNERS` ("magnitude", "wanda", "sparsegpt"); ``repair``: a name
    in :data:`REPAIRS` ("dsnot") or None. ``calib``: calibration batches (a tensor for
    ``model(x)``, a dict for ``model(**batch)``, or a list of them); required by the calibrated
    methods and repairs. With calibration, blocks are pruned in order and each sees the outputs
    of the already-pruned blocks before it. ``blocks``: the repeated layers when
    :func:`~sparseroute.weights.calibration.find_blocks` cannot find them. ``options``: the
    method's and repair's config fields (SparseGPT: blocksize, percdamp; DSnoT: threshold,
    max_cycles, pow_var, same_sign) and ``report_error`` (collect XᵀX to report each layer's
    reconstruction error; default True; SparseGPT collects it anyway). The model is checked
    before it is changed; an error raised while pruning leaves the blocks before it pruned."""
    t0 = time.perf_counter()
    pm = PRUNERS.get(method)
    rm = REPAIRS.get(repair) if repair is not None else None
    pat = parse_pattern(pattern)
    _check_kinds("method", method, pm.kinds, pat)
    if rm is not None:
        _check_kinds("repair", repair, rm.kinds, pat)
    method_cfg, repair_cfg, engine = _split_options(options, method, pm, repair, rm)
    batches = normalize_calibration(calib)
    needs_calib = pm.calibrated or rm is not None
    if needs_calib and not batches:
        who = f"method {method!r}" if pm.calibrated else f"repair {repair!r}"
        raise ValueError(f"prune: {who} needs calibration batches (calib=[...] of input tensors or dicts of "
                         "model inputs); got none. Use method 'magnitude' to prune without calibration")
    found = find_blocks(model, blocks)
    targets = [t for name, _ in found for t in block_targets(model, name, filter)]
    if not targets:
        raise ValueError("prune: no linear layer inside the model's blocks matches the filter")
    for name, lin in targets:
        pat.check_shape(tuple(lin.weight.shape), name)

    report = PruneReport(method=method, pattern=str(pat), repair=repair, seconds=0.0, calib_tokens=0)
    pruned: list[str] = []

    def prune_linear(name: str, lin: nn.Linear, stats: LinearStats | None) -> Tensor:
        t = time.perf_counter()
        dense_OI = lin.weight.detach()
        mask_OI, new_OI = pm.fn(dense_OI, pat, stats, method_cfg, name)
        if rm is not None:
            base_OI = dense_OI if new_OI is None else new_OI
            mask_OI, new_OI = rm.fn(dense_OI, base_OI, mask_OI, pat, stats, repair_cfg, name)
        seconds = time.perf_counter() - t
        error = None
        if stats is not None and stats.xtx_II is not None:
            hat_OI = (dense_OI if new_OI is None else new_OI) * mask_OI
            num = layer_reconstruction_error(dense_OI, hat_OI, stats.xtx_II)
            den = layer_reconstruction_error(dense_OI, torch.zeros_like(dense_OI), stats.xtx_II)
            error = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
        if new_OI is not None:
            lin.weight.copy_(new_OI.to(lin.weight.dtype))
        report.layers.append(LayerRecord(name=name, shape=(lin.out_features, lin.in_features), sparsity=sparsity_of(mask_OI),
                                         seconds=seconds, error=error))
        return mask_OI

    def swap(masks: dict[str, Tensor]) -> None:
        names = set(masks)
        pruned.extend(sparsify(model, pat, lambda n, _m: n in names, masks=masks))

    with torch.no_grad():
        if batches:
            def step(_block_name: str, _block: nn.Module, stats: dict[str, tuple[nn.Linear, LinearStats]]) -> None:
                swap({name: prune_linear(name, lin, st) for name, (lin, st) in stats.items()})

            report.calib_tokens = layerwise(model, batches, step, blocks=[n for n, _ in found], filter=filter,
                                            mean=rm is not None, hessian=pm.hessian or engine.report_error,
                                            progress=progress)
        else:
            swap({name: prune_linear(name, lin, None) for name, lin in targets})
        for name in pruned:
            mod = model.get_submodule(name)
            assert isinstance(mod, SparseLinear)
            mod.apply_mask_()
    report.seconds = time.perf_counter() - t0
    return report
