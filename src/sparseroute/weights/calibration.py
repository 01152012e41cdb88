"""Layer-by-layer calibration: the input statistics of each linear layer, gathered block by block
so that the inputs of block i come from the already-pruned blocks before it.

The engine (:func:`layerwise`) captures the arguments of the first block's forward for every
calibration batch, then for each block: hooks its target linears (:class:`LinearStats` per
linear), runs the block on every captured input, hands the statistics to a ``step`` that prunes
the block's linears, and runs the pruned block again to produce the next block's inputs.

Legend: T calibration tokens (all batch and sequence positions, flattened), I input features of a
linear, O output features.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from sparseroute.weights.linear import Filter, sparse_targets

__all__ = ["LinearStats", "capture_block_inputs", "find_blocks", "layerwise", "normalize_calibration"]

#: attribute paths of the repeated layers, tried on the model and on each of its direct children
BLOCK_PATHS = ("blocks", "encoder.layer", "model.layers", "layers", "transformer.h", "decoder.layers")

#: one calibration batch: a tensor (``model(x)``) or a dict of keyword arguments (``model(**batch)``)
Batch = Tensor | dict[str, Any]

#: ``step(block_name, block, {linear name: (linear, stats)})``: prunes the block's linears in place
Step = Callable[[str, nn.Module, dict[str, tuple[nn.Linear, "LinearStats"]]], None]


class LinearStats:
    """Running statistics of one linear layer's inputs over all calibration tokens.

    Always: ``n`` (tokens) and ``sq_sum_I`` = Σ_t x_tj² (so ‖X_j‖₂ = sqrt(sq_sum_I), Wanda's norm).
    With ``mean=True``: ``sum_I`` = Σ_t x_tj (mean and variance, DSnoT's statistics). With
    ``hessian=True``: ``xtx_II`` = XᵀX (SparseGPT's Hessian is 2·XᵀX/n). Vectors are kept in
    float64, XᵀX in ``hessian_dtype`` (float32 by default: it is I² per layer).
    """

    def __init__(self, in_features: int, *, mean: bool = False, hessian: bool = False,
                 device: torch.device | str | None = None, hessian_dtype: torch.dtype = torch.float32) -> None:
        self.in_features = in_features
        self.n = 0
        self.sq_sum_I = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sum_I = torch.zeros(in_features, dtype=torch.float64, device=device) if mean else None
        self.xtx_II = torch.zeros(in_features, in_features, dtype=hessian_dtype, device=device) if hessian else None

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Add a batch of inputs ``[..., I]`` (every leading position is one token)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LinearStats: inputs have {x.shape[-1]} features; the layer takes {self.in_features}")
        x_TI = x.detach().reshape(-1, self.in_features)
        x64_TI = x_TI.to(device=self.sq_sum_I.device, dtype=torch.float64)
        self.n += x_TI.shape[0]
        self.sq_sum_I += x64_TI.square().sum(0)
        if self.sum_I is not None:
            self.sum_I += x64_TI.sum(0)
        if self.xtx_II is not None:
            xh_TI = x_TI.to(device=self.xtx_II.device, dtype=self.xtx_II.dtype)
            self.xtx_II += xh_TI.T @ xh_TI

    @property
    def sq_norm_I(self) -> Tensor:
        """‖X_j‖₂² per input channel (the sum of squares over all tokens)."""
        return self.sq_sum_I

    @property
    def mean_I(self) -> Tensor:
        """E[x_j] over the calibration tokens."""
        if self.sum_I is None:
            raise ValueError("LinearStats: the mean was not collected (create it with mean=True)")
        return self.sum_I / max(self.n, 1)

    @property
    def var_I(self) -> Tensor:
        """Var(x_j) over the calibration tokens (population variance)."""
        mean_I = self.mean_I
        return (self.sq_sum_I / max(self.n, 1) - mean_I.square()).clamp_min(0.0)

    def hessian(self) -> Tensor:
        """SparseGPT's H = 2·XᵀX / n (``[I, I]``)."""
        if self.xtx_II is None:
            raise ValueError("LinearStats: XᵀX was not collected (create it with hessian=True)")
        return self.xtx_II * (2.0 / max(self.n, 1))


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at the first block."""


def _name_of(model: nn.Module, module: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    return None


def _lookup(root: nn.Module, path: str) -> nn.Module | None:
    mod: Any = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if not isinstance(mod, nn.Module):
            return None
    return mod


def find_blocks(model: nn.Module, blocks: Sequence[nn.Module | str] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's repeated layers in order, as (qualified name, module).

    ``blocks`` given: those modules (or qualified names) of the model, in that order. Else the
    first ModuleList found at one of :data:`BLOCK_PATHS` (``model.blocks`` of sparseroute's LM,
    ``encoder.layer`` of BERT-like models, ...), on the model or one level down (``bert.encoder.layer``).
    """
    if blocks is not None:
        if isinstance(blocks, (nn.Module, str)) and not isinstance(blocks, nn.ModuleList):
            blocks = [blocks]
        out = []
        for i, b in enumerate(blocks):
            if isinstance(b, str):
                try:
                    mod = model.get_submodule(b)
                except AttributeError:
                    raise ValueError(f"blocks[{i}]: the model has no submodule named {b!r}") from None
                out.append((b, mod))
            elif isinstance(b, nn.Module):
                name = _name_of(model, b)
                if name is None:
                    raise ValueError(f"blocks[{i}]: a {type(b).__name__} that is not a submodule of the model")
                out.append((name, b))
            else:
                raise ValueError(f"blocks[{i}]: expected a module or a submodule name; got {type(b).__name__}")
        if not out:
            raise ValueError("blocks: the list is empty; pass the model's repeated layers in order")
        return out
    roots: list[tuple[str, nn.Module]] = [("", model)] + list(model.named_children())
    for path in BLOCK_PATHS:
        for prefix, root in roots:
            found = _lookup(root, path)
            if isinstance(found, nn.ModuleList) and len(found):
                base = f"{prefix}.{path}" if prefix else path
                return [(f"{base}.{i}", mod) for i, mod in enumerate(found)]
    raise ValueError(
        f"could not find the repeated layers of {type(model).__name__} (looked for a ModuleList at "
        f"{', '.join(BLOCK_PATHS)}, on the model and one level down); pass them in order as "
        "blocks=[...] (modules or qualified names such as 'encoder.layer.0')")


def normalize_calibration(calib: Batch | Iterable[Batch] | None) -> list[Batch]:
    """The calibration batches as a list: one tensor or dict is one batch; a list or other
    iterable holds batches. Raises ValueError when there is none or one is of the wrong type."""
    if calib is None:
        return []
    batches = [calib] if isinstance(calib, (Tensor, dict)) else list(calib)
    for i, b in enumerate(batches):
        if not isinstance(b, (Tensor, dict)):
            raise ValueError(f"calibration batch {i}: expected a tensor (model(x)) or a dict (model(**batch)); "
                             f"got {type(b).__name__}")
    return batches


def _to_device(batch: Batch, device: torch.device | None) -> Batch:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return None if p is None else p.device


def capture_block_inputs(model: nn.Module, first_block: nn.Module,
                         batches: list[Batch]) -> list[tuple[tuple, dict[str, Any]]]:
    """The (args, kwargs) of ``first_block``'s forward for each batch; the model's forward is
    stopped there (the layers after it never run)."""
    captured: list[tuple[tuple, dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.append((args, dict(kwargs)))
        raise _StopForward

    device = _model_device(model)
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            before = len(captured)
            batch = _to_device(batch, device)
            try:
                if isinstance(batch, Tensor):
                    model(batch)
                else:
                    model(**batch)
            except _StopForward:
                pass
            if len(captured) != before + 1:
                raise ValueError(f"calibration batch {i}: the model's forward never called its first block "
                                 f"({type(first_block).__name__}); check blocks=")
    finally:
        handle.remove()
    return captured


def _hidden_of(output: Any) -> Tensor:
    """The hidden state in a block's output: the tensor itself or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(f"a block returned {type(output).__name__}; expected a tensor or a tuple whose first "
                     "element is the hidden state")


def _hidden_in(inputs: tuple[tuple, dict[str, Any]]) -> Tensor:
    """The hidden state among a block's inputs: the first positional argument, or ``hidden_states``."""
    args, kwargs = inputs
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, Tensor):
        raise ValueError("the first block was called without a tensor as its first positional argument or "
                         "hidden_states keyword; cannot tell which input is the hidden state")
    return hidden


def _with_hidden(inputs: tuple[tuple, dict[str, Any]], hidden: Tensor) -> tuple[tuple, dict[str, Any]]:
    """The same block inputs with the hidden state (first positional argument, or the
    ``hidden_states`` keyword) replaced."""
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise ValueError("the first block was called without a positional argument or a hidden_states keyword; "
                     "cannot tell which input is the hidden state")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    cfg = getattr(model, "config", None)
    switch_cache = getattr(cfg, "use_cache", None) is True
    if switch_cache:
        # a decoder's cache would grow across the repeated block calls (a frozen config is left alone)
        try:
            cfg.use_cache = False
        except AttributeError:
            switch_cache = False
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        if switch_cache:
            cfg.use_cache = True


def block_targets(model: nn.Module, block_name: str, flt: Filter = None) -> list[tuple[str, nn.Linear]]:
    """The linears :func:`~sparseroute.weights.linear.sparsify` would take (``filter`` applied to
    the model-qualified names) that lie inside the block named ``block_name``."""
    prefix = f"{block_name}." if block_name else ""
    return [(n, m) for n, m in sparse_targets(model, flt) if n.startswith(prefix)]


def layerwise(model: nn.Module, calib: Batch | Iterable[Batch], step: Step, *,
              blocks: Sequence[nn.Module | str] | None = None, filter: Filter = None, mean: bool = False,
              hessian: bool = False, progress: bool = False) -> int:
    """Walk the model block by block on the calibration batches (see the module docstring) and
    return the number of calibration tokens (positions that reach the first block).

    ``step(block_name, block, stats)`` gets ``{linear name: (linear, LinearStats)}`` for the
    block's target linears (``filter`` as in ``sparsify``, on qualified names) and prunes them
    in place; it may swap them for other modules. Runs under ``torch.no_grad()`` in eval mode
    (each module's mode is restored afterwards)."""
    batches = normalize_calibration(calib)
    if not batches:
        raise ValueError("calibration: no batches; pass a tensor, a dict or a list of them")
    found = find_blocks(model, blocks)
    with torch.no_grad(), _eval_mode(model):
        inputs = capture_block_inputs(model, found[0][1], batches)
        tokens = sum(_hidden_in(inp).shape[:-1].numel() for inp in inputs)
        for block_name, block in tqdm(found, desc="pruning", unit="layer", file=sys.stderr, disable=not progress):
            stats: dict[str, tuple[nn.Linear, LinearStats]] = {}
            handles = []
            for name, lin in block_targets(model, block_name, filter):
                st = LinearStats(lin.in_features, mean=mean, hessian=hessian, device=lin.weight.device)
                stats[name] = (lin, st)
                handles.append(lin.register_forward_hook(lambda _m, args, _out, st=st: st.add(args[0])))
            if stats:
                try:
                    for args, kwargs in inputs:
                        block(*args, **kwargs)
                finally:
                    for h in handles:
                        h.remove()
                unseen = [name for name, (_, st) in stats.items() if st.n == 0]
                if unseen:
                    raise ValueError(f"calibration: {', '.join(unseen)} received no input while its block ran; "
                                     "leave it out with filter=")
                step(block_name, block, stats)
            inputs = [_with_hidden(inp, _hidden_of(block(*inp[0], **inp[1]))) for inp in inputs]
    return tokens
