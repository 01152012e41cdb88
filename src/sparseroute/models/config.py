"""Configuration of the decoder LM: :class:`LMConfig` (its MoE layers are configured by
:class:`sparseroute.moe.MoEConfig`, its block-sparse attention layers by
:class:`sparseroute.attention.AttentionConfig`), named presets and the one-dial :func:`sized` family.

Parameter counts quoted below are exact (``sum(p.numel())`` over unique parameters, the tied
embedding counted once) and are checked by ``tests/models/test_lm_config.py``. "MoE variant" means
``moe=MoEConfig()``: 8 experts, top-2, softmax top-k router, expert hidden ``d_ff // 2`` (so a
token's active expert parameters equal the dense FFN's), MoE in every layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparseroute.attention.config import AttentionConfig
from sparseroute.moe.config import MoEConfig, check_int, check_positive_number, known_fields
from sparseroute.moe.routers import ROUTERS
from sparseroute.moe.routers.base import make_config

__all__ = ["LMConfig", "PRESETS", "preset", "sized"]


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
    attention: ``None`` for dense (SDPA) attention everywhere, else the attention of the layers in
        ``attention.layers`` is :class:`sparseroute.attention.SparseAttention` with its router (a
        dict is read as AttentionConfig fields). Left out of :meth:`to_dict` when ``None``, so the
        configs (and sweep fingerprints) of dense-attention models read as before.
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
    moe: MoEConfig | None = None
    init_std: float = 0.02
    attention: AttentionConfig | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            check_int(name, getattr(self, name))
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
        check_positive_number("rope_base", self.rope_base)
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be True or False; got {self.tie_embeddings!r}")
        check_positive_number("norm_eps", self.norm_eps)
        check_positive_number("init_std", self.init_std)
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise ValueError(f"moe must be None (dense) or a MoEConfig; got {type(self.moe).__name__}")
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
        self._check_attention()

    def _check_attention(self) -> None:
        if isinstance(self.attention, dict):
            try:
                object.__setattr__(self, "attention", AttentionConfig.from_dict(self.attention))
            except ValueError as e:  # name the field as a setting: attention.block_size must be ...
                fields = {f.name for f in dataclasses.fields(AttentionConfig)}
                first = str(e).split(" ", 1)[0].rstrip(":=")
                raise ValueError(f"attention.{e}" if first in fields else f"attention: {e}") from None
        if self.attention is None:
            return
        a = self.attention
        if not isinstance(a, AttentionConfig):
            raise ValueError(
                f"attention must be None (dense attention) or an AttentionConfig; got {type(a).__name__}"
            )
        if isinstance(a.layers, tuple):
            bad = [i for i in a.layers if i >= self.n_layers]
            if bad:
                raise ValueError(
                    f"attention.layers: indices {bad} are out of range for n_layers={self.n_layers} "
                    f"(allowed 0..{self.n_layers - 1})"
                )
        elif not self.sparse_attention_layer_indices():
            raise ValueError(
                f"attention.layers={a.layers!r} selects no layer when n_layers={self.n_layers}; "
                "use attention=None for dense attention or list the layers explicitly"
            )
        if a.n_kv_heads is not None and self.n_heads % a.n_kv_heads:
            raise ValueError(
                f"attention.n_kv_heads={a.n_kv_heads} must divide n_heads={self.n_heads}"
            )
        shared = set(self.sparse_attention_layer_indices()) & set(self.moe_layer_indices())
        if shared and self.moe is not None and _moe_needs_attention_probs(self.moe, self.d_model):
            raise ValueError(
                f"moe: the {self.moe.router} router as configured mixes with its layer's attention "
                f"probabilities, which sparse attention does not provide (layers {sorted(shared)} have both); "
                "leave those layers out of attention.layers or moe.layers, or route on other features"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def moe_layer_indices(self) -> tuple[int, ...]:
        """Sorted indices of the layers whose FFN is an MoE (empty for a dense model)."""
        return () if self.moe is None else self.moe.layer_indices(self.n_layers)

    def sparse_attention_layer_indices(self) -> tuple[int, ...]:
        """Sorted indices of the layers whose attention is block-sparse (empty without ``attention``)."""
        return () if self.attention is None else self.attention.layer_indices(self.n_layers)

    def replace(self, **changes: Any) -> "LMConfig":
        """A copy with some fields changed; an unknown field raises ValueError naming it."""
        return dataclasses.replace(self, **known_fields(type(self), changes, "LMConfig"))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (nested ``moe`` and ``attention`` as dicts, tuples as lists;
        ``attention`` only when set)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["moe"] = None if self.moe is None else self.moe.to_dict()
        if self.attention is None:
            del d["attention"]
        else:
            d["attention"] = self.attention.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        kw = known_fields(cls, d, "LMConfig")
        if isinstance(kw.get("moe"), dict):
            kw["moe"] = MoEConfig.from_dict(kw["moe"])
        return cls(**kw)


def _moe_needs_attention_probs(moe: MoEConfig, d_model: int) -> bool:
    """Whether the MoE router, as configured, asks its layer's attention for its probabilities
    (attention-aware routing), decided on a router built on the meta device."""
    cls = ROUTERS.get(moe.router)
    if not cls.uses_token_mixing:
        return False
    with torch.device("meta"):
        router = cls(d_model, moe.num_experts, moe.top_k, make_config(cls, moe.router_options))
    return bool(router.needs_token_mixing)


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
    tied embeddings; MoE in every layer, 8 experts x d_ff 768, top-2 (``moe=MoEConfig()``).

    MoE (the preset): 80,671,488 parameters total (topk router; 80,847,624 with the cosine router,
    d_space 64), 38,204,160 active per token. Dense (``moe=None``): 38,179,584. Only the size,
    vocabulary and sequence length follow the paper; the exact architecture is our choice.
    """
    return LMConfig(
        vocab_size=50257, d_model=384, n_layers=8, n_heads=6, d_ff=1536, max_seq_len=512, moe=MoEConfig()
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
    ``preset("tiny", moe=MoEConfig(router="cosine"))``. ``tiny`` and ``small`` are dense by
    default; ``paper`` is the MoE model (pass ``moe=None`` for its dense twin). A dict passed as
    ``moe`` is read as MoEConfig fields. Unknown names or fields raise ValueError."""
    if name not in _PRESET_FNS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(_PRESET_FNS)}")
    return _PRESET_FNS[name]().replace(**overrides)


def sized(depth: int, **overrides: Any) -> LMConfig:
    """The one-dial model family (nanochat's ``--depth``): ``d_model = 64 * depth``,
    ``n_layers = depth``, ``n_heads = depth`` (head dim always 64, so every depth is valid),
    ``d_ff = 4 * d_model``; vocab 256, ``max_seq_len`` 256 unless overridden. Non-embedding
    parameters grow as ~12 * 64^2 * depth^3 (depth 4: 4.2M, 6: 14.2M, 8: 33.6M, 12: 113M).
    ``sized(4)`` equals the ``tiny`` preset."""
    check_int("depth", depth)
    d_model = 64 * depth
    base = LMConfig(
        vocab_size=256, d_model=d_model, n_layers=depth, n_heads=depth, d_ff=4 * d_model, max_seq_len=256
    )
    return base.replace(**overrides)
