"""Configuration of the decoder LM: :class:`LMConfig`, its MoE part :class:`MoESettings`, named
presets and the one-dial :func:`sized` family.

Parameter counts quoted below are exact (``sum(p.numel())`` over unique parameters, the tied
embedding counted once) and are checked by ``tests/models/test_lm_config.py``. "MoE variant" means
``moe=MoESettings()``: 8 experts, top-2, softmax top-k router, expert hidden ``d_ff // 2`` (so a
token's active expert parameters equal the dense FFN's), MoE in every layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from sparseroute.moe.experts import check_activation
from sparseroute.moe.layer import check_halt_threshold
from sparseroute.moe.routers import ROUTERS
from sparseroute.moe.routers.base import make_config

__all__ = ["MoESettings", "LMConfig", "PRESETS", "preset", "sized"]

_LAYER_PATTERNS = ("all", "every_other")


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


@dataclass(frozen=True, kw_only=True)
class MoESettings:
    """The mixture-of-experts part of an :class:`LMConfig`.

    num_experts, top_k: E experts per MoE layer, k chosen per token (variable-k routers such as
        ``relu`` and ``expert_choice`` use k only as their nominal budget).
    d_ff: hidden size of each expert; ``None`` means the dense ``d_ff // top_k``, so a token's
        active expert parameters equal those of the dense FFN it replaces.
    router, router_options: a name registered in ``sparseroute.moe.ROUTERS`` and the options of
        its config (validated here). ``hash`` routes by token id; the LM passes them.
    layers: which layers get an MoE FFN: ``"all"``, ``"every_other"`` (1, 3, 5, ...: the first
        layer stays dense, as in GShard/Switch), or an explicit tuple of layer indices.
    capacity_factor: ``None`` for dropless; else each expert takes at most
        ``ceil(capacity_factor * T * k / E)`` (token, slot) pairs.
    num_shared_experts: dense experts every token also uses (hidden ``num_shared_experts * d_ff``).
    activation: expert activation (swiglu, gelu, silu, relu).
    hops, hop_routers, hop_scale, halt_threshold: multi-hop routing through the same experts, a
        router per hop, learned per-hop output scalars, eval-mode relative-norm halting (see
        :class:`sparseroute.moe.MoEConfig`).
    """

    num_experts: int = 8
    top_k: int = 2
    d_ff: int | None = None
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    layers: str | tuple[int, ...] = "all"
    capacity_factor: float | None = None
    num_shared_experts: int = 0
    activation: str = "swiglu"
    hops: int = 1
    hop_routers: bool = False
    hop_scale: bool = False
    halt_threshold: float = 0.0

    def __post_init__(self) -> None:
        _check_int("num_experts", self.num_experts)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={self.num_experts}]; got {self.top_k!r}")
        if self.d_ff is not None:
            _check_int("d_ff", self.d_ff)
        if not isinstance(self.router, str):
            raise ValueError(f"router must be a router name ({', '.join(ROUTERS.names())}); got {self.router!r}")
        router_cls = ROUTERS.get(self.router)  # unknown name -> ValueError listing the known ones
        if not isinstance(self.router_options, dict):
            raise ValueError(f"router_options must be a dict of option name -> value; got {self.router_options!r}")
        object.__setattr__(self, "router_options", dict(self.router_options))
        make_config(router_cls, self.router_options)  # unknown / bad options -> ValueError
        layers = self.layers
        if isinstance(layers, list):
            layers = tuple(layers)
            object.__setattr__(self, "layers", layers)
        if isinstance(layers, str):
            if layers not in _LAYER_PATTERNS:
                raise ValueError(
                    f"layers must be 'all', 'every_other' or a tuple of layer indices; got {layers!r}"
                )
        elif isinstance(layers, tuple):
            if not layers:
                raise ValueError("layers: an empty tuple selects no MoE layer; use moe=None for a dense model")
            for i in layers:
                if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                    raise ValueError(f"layers must hold layer indices (ints >= 0); got {layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers must not repeat an index; got {layers!r}")
        else:
            raise ValueError(f"layers must be 'all', 'every_other' or a tuple of layer indices; got {layers!r}")
        if self.capacity_factor is not None:
            _check_positive_number("capacity_factor", self.capacity_factor)
        _check_int("num_shared_experts", self.num_shared_experts, minimum=0)
        check_activation(self.activation)
        _check_int("hops", self.hops)
        for name in ("hop_routers", "hop_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false; got {getattr(self, name)!r}")
        check_halt_threshold(self.halt_threshold)
        if self.halt_threshold > 0 and router_cls.sequence_aware:
            raise ValueError(f"halt_threshold: not available with the sequence-aware {self.router} router")

    def expert_d_ff(self, dense_d_ff: int) -> int:
        """The hidden size of one expert, given the dense FFN hidden size."""
        return self.d_ff if self.d_ff is not None else dense_d_ff // self.top_k

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.layers, tuple):
            d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoESettings":
        return cls(**_known_fields(cls, d, "MoESettings"))


@dataclass(frozen=True, kw_only=True)
class LMConfig:
    """A decoder-only transformer LM (pre-norm, RMSNorm, RoPE, SwiGLU, causal SDPA).

    vocab_size: V. d_model: D. n_layers: L. n_heads: H (head dim D/H, must be even for RoPE).
    d_ff: hidden size of the dense SwiGLU FFN (3 matrices: gate, up, down).
    max_seq_len: the longest input ``forward`` accepts. rope_base: RoPE frequency base.
    tie_embeddings: the output head reuses the input embedding matrix.
    norm_eps: RMSNorm epsilon. init_std: std of the normal init of linear/embedding weights
        (output projections use ``init_std / sqrt(2 * n_layers)``; MoE experts are initialised
        like the dense FFN they replace).
    moe: ``None`` for a dense model, else the FFN of the layers in ``moe.layers`` is an MoE.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    max_seq_len: int = 256
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    moe: MoESettings | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _check_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads must divide d_model={self.d_model}; got n_heads={self.n_heads}"
            )
        head_dim = self.d_model // self.n_heads
        if head_dim % 2:
            raise ValueError(
                f"n_heads: the head dim d_model/n_heads = {self.d_model}/{self.n_heads} = {head_dim} "
                "must be even for RoPE; choose n_heads so that it is"
            )
        _check_positive_number("rope_base", self.rope_base)
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be True or False; got {self.tie_embeddings!r}")
        _check_positive_number("norm_eps", self.norm_eps)
        _check_positive_number("init_std", self.init_std)
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoESettings.from_dict(self.moe))
        if self.moe is not None:
            if not isinstance(self.moe, MoESettings):
                raise ValueError(f"moe must be None (dense) or a MoESettings; got {type(self.moe).__name__}")
            layers = self.moe.layers
            if isinstance(layers, tuple):
                bad = [i for i in layers if i >= self.n_layers]
                if bad:
                    raise ValueError(
                        f"moe.layers: indices {bad} are out of range for n_layers={self.n_layers} "
                        f"(allowed 0..{self.n_layers - 1})"
                    )
            elif not self.moe_layer_indices():
                raise ValueError(
                    f"moe.layers={layers!r} selects no layer when n_layers={self.n_layers}; "
                    "use moe=None for a dense model or list the layers explicitly"
                )
            if self.moe.expert_d_ff(self.d_ff) < 1:
                raise ValueError(
                    f"moe.d_ff: the default expert hidden d_ff // top_k = {self.d_ff} // {self.moe.top_k} is 0; "
                    "set moe.d_ff explicitly"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def moe_layer_indices(self) -> tuple[int, ...]:
        """Sorted indices of the layers whose FFN is an MoE (empty for a dense model)."""
        if self.moe is None:
            return ()
        layers = self.moe.layers
        if layers == "all":
            return tuple(range(self.n_layers))
        if layers == "every_other":
            return tuple(range(1, self.n_layers, 2))
        return tuple(sorted(layers))

    def replace(self, **changes: Any) -> "LMConfig":
        """A copy with some fields changed; an unknown field raises ValueError naming it."""
        return dataclasses.replace(self, **_known_fields(type(self), changes, "LMConfig"))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (nested ``moe`` as a dict, tuples as lists)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["moe"] = None if self.moe is None else self.moe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        kw = _known_fields(cls, d, "LMConfig")
        if isinstance(kw.get("moe"), dict):
            kw["moe"] = MoESettings.from_dict(kw["moe"])
        return cls(**kw)


def _known_fields(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{what} needs a dict of field -> value; got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} field(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    return dict(d)


# -- presets -------------------------------------------------------------------------------------


def _tiny() -> LMConfig:
    """Byte-level CPU model: V=256, D=256, L=4, H=4 (head 64), d_ff=1024, S<=256.

    Dense 4,262,144 parameters; MoE variant (8 experts x d_ff 512, top-2) 13,707,520 total with
    4,270,336 active per token. Equal to ``sized(4)``.
    """
    return LMConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=256)


def _small() -> LMConfig:
    """Byte-level, ~19M: V=256, D=384, L=8, H=6 (head 64), d_ff=1536 (4D), S<=512.

    Dense 18,979,200 parameters; MoE variant (8 experts x d_ff 768, top-2) 61,471,104 total with
    19,003,776 active per token. The ``paper`` body with a byte vocabulary.
    """
    return LMConfig(vocab_size=256, d_model=384, n_layers=8, n_heads=6, d_ff=1536, max_seq_len=512)


def _paper() -> LMConfig:
    """Sized like *Equifinality in Mixture of Experts* (76-84M total, WikiText-103/OpenWebText):
    GPT-2 BPE vocabulary V=50257, D=384, L=8, H=6 (head 64), dense d_ff=1536 (4D), S<=512,
    tied embeddings; MoE in every layer, 8 experts x d_ff 768, top-2 (``moe=MoESettings()``).

    MoE (the preset): 80,671,488 parameters total (topk router; 80,847,624 with the cosine router,
    d_space 64), 38,204,160 active per token. Dense (``moe=None``): 38,179,584. Only the size,
    vocabulary and sequence length follow the paper; the exact architecture is our choice.
    """
    return LMConfig(
        vocab_size=50257, d_model=384, n_layers=8, n_heads=6, d_ff=1536, max_seq_len=512, moe=MoESettings()
    )


_PRESET_FNS: dict[str, Callable[[], LMConfig]] = {"tiny": _tiny, "small": _small, "paper": _paper}

#: preset name -> one-line description
PRESETS: dict[str, str] = {
    "tiny": "byte LM, D=256 L=4 H=4 d_ff=1024 S<=256: 4.26M dense / 13.71M with 8x top-2 MoE (CPU runs)",
    "small": "byte LM, D=384 L=8 H=6 d_ff=1536 S<=512: 18.98M dense / 61.47M with 8x top-2 MoE",
    "paper": "Equifinality-sized MoE LM, V=50257 D=384 L=8 H=6, 8 experts x 768 top-2 every layer, "
    "S<=512: 80.67M total (38.18M dense with moe=None)",
}


def preset(name: str, **overrides: Any) -> LMConfig:
    """A named configuration (see :data:`PRESETS`) with optional field overrides, e.g.
    ``preset("tiny", moe=MoESettings(router="cosine"))``. ``tiny`` and ``small`` are dense by
    default; ``paper`` is the MoE model (pass ``moe=None`` for its dense twin). A dict passed as
    ``moe`` is read as MoESettings fields. Unknown names or fields raise ValueError."""
    if name not in _PRESET_FNS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(_PRESET_FNS)}")
    return _PRESET_FNS[name]().replace(**overrides)


def sized(depth: int, **overrides: Any) -> LMConfig:
    """The one-dial model family (nanochat's ``--depth``): ``d_model = 64 * depth``,
    ``n_layers = depth``, ``n_heads = depth`` (head dim always 64, so every depth is valid),
    ``d_ff = 4 * d_model``; vocab 256, ``max_seq_len`` 256 unless overridden. Non-embedding
    parameters grow as ~12 * 64^2 * depth^3 (depth 4: 4.2M, 6: 14.2M, 8: 33.6M, 12: 113M).
    ``sized(4)`` equals the ``tiny`` preset."""
    _check_int("depth", depth)
    d_model = 64 * depth
    base = LMConfig(
        vocab_size=256, d_model=d_model, n_layers=depth, n_heads=depth, d_ff=4 * d_model, max_seq_len=256
    )
    return base.replace(**overrides)
