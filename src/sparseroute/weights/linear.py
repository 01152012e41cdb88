"""``SparseLinear``: a linear layer whose weight is used through a mask, and the module swap that
puts it into a model (:func:`sparsify`) and takes it out again (:func:`densify`).

The mask is a bool buffer (saved in the state dict as ``<name>.mask``); the dense ``weight``
parameter stays, so sparse training can move weights in and out of the mask. The forward is
``x @ (weight ⊙ mask)ᵀ + bias``. The state dict holds the same keys as ``nn.Linear`` plus the
mask; a state dict without a mask (a dense checkpoint) loads and keeps the current mask.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseroute.kernels import gemm
from sparseroute.weights.patterns import Pattern, check_pattern, mask_from_scores, parse_pattern

#: which linears :func:`sparsify` takes: a callable (name, module) -> bool, a regular expression
#: searched in the module's qualified name, or a tuple of module types
Filter = Callable[[str, nn.Module], bool] | str | tuple[type, ...] | None

#: names never sparsified by default: output heads (their rows are the vocabulary) and routers
DEFAULT_EXCLUDE = re.compile(r"(^|\.)(lm_head|head|router|gate_router|classifier)$")


class SparseLinear(nn.Linear):
    """``nn.Linear`` with a bool ``mask`` buffer of the weight's shape; forward uses weight ⊙ mask.

    ``pattern`` (optional) is the pattern the mask must satisfy; :meth:`set_mask` checks it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, pattern: Pattern | str | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pattern = None if pattern is None else parse_pattern(pattern)
        if self.pattern is not None:
            self.pattern.check_shape((out_features, in_features))
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        self.on_backend = True  # products on sparseroute's backend (gemm.linear), as the LM's linears

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor | None = None, pattern: Pattern | str | None = None,
                    name: str = "weight") -> "SparseLinear":
        """A SparseLinear sharing ``linear``'s parameters (no copy) with the given mask (default:
        the pattern's magnitude mask, or all ones without a pattern)."""
        p = None if pattern is None else parse_pattern(pattern)
        if p is not None:
            p.check_shape(tuple(linear.weight.shape), name)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.pattern = p
        # a model's own nn.Linear keeps torch's F.linear, so a full mask computes what it did
        new.on_backend = isinstance(linear, gemm.Linear)
        if mask is None:
            mask = (mask_from_scores(linear.weight.abs(), p, name) if p is not None
                    else torch.ones_like(linear.weight, dtype=torch.bool))
        new.register_buffer("mask", torch.zeros_like(linear.weight, dtype=torch.bool))
        new.set_mask(mask, name)
        return new

    @torch.no_grad()
    def set_mask(self, mask: Tensor, name: str = "weight") -> None:
        """Replace the mask (checked against the layer's pattern when it has one)."""
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"{name}: mask shape {tuple(mask.shape)} differs from the weight's {tuple(self.weight.shape)}")
        mask = mask.to(device=self.weight.device, dtype=torch.bool)
        if self.pattern is not None:
            check_pattern(mask, self.pattern, name)
        self.mask.copy_(mask)

    def masked_weight(self) -> Tensor:
        return self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        if not self.on_backend:
            return F.linear(x, self.masked_weight(), self.bias)
        y = gemm.linear(x, self.masked_weight())
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the masked-out entries of the dense weight itself (after pruning, before export)."""
        self.weight.mul_(self.mask)

    def to_linear(self) -> nn.Linear:
        """A dense linear (of the kind it replaced) whose weight is weight ⊙ mask."""
        out = (gemm.Linear if self.on_backend else nn.Linear)(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.masked_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.weight.requires_grad_(self.weight.requires_grad)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "mask" in missing_keys:  # a dense state dict: keep the current mask
            missing_keys.remove(prefix + "mask")

    def extra_repr(self) -> str:
        kept = float(self.mask.float().mean()) if self.mask.numel() else 1.0
        pat = f", pattern={self.pattern}" if self.pattern is not None else ""
        return super().extra_repr() + f"{pat}, density={kept:.3f}"


def _matches(flt: Filter, name: str, module: nn.Module) -> bool:
    if flt is None:
        return not DEFAULT_EXCLUDE.search(name)
    if isinstance(flt, str):
        return re.search(flt, name) is not None
    if isinstance(flt, tuple):
        return isinstance(module, flt)
    return bool(flt(name, module))


def sparse_targets(model: nn.Module, flt: Filter = None) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules (not yet sparse) that :func:`sparsify` would swap, in module order."""
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and not isinstance(mod, SparseLinear) and name and _matches(flt, name, mod)]


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparsify(model: nn.Module, pattern: Pattern | str | None = None, filter: Filter = None, *,
             masks: dict[str, Tensor] | None = None, cls: type[SparseLinear] = SparseLinear,
             **kwargs) -> list[str]:
    """Swap the model's linears chosen by ``filter`` for ``cls`` (SparseLinear) in place and
    return their names. Each mask is ``masks[name]`` when given, else the pattern's magnitude
    mask (|W|). ``kwargs`` go to ``cls.from_linear``. Every layer's shape is checked first, so a
    pattern that does not fit one layer changes nothing."""
    p = None if pattern is None else parse_pattern(pattern)
    targets = sparse_targets(model, filter)
    if not targets:
        raise ValueError("sparsify: the filter matched no nn.Linear module in the model")
    if p is not None:
        for name, mod in targets:
            p.check_shape(tuple(mod.weight.shape), name)
    for name, mod in targets:
        mask = None if masks is None else masks.get(name)
        _set_child(model, name, cls.from_linear(mod, mask=mask, pattern=p, name=name, **kwargs))
    return [name for name, _ in targets]


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseLinear]]:
    """The model's SparseLinear modules, in module order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, SparseLinear)]


def densify(model: nn.Module) -> list[str]:
    """Swap every SparseLinear back for a dense linear whose weight is weight ⊙ mask (bit-exact:
    the dense model computes what the sparse one did). Returns the swapped names."""
    names = []
    for name, mod in sparse_layers(model):
        _set_child(model, name, mod.to_linear())
        names.append(name)
    return names


def masks_of(model: nn.Module) -> dict[str, Tensor]:
    """Every SparseLinear's mask by module name (copies)."""
    return {name: mod.mask.clone() for name, mod in sparse_layers(model)}


def model_sparsity(model: nn.Module, names: Iterable[str] | None = None) -> float:
    """The share of masked-out weights over the model's SparseLinear layers."""
    chosen = None if names is None else set(names)
    kept = total = 0
    for name, mod in sparse_layers(model):
        if chosen is None or name in chosen:
            kept += int(mod.mask.sum())
            total += mod.mask.numel()
    return 1.0 - kept / total if total else 0.0
