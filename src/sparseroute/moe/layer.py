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


def check_halt_threshold(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"halt_threshold must be a number >= 0 (0 = no halting); got {value!r}")


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
    dispatch: executor name: "auto" (grouped on CUDA; on the CPU parallel, the compiled kernel,
        or fused where it cannot be built), "grouped", "fused", "parallel", "loop", or
        "reference" (the per-token oracle, for tests).
    hops: H, multi-hop routing through the same experts: h_0 = x, h_{i+1} = h_i + MoE_i(h_i),
        re-routing at every hop; the layer returns h_H - x (H = 1 is the plain layer).
    hop_routers: hop i > 0 has its own router (same type and options) instead of hop 0's.
    hop_scale: each hop's output is scaled by a learned scalar (initialised to 1): with H = 1 this
        is h + alpha·MoE(h), the variant of *Equifinality in MoE* that matches multi-hop quality.
    halt_threshold: relative-norm halting, tau (0 = off), applied in eval mode only (zero-shot):
        after hop i a token stops once ||MoE_i(h_i)|| / ||h_i|| < tau; later hops dispatch only the
        tokens still active. Not available with sequence-aware routers (a halted subset is no
        longer whole sequences).
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
    hops: int = 1
    hop_routers: bool = False
    hop_scale: bool = False
    halt_threshold: float = 0.0

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
        _positive_int("hops", self.hops)
        for name in ("hop_routers", "hop_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        check_halt_threshold(self.halt_threshold)
        if self.halt_threshold > 0 and cls.sequence_aware:
            raise ValueError(
                f"halt_threshold: the {self.router} router looks across whole sequences, which halting breaks up; "
                "use halt_threshold=0 with it"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MoE(nn.Module):
    """Mixture-of-experts FFN. ``forward(x, token_ids=None, *, token_mixing=None) -> (y, Routing)``;
    x is [T, D] or [B, S, D] and y has its shape. ``Routing`` is over the flattened T = B·S tokens.
    ``token_mixing`` ([B, S, S], or [1, T, T] for a [T, D] input) goes to routers that use it
    (e.g. ``similarity`` with features="attention"); see :attr:`needs_token_mixing`."""

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
        self.hop_routers = nn.ModuleList(
            router_cls(d_model, num_experts, top_k, make_config(router_cls, cfg.router_options))
            for _ in range(cfg.hops - 1 if cfg.hop_routers else 0)
        )
        self.hop_scale = nn.Parameter(torch.ones(cfg.hops)) if cfg.hop_scale else None
        #: relative-norm halting threshold used in eval mode (mutable: see :meth:`set_halting`)
        self.halt_threshold = float(cfg.halt_threshold)

    def set_halting(self, threshold: float) -> None:
        """Change the eval-mode halting threshold of a built (e.g. trained) layer; 0 turns it off."""
        check_halt_threshold(threshold)
        if threshold > 0 and self.router.sequence_aware:
            raise ValueError(f"halt_threshold: not available with the sequence-aware {self.config.router} router")
        self.halt_threshold = float(threshold)

    @property
    def needs_token_mixing(self) -> bool:
        """Whether the router, as configured, needs ``token_mixing`` (e.g. attention weights)."""
        return self.router.uses_token_mixing and self.router.needs_token_mixing

    def router_for_hop(self, hop: int) -> Router:
        return self.router if hop == 0 or not len(self.hop_routers) else self.hop_routers[hop - 1]

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

    def route(
        self,
        x_TD: Tensor,
        token_ids_T: Tensor | None = None,
        seq_len: int | None = None,
        hop: int = 0,
        *,
        token_mixing: Tensor | None = None,
    ) -> Routing:
        """Router decision (of hop ``hop``) plus the capacity drop, if configured."""
        routing = self.router_for_hop(hop)(x_TD, token_ids_T, seq_len=seq_len, token_mixing=token_mixing)
        if self.config.capacity_factor is not None:
            cap = capacity_for(self.config.capacity_factor, x_TD.shape[0], self.router.top_k, self.config.num_experts)
            routing = apply_capacity(routing, cap)
        return routing

    def forward(
        self,
        x: Tensor,
        token_ids: Tensor | None = None,
        *,
        dispatch: str | None = None,
        token_mixing: Tensor | None = None,
    ) -> tuple[Tensor, Routing]:
        self._check_input(x, token_ids)
        executor = EXECUTORS.get(dispatch or self.config.dispatch)
        x_TD = x.reshape(-1, x.shape[-1])
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        seq_len = x.shape[1] if x.dim() == 3 and x.shape[1] > 0 else None
        if self.config.hops == 1:
            routing = self.route(x_TD, ids_T, seq_len, token_mixing=token_mixing)
            y_TD = self._hop_output(x_TD, routing, executor, 0)
            return y_TD.reshape(x.shape), routing
        y_TD, routing = self._multi_hop(x_TD, ids_T, seq_len, executor, token_mixing)
        return y_TD.reshape(x.shape), routing

    def _hop_output(self, x_TD: Tensor, routing: Routing, executor, hop: int) -> Tensor:
        y_TD = executor(x_TD, routing, self.experts)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        if self.hop_scale is not None:
            y_TD = y_TD * self.hop_scale[hop].to(y_TD.dtype)
        return y_TD

    def _multi_hop(
        self, x_TD: Tensor, ids_T: Tensor | None, seq_len: int | None, executor, token_mixing: Tensor | None = None
    ) -> tuple[Tensor, Routing]:
        """h_{i+1} = h_i + MoE_i(h_i) over H hops, halting tokens in eval mode. Returns h_H - x and
        hop 0's Routing with the losses summed over hops and the statistics of all hops.
        ``token_mixing`` (like ``seq_len``) goes to every hop's routing while no token has halted
        (it describes whole sequences); once halting has removed tokens, later hops get None."""
        T = x_TD.shape[0]
        halting = self.halt_threshold > 0 and not self.training
        h_TD = x_TD
        y_TD = torch.zeros_like(x_TD)  # the sum of the hop updates (= h_H - x, without cancellation)
        active_A: Tensor | None = None  # indices of the tokens still hopping (None: all)
        first: Routing | None = None
        losses: dict[str, Tensor] = {}
        load_E = torch.zeros(self.config.num_experts, dtype=torch.long, device=x_TD.device)
        pairs = torch.zeros((), dtype=torch.long, device=x_TD.device)
        hops_T = torch.zeros(T, device=x_TD.device)
        delta0_TD: Tensor | None = None
        hop_cos: Tensor | None = None
        ratio0_T: Tensor | None = None
        for hop in range(self.config.hops):
            if active_A is None:
                h_AD, ids_A, sl, mix_A = h_TD, ids_T, seq_len, token_mixing
            else:
                if active_A.numel() == 0:
                    break
                h_AD, ids_A, sl, mix_A = h_TD[active_A], None if ids_T is None else ids_T[active_A], None, None
            routing = self.route(h_AD, ids_A, sl, hop=hop, token_mixing=mix_A)
            if first is None:
                first = routing
            for name, value in routing.losses.items():
                losses[name] = losses[name] + value if name in losses else value
            load_E = load_E + routing.stats["tokens_per_expert"].to(load_E.device)
            pairs = pairs + (routing.indices >= 0).sum()
            d_AD = self._hop_output(h_AD, routing, executor, hop)
            if active_A is None:
                y_TD = d_AD if hop == 0 else y_TD + d_AD
                h_TD = h_TD + d_AD
                hops_T = hops_T + 1
            else:
                y_TD = y_TD.index_add(0, active_A, d_AD)
                h_TD = h_TD.index_add(0, active_A, d_AD)
                hops_T = hops_T.index_add(0, active_A, torch.ones(active_A.numel(), device=x_TD.device))
            with torch.no_grad():
                if hop == 0:
                    delta0_TD = d_AD.detach()
                elif hop == 1:
                    d0 = delta0_TD if active_A is None else delta0_TD[active_A]
                    cos = torch.nn.functional.cosine_similarity(d0.float(), d_AD.detach().float(), dim=-1)
                    hop_cos = cos.mean() if cos.numel() else torch.zeros((), device=x_TD.device)
            halt_here = halting and hop < self.config.hops - 1
            if halt_here or (hop == 0 and not self.training):
                with torch.no_grad():  # the relative update norm ||MoE_i(h_i)|| / ||h_i|| that halting compares with tau
                    ratio_A = d_AD.detach().float().norm(dim=-1) / h_AD.detach().float().norm(dim=-1).clamp_min(1e-12)
                if hop == 0:
                    ratio0_T = ratio_A
            if halt_here:
                with torch.no_grad():
                    keep_A = ratio_A >= self.halt_threshold
                    # while no token has halted, later hops still see whole sequences
                    if active_A is not None or not bool(keep_A.all()):
                        all_A = torch.arange(T, device=x_TD.device) if active_A is None else active_A
                        active_A = all_A[keep_A]
        assert first is not None
        stats = dict(first.stats)
        stats["tokens_per_expert"] = load_E
        stats["active_per_token"] = pairs.float() / max(T, 1)
        stats["hops_per_token"] = hops_T.mean() if T else torch.zeros(())
        stats["halted_fraction"] = (hops_T < self.config.hops).float().mean() if T else torch.zeros(())
        if hop_cos is not None:
            stats["hop_cos"] = hop_cos
        if ratio0_T is not None:  # eval mode: per token ||MoE_0(h_0)|| / ||h_0|| (a [T] vector)
            stats["update_ratio"] = ratio0_T
        routing = Routing(indices=first.indices, weights=first.weights, num_experts=first.num_experts,
                          losses=losses, stats=stats)
        return y_TD, routing

    def after_optimizer_step(self) -> None:
        self.router.after_optimizer_step()


def after_optimizer_step(model: nn.Module) -> None:
    """Call every router's post-step hook (loss-free bias updates, EMA state) in ``model``."""
    for m in model.modules():
        if isinstance(m, Router):
            m.after_optimizer_step()
