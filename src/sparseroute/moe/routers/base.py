"""Router base class, shared config and the router registry.

Legend: T tokens, D model dim, E experts, K slots per token, N sequences, S sequence length.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparseroute.kernels import ops
from sparseroute.moe.losses import load_balance_loss, z_loss
from sparseroute.registry import Registry
from sparseroute.routing import Routing, routing_stats

ROUTERS: Registry[type["Router"]] = Registry("router")


def check_top_k(top_k: Any, num_experts: int) -> None:
    """k experts per token: an int in [1, num_experts]."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}]; got {top_k!r}")


def _check_nonneg(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (value >= 0):
            raise ValueError(f"{name} must be >= 0; got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Options every router accepts.

    load_balance_coef: weight of the Switch load-balancing loss (routers with a probability
        distribution over experts only).
    z_loss_coef: weight of the ST-MoE router z-loss (routers with logits only).
    """

    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        _check_nonneg(self, "load_balance_coef", "z_loss_coef")


class Router(nn.Module, metaclass=abc.ABCMeta):
    """Decides which experts each token uses. ``forward(x_TD, token_ids_T=None) -> Routing``.

    Subclasses set ``Config`` (a frozen dataclass derived from :class:`RouterConfig`) and
    implement :meth:`route`. Stateful routers keep their state in buffers.
    """

    Config: ClassVar[type[RouterConfig]] = RouterConfig
    #: the router needs token ids (e.g. hash routing)
    needs_token_ids: ClassVar[bool] = False
    #: the number of experts per token varies (slots hold -1 where unused)
    variable_k: ClassVar[bool] = False
    #: the router looks across the tokens of a sequence (its ``route`` takes ``seq_len``: the
    #: flattened T tokens are T / seq_len sequences of seq_len consecutive tokens)
    sequence_aware: ClassVar[bool] = False
    #: buffers that keep their dtype when the module is cast (``.to(bf16)``, ``.half()``); only
    #: their device follows. For state whose small updates a low-precision dtype would lose.
    pinned_buffers: ClassVar[tuple[str, ...]] = ()
    #: the router can mix tokens with given weights (its ``route`` takes a ``token_mixing``
    #: keyword: an [N, S, S] row-stochastic causal matrix, e.g. the preceding attention layer's
    #: head-averaged weights, or None). Other routers never see ``token_mixing``.
    uses_token_mixing: ClassVar[bool] = False

    def __init__(self, d_model: int, num_experts: int, top_k: int, config: RouterConfig | None = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        check_top_k(top_k, num_experts)
        config = config if config is not None else self.Config()
        if not isinstance(config, self.Config):
            raise ValueError(f"{type(self).__name__} needs a {self.Config.__name__}; got {type(config).__name__}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.config = config

    def _apply(self, fn, recurse=True):
        state = {n: self._buffers[n] for n in self.pinned_buffers if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, old in state.items():
            new = self._buffers[n]
            if new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(device=new.device)
        return self

    @property
    def needs_token_mixing(self) -> bool:
        """Whether this router, as configured, needs ``token_mixing`` (a model that has it, e.g. the
        LM's attention weights, computes and passes it only then). False unless a router says so."""
        return False

    # -- the interface -------------------------------------------------------------------
    def forward(
        self,
        x_TD: Tensor,
        token_ids_T: Tensor | None = None,
        *,
        seq_len: int | None = None,
        token_mixing: Tensor | None = None,
    ) -> Routing:
        """``seq_len``: the T tokens are T / seq_len sequences of consecutive tokens (None: one
        sequence). Only sequence-aware routers use it. ``token_mixing``: optional [N, S, S]
        (N = T / S sequences of S = seq_len tokens) row-stochastic, causal weights, such as the
        preceding attention layer's head-averaged attention probabilities; its shape is checked,
        and it reaches only routers with ``uses_token_mixing`` (the others ignore it)."""
        if x_TD.dim() != 2 or x_TD.shape[1] != self.d_model:
            raise ValueError(f"router input must be [T, {self.d_model}]; got {tuple(x_TD.shape)}")
        T = x_TD.shape[0]
        if seq_len is not None and (
            not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1 or T % seq_len
        ):
            raise ValueError(f"seq_len must be a positive int that divides the {T} tokens; got {seq_len!r}")
        if self.needs_token_ids:
            if token_ids_T is None:
                raise ValueError(
                    f"token_ids: the {type(self).__name__} routes by token id; pass token_ids to forward"
                )
            if token_ids_T.shape != x_TD.shape[:1] or token_ids_T.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"token_ids must be an integer tensor with one id per token ({x_TD.shape[0]}); "
                    f"got {tuple(token_ids_T.shape)} {token_ids_T.dtype}"
                )
        S = seq_len if seq_len is not None else max(T, 1)
        if token_mixing is not None:
            _check_token_mixing(token_mixing, T, S)
        extra = {"token_mixing": token_mixing} if self.uses_token_mixing else {}
        if self.sequence_aware:
            return self.route(x_TD, token_ids_T, seq_len=S, **extra)
        return self.route(x_TD, token_ids_T, **extra)

    @abc.abstractmethod
    def route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        """Decide; ``x_TD`` is already validated."""

    def after_optimizer_step(self) -> None:
        """Hook the training loop calls after each optimizer step (loss-free balancing)."""

    def expert_directions(self) -> Tensor | None:
        """[E, D] float32, detached: per expert, the direction in model space along which its
        routing score grows (a linear router's rows; for centroid routers the centroid in model
        space), or None for a router without one (hash, the oracles). Diagnostics compare these
        with the experts' own weights."""
        return None

    def routing_parameters(self) -> int:
        """Number of parameters that decide the routing (trainable or not)."""
        return sum(p.numel() for p in self.parameters())

    def linear_router_parameters(self) -> int:
        """What a linear router (D·E) would use, for comparison."""
        return self.d_model * self.num_experts

    @classmethod
    def flops_per_token(cls, config: RouterConfig, d_model: int, num_experts: int, seq_len: int) -> float:
        """Forward matmul FLOPs of one routing decision for one token (2 per multiply-add) in
        sequences of ``seq_len`` tokens (what sequence-aware routers look across). The default is
        a linear router's logits, 2·D·E."""
        return 2.0 * d_model * num_experts

    @classmethod
    def attention_flops_per_token(cls, config: RouterConfig, d_model: int, seq_len: int) -> float:
        """Extra forward FLOPs per token that the preceding attention layer spends for this router
        (e.g. materialising its probabilities); charged once per MoE layer. Default 0."""
        return 0.0

    # -- helpers for subclasses ----------------------------------------------------------
    def finish(
        self,
        idx_TK: Tensor,
        w_TK: Tensor,
        *,
        logits_TE: Tensor | None = None,
        probs_TE: Tensor | None = None,
        extra_stats: dict[str, Tensor] | None = None,
        extra_losses: dict[str, Tensor] | None = None,
    ) -> Routing:
        """Build the Routing with the configured auxiliary losses and the shared statistics."""
        losses: dict[str, Tensor] = {}
        cfg = self.config
        if probs_TE is not None and cfg.load_balance_coef > 0:
            losses["load_balance"] = cfg.load_balance_coef * load_balance_loss(probs_TE, idx_TK, self.num_experts)
        if logits_TE is not None and cfg.z_loss_coef > 0:
            losses["z"] = cfg.z_loss_coef * z_loss(logits_TE)
        if extra_losses:
            losses.update(extra_losses)
        stats = routing_stats(
            idx_TK, self.num_experts, probs_TE=None if probs_TE is None else probs_TE.detach(), weights_TK=w_TK.detach()
        )
        if extra_stats:
            stats.update(extra_stats)
        return Routing(indices=idx_TK, weights=w_TK, num_experts=self.num_experts, losses=losses, stats=stats)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, config={self.config}"


def _check_token_mixing(token_mixing: Any, T: int, S: int) -> None:
    """``token_mixing`` must be a floating-point [N, S, S] for T tokens in sequences of S."""
    N = T // S
    if not isinstance(token_mixing, Tensor) or not token_mixing.is_floating_point():
        what = f"dtype {token_mixing.dtype}" if isinstance(token_mixing, Tensor) else type(token_mixing).__name__
        raise ValueError(f"token_mixing must be a floating-point [N, S, S] tensor; got {what}")
    if tuple(token_mixing.shape) != (N, S, S):
        raise ValueError(
            f"token_mixing must be [N, S, S] = [{N}, {S}, {S}] for {T} tokens in sequences of {S} "
            f"(seq_len={S}); got shape {tuple(token_mixing.shape)}"
        )


def expert_softmax(logits_TE: Tensor) -> Tensor:
    """softmax over the expert dimension of [T, E] logits.

    On CPU with fewer than 16 experts, ATen's softmax along a short last dimension runs a scalar
    loop, slower than the same softmax taken along dim 0 of the transposed copy (which runs
    vectorised across tokens), so that form is used there; the result is then a transposed
    (non-contiguous) [T, E] view. The values agree up to rounding."""
    if logits_TE.dim() == 2 and logits_TE.shape[-1] < 16 and logits_TE.device.type == "cpu":
        return logits_TE.t().contiguous().softmax(dim=0).t()
    return logits_TE.softmax(dim=-1)


def topk_of(scores_TE: Tensor, k: int, renormalize: bool, weights_from: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k experts per token by ``scores_TE``; weights gathered from ``weights_from`` (default: the
    scores), optionally renormalised to sum to 1 per token."""
    _, idx_TK = torch.topk(scores_TE, k, dim=-1)
    src = scores_TE if weights_from is None else weights_from
    w_TK = src.gather(1, idx_TK)
    if renormalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return idx_TK, w_TK


def _softmax_topk_kernels(logits_TE: Tensor) -> bool:
    """Whether the compiled softmax top-k applies to these logits: a float32/float64 [T, E] CPU
    tensor, and the kernels built."""
    return (
        logits_TE.dim() == 2
        and logits_TE.device.type == "cpu"
        and logits_TE.dtype in (torch.float32, torch.float64)
        and ops.available()
    )


def softmax_topk(logits_TE: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(probs_TE, idx_TK, w_TK): :func:`expert_softmax` of the logits, then :func:`topk_of` of the
    probabilities. On the CPU this runs as one compiled pass per token, forward and backward
    (``torch.ops.sparseroute.softmax_topk``, in place of about ten ATen ops each way); elsewhere,
    or without the compiled kernels, as those ops. Equal probabilities go to the lower expert
    index on the compiled path; torch.topk leaves their order unspecified."""
    if _softmax_topk_kernels(logits_TE):
        return ops.softmax_topk(logits_TE, k, renormalize)
    probs_TE = expert_softmax(logits_TE)
    idx_TK, w_TK = topk_of(probs_TE, k, renormalize)
    return probs_TE, idx_TK, w_TK


def make_config(cls: type[Router], options: dict[str, Any]) -> RouterConfig:
    """Build ``cls.Config`` from keyword options; unknown names raise ValueError listing the allowed."""
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for router {getattr(cls, 'registry_name', cls.__name__)!r}; "
            f"allowed: {', '.join(sorted(fields)) or '(none)'}"
        )
    return cls.Config(**options)


def build_router(name: str, d_model: int, num_experts: int, top_k: int, **options: Any) -> Router:
    """Instantiate a registered router by name with its options."""
    cls = ROUTERS.get(name)
    return cls(d_model, num_experts, top_k, make_config(cls, options))


def register_router(name: str):
    """Class decorator: register a Router subclass under ``name``."""

    def deco(cls: type[Router]) -> type[Router]:
        cls.registry_name = name  # type: ignore[attr-defined]
        return ROUTERS.register(name)(cls)

    return deco
