"""The MoE layer: router -> Routing -> (capacity drop) -> executor, plus shared experts.

Legend: B batch, S sequence, T tokens (B·S), D model dim, E experts, K slots, F expert hidden.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import sparseroute.moe.reference  # noqa: F401  (registers the "reference" executor)
from sparseroute.moe.dispatch import EXECUTORS
from sparseroute.moe.experts import Experts, SharedExpert, check_activation
from sparseroute.moe.routers import ROUTERS, Router
from sparseroute.moe.routers.base import make_config
from sparseroute.routing import Routing, apply_capacity, capacity_for


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A mixture-of-experts feed-forward layer.

    router / router_options: a registered router name and the options of its Config.
    activation: expert MLP activation (swiglu, gelu, silu, relu).
    capacity_factor: None for dropless; else each expert takes at most
        ceil(capacity_factor · T · k / E) pairs and the overflow is dropped (reported).
    num_shared_experts / shared_d_ff / shared_gate: dense expert(s) every token uses; their hidden
        size defaults to num_shared_experts · d_ff; shared_gate scales them by sigmoid(w·x).
    dispatch: executor name: "auto" (grouped on CUDA, fused elsewhere), "grouped", "fused",
        "loop", or "reference" (the per-token oracle, for tests).
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    activation: str = "swiglu"
    capacity_factor: float | None = None
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_gate: bool = False
    dispatch: str = "auto"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={self.num_experts}]; got {self.top_k!r}")
        cls = ROUTERS.get(self.router)
        make_config(cls, dict(self.router_options))  # validates the options now
        check_activation(self.activation)
        if self.capacity_factor is not None and not (
            isinstance(self.capacity_factor, (int, float)) and 0 < self.capacity_factor < float("inf")
        ):
            raise ValueError(f"capacity_factor must be None (dropless) or a number > 0; got {self.capacity_factor!r}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0; got {self.num_shared_experts!r}")
        if self.shared_d_ff is not None:
            _positive_int("shared_d_ff", self.shared_d_ff)
        EXECUTORS.get(self.dispatch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MoE(nn.Module):
    """Mixture-of-experts FFN. ``forward(x, token_ids=None) -> (y, Routing)``; x is [T, D] or
    [B, S, D] and y has its shape. ``Routing`` is over the flattened T = B·S tokens."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        router: str = "topk",
        router_options: dict[str, Any] | None = None,
        **options: Any,
    ):
        super().__init__()
        cfg = MoEConfig(
            d_model=d_model,
            d_ff=d_ff,
            num_experts=num_experts,
            top_k=top_k,
            router=router,
            router_options=dict(router_options or {}),
            **options,
        )
        self.config = cfg
        router_cls = ROUTERS.get(cfg.router)
        self.router: Router = router_cls(d_model, num_experts, top_k, make_config(router_cls, cfg.router_options))
        self.experts = Experts(num_experts, d_model, d_ff, cfg.activation)
        self.shared: SharedExpert | None = None
        if cfg.num_shared_experts > 0 or cfg.shared_d_ff is not None:
            shared_ff = cfg.shared_d_ff or max(1, cfg.num_shared_experts) * d_ff
            self.shared = SharedExpert(d_model, shared_ff, cfg.activation, cfg.shared_gate)

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> "MoE":
        d = cfg.to_dict()
        args = [d.pop(k) for k in ("d_model", "d_ff", "num_experts", "top_k", "router", "router_options")]
        return cls(*args, **d)

    def _check_input(self, x: Tensor, token_ids: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.dim() not in (2, 3):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [T, D] or [B, S, D]; got {shape}")
        if x.shape[-1] != self.config.d_model:
            raise ValueError(f"x: last dimension must be d_model={self.config.d_model}; got {x.shape[-1]}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor; got dtype {x.dtype}")
        if x.dtype != self.experts.w_in.dtype:
            raise ValueError(
                f"x has dtype {x.dtype} but the layer's weights are {self.experts.w_in.dtype}; "
                f"cast one to the other (e.g. moe.to({x.dtype}))"
            )
        if token_ids is not None and tuple(token_ids.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"token_ids must have shape {tuple(x.shape[:-1])} (x without its last dim); got {tuple(token_ids.shape)}"
            )

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None = None, seq_len: int | None = None) -> Routing:
        """Router decision plus the capacity drop, if configured."""
        routing = self.router(x_TD, token_ids_T, seq_len=seq_len)
        if self.config.capacity_factor is not None:
            cap = capacity_for(self.config.capacity_factor, x_TD.shape[0], self.router.top_k, self.config.num_experts)
            routing = apply_capacity(routing, cap)
        return routing

    def forward(
        self, x: Tensor, token_ids: Tensor | None = None, *, dispatch: str | None = None
    ) -> tuple[Tensor, Routing]:
        self._check_input(x, token_ids)
        executor = EXECUTORS.get(dispatch or self.config.dispatch)
        x_TD = x.reshape(-1, x.shape[-1])
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        routing = self.route(x_TD, ids_T, x.shape[1] if x.dim() == 3 and x.shape[1] > 0 else None)
        y_TD = executor(x_TD, routing, self.experts)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.reshape(x.shape), routing

    def after_optimizer_step(self) -> None:
        self.router.after_optimizer_step()


def after_optimizer_step(model: nn.Module) -> None:
    """Call every router's post-step hook (loss-free bias updates, EMA state) in ``model``."""
    for m in model.modules():
        if isinstance(m, Router):
            m.after_optimizer_step()
