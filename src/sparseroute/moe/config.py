"""The configuration of a mixture-of-experts layer: :class:`MoEConfig`, one validated dataclass
that :class:`~sparseroute.moe.MoE` takes directly and that the LM config holds for its MoE
layers, and the checks it shares with the routers.

Legend: T tokens, D model dim, E experts, k experts per token, F expert hidden.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sparseroute.moe.dispatch import EXECUTORS
from sparseroute.moe.experts import check_activation
from sparseroute.moe.routers import ROUTERS
from sparseroute.moe.routers.base import check_top_k, make_config

__all__ = ["MoEConfig", "check_halt_threshold", "LAYER_PATTERNS", "HOP_NORMS", "HOP_NORM_EPS"]

#: the named choices of :attr:`MoEConfig.layers`
LAYER_PATTERNS = ("all", "every_other")


def check_layer_selection(layers: Any, none_hint: str) -> str | tuple[int, ...]:
    """A ``layers`` setting as stored: "all", "every_other" or a tuple (from a tuple or list) of
    distinct layer indices >= 0; anything else raises ValueError naming ``layers``
    (``none_hint`` says what to use instead of an empty selection)."""
    if isinstance(layers, list):
        layers = tuple(layers)
    allowed = "'all', 'every_other' or a tuple of layer indices"
    if isinstance(layers, str):
        if layers not in LAYER_PATTERNS:
            raise ValueError(f"layers must be {allowed}; got {layers!r}")
    elif isinstance(layers, tuple):
        if not layers:
            raise ValueError(f"layers: an empty tuple selects no layer; {none_hint}")
        for i in layers:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise ValueError(f"layers must hold layer indices (ints >= 0); got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat an index; got {layers!r}")
    else:
        raise ValueError(f"layers must be {allowed}; got {layers!r}")
    return layers


def selected_layers(layers: str | tuple[int, ...], n_layers: int) -> tuple[int, ...]:
    """Sorted indices of the layers of an ``n_layers`` model that a checked ``layers`` selects."""
    if layers == "all":
        return tuple(range(n_layers))
    if layers == "every_other":
        return tuple(range(1, n_layers, 2))
    return tuple(sorted(layers))

#: the choices of :attr:`MoEConfig.hop_norm`
HOP_NORMS = ("none", "shared", "per_hop")

#: epsilon of the hop norms (the LM's default ``norm_eps``)
HOP_NORM_EPS = 1e-5


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """``value`` must be an int (not a bool) >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def check_positive_number(name: str, value: Any) -> None:
    """``value`` must be a finite number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def check_halt_threshold(value: Any) -> None:
    """The relative-norm halting threshold: a number >= 0 (0 = no halting)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"halt_threshold must be a number >= 0 (0 = no halting); got {value!r}")


class LayerConfigDict:
    """``replace`` / ``to_dict`` / ``from_dict`` of a frozen config dataclass with a ``layers``
    selection (MoE layers, sparse attention layers): unknown fields raise ValueError naming them,
    and the dict is plain JSON (the layer tuple as a list)."""

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again); an unknown field raises ValueError."""
        return dataclasses.replace(self, **known_fields(type(self), changes, type(self).__name__))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples as lists)."""
        d = dataclasses.asdict(self)
        if isinstance(self.layers, tuple):
            d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        return cls(**known_fields(cls, d, cls.__name__))


@dataclass(frozen=True, kw_only=True)
class MoEConfig(LayerConfigDict):
    """A mixture-of-experts feed-forward layer (everything but its model width, which the layer
    or the model it sits in gives).

    num_experts, top_k: E experts, k chosen per token (variable-k routers such as ``relu`` and
        ``expert_choice`` use k only as their nominal budget).
    d_ff: hidden size F of each expert. ``None`` lets the owner decide: the LM uses its dense
        ``d_ff // top_k`` (a token's active expert parameters then equal the dense FFN's); a
        standalone :class:`~sparseroute.moe.MoE` needs it given.
    router, router_options: a name registered in ``sparseroute.moe.ROUTERS`` and the options of
        its config (validated here). ``hash`` routes by token id.
    activation: expert activation (swiglu, gelu, silu, relu).
    capacity_factor: ``None`` for dropless; else each expert takes at most
        ``ceil(capacity_factor · T · k / E)`` (token, slot) pairs and the overflow is dropped
        (reported in the routing statistics).
    num_shared_experts / shared_d_ff / shared_gate: dense expert(s) every token also uses; their
        hidden size defaults to ``num_shared_experts · F``; ``shared_gate`` scales them by
        sigmoid(w·x) (Qwen2-MoE).
    dispatch: executor: "auto" (grouped on CUDA; on the CPU the compiled expert-parallel kernel,
        or the Python loop "fused" where it is not built), "grouped", "fused", "parallel",
        "loop", or "reference" (the per-token oracle, for tests).
    hops: H, multi-hop routing through the same experts: h_0 = x, h_{i+1} = h_i + MoE_i(h_i),
        re-routing at every hop; the layer returns h_H - x (H = 1 is the plain layer).
    hop_routers: hop i > 0 has its own router (same type and options) instead of hop 0's.
    hop_scale: each hop's output is scaled by a learned scalar (initialised to 1): with H = 1 this
        is h + alpha·MoE(h), the variant of *Equifinality in MoE* that matches multi-hop quality.
    hop_norm: a learnable RMSNorm (weight initialised to 1, eps ``HOP_NORM_EPS``) on the input of
        every hop i >= 1: h_{i+1} = h_i + MoE_i(RMSNorm_i(h_i)) (router, routed and shared experts
        all see the normalised state; the residual adds to the raw h_i). Hop 0 keeps its input
        as given (in the LM it is already the block's pre-FFN RMSNorm). ``"none"`` (default): no
        norm, the plain recursion; ``"shared"``: one norm for all hops >= 1; ``"per_hop"``: H - 1
        separate norms (iteration-conditioned, as in LoopMoE). No effect with H = 1.
    halt_threshold: relative-norm halting, tau (0 = off), applied in eval mode only (zero-shot):
        after hop i a token stops once ||dh_i|| / ||h_i|| < tau, dh_i the hop's update (with
        ``hop_norm``, MoE_i(RMSNorm_i(h_i))) and h_i the raw state it is added to; later hops
        dispatch only the tokens still active. Not available with sequence-aware routers (a halted subset is no
        longer whole sequences).
    layers: where a model places this layer (the LM reads it; a standalone MoE ignores it):
        ``"all"``, ``"every_other"`` (1, 3, 5, ...: the first layer stays dense, as in
        GShard/Switch), or a tuple of layer indices.
    """

    num_experts: int = 8
    top_k: int = 2
    d_ff: int | None = None
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    activation: str = "swiglu"
    capacity_factor: float | None = None
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_gate: bool = False
    dispatch: str = "auto"
    hops: int = 1
    hop_routers: bool = False
    hop_scale: bool = False
    hop_norm: str = "none"
    halt_threshold: float = 0.0
    layers: str | tuple[int, ...] = "all"

    def __post_init__(self) -> None:
        check_int("num_experts", self.num_experts)
        check_top_k(self.top_k, self.num_experts)
        if self.d_ff is not None:
            check_int("d_ff", self.d_ff)
        if not isinstance(self.router, str):
            raise ValueError(f"router must be a router name ({', '.join(ROUTERS.names())}); got {self.router!r}")
        router_cls = ROUTERS.get(self.router)  # unknown name -> ValueError listing the known ones
        if not isinstance(self.router_options, dict):
            raise ValueError(f"router_options must be a dict of option name -> value; got {self.router_options!r}")
        object.__setattr__(self, "router_options", dict(self.router_options))
        make_config(router_cls, self.router_options)  # unknown / bad options -> ValueError
        check_activation(self.activation)
        if self.capacity_factor is not None:
            check_positive_number("capacity_factor", self.capacity_factor)
        check_int("num_shared_experts", self.num_shared_experts, minimum=0)
        if self.shared_d_ff is not None:
            check_int("shared_d_ff", self.shared_d_ff)
        if not isinstance(self.dispatch, str):
            raise ValueError(f"dispatch must be an executor name; got {self.dispatch!r}")
        EXECUTORS.get(self.dispatch)
        check_int("hops", self.hops)
        for name in ("hop_routers", "hop_scale", "shared_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if not isinstance(self.hop_norm, str) or self.hop_norm not in HOP_NORMS:
            raise ValueError(f"hop_norm must be one of {', '.join(map(repr, HOP_NORMS))}; got {self.hop_norm!r}")
        check_halt_threshold(self.halt_threshold)
        if self.halt_threshold > 0 and router_cls.sequence_aware:
            raise ValueError(
                f"halt_threshold: the {self.router} router looks across whole sequences, which halting breaks up; "
                "use halt_threshold=0 with it"
            )
        object.__setattr__(self, "layers", check_layer_selection(self.layers, "use moe=None for a dense model"))

    def expert_d_ff(self, dense_d_ff: int) -> int:
        """The hidden size of one expert, given the dense FFN hidden size it replaces."""
        return self.d_ff if self.d_ff is not None else dense_d_ff // self.top_k

    def layer_indices(self, n_layers: int) -> tuple[int, ...]:
        """Sorted indices of the layers of an ``n_layers`` model that get this MoE."""
        return selected_layers(self.layers, n_layers)

def known_fields(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """``d`` as keyword arguments of dataclass ``cls``; a key that is not a field raises ValueError
    naming it and the allowed ones."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} needs a dict of field -> value; got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} field(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    return dict(d)
