"""The MoE layer: router -> Routing -> (capacity drop) -> executor, plus shared experts; its
configuration is :class:`sparseroute.moe.config.MoEConfig`.

Legend: B batch, S sequence, T tokens (B·S), D model dim, E experts, K slots, F expert hidden.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import sparseroute.moe.reference  # noqa: F401  (registers the "reference" executor)
from sparseroute.moe.config import HOP_NORM_EPS, MoEConfig, check_halt_threshold, check_int
from sparseroute.moe.dispatch import EXECUTORS
from sparseroute.moe.experts import Experts, SharedExpert
from sparseroute.moe.routers import ROUTERS, Router
from sparseroute.moe.routers.base import make_config
from sparseroute.routing import Routing, apply_capacity, capacity_for


class MoE(nn.Module):
    """Mixture-of-experts FFN. ``forward(x, token_ids=None, *, token_mixing=None) -> (y, Routing)``;
    x is [T, D] or [B, S, D] and y has its shape. ``Routing`` is over the flattened T = B·S tokens.
    ``token_mixing`` ([B, S, S], or [1, T, T] for a [T, D] input) goes to routers that use it
    (e.g. ``similarity`` with features="attention"); see :attr:`needs_token_mixing`.

    Built from keywords, ``MoE(512, d_ff=1024, num_experts=8, top_k=2, router="cosine")``, or
    from a :class:`MoEConfig`, ``MoE(512, config=cfg)``; keywords given next to a config change
    those fields of it (``MoE(512, config=cfg, d_ff=256)``). ``self.config`` is the validated
    config, with ``d_ff`` filled in."""

    def __init__(
        self,
        d_model: int,
        d_ff: int | None = None,
        num_experts: int | None = None,
        top_k: int | None = None,
        router: str | None = None,
        router_options: dict[str, Any] | None = None,
        *,
        config: MoEConfig | None = None,
        **options: Any,
    ):
        super().__init__()
        check_int("d_model", d_model)
        if config is not None and not isinstance(config, MoEConfig):
            raise ValueError(f"config must be a MoEConfig; got {type(config).__name__}")
        given = {name: value for name, value in (("d_ff", d_ff), ("num_experts", num_experts), ("top_k", top_k),
                                                 ("router", router), ("router_options", router_options))
                 if value is not None}
        given.update(options)
        cfg = config.replace(**given) if config is not None else MoEConfig(**given)
        if cfg.d_ff is None:
            raise ValueError("d_ff: a MoE layer needs its experts' hidden size; pass d_ff=... (or set it in the config)")
        self.d_model = d_model
        self.config = cfg
        router_cls = ROUTERS.get(cfg.router)
        E, k = cfg.num_experts, cfg.top_k
        self.router: Router = router_cls(d_model, E, k, make_config(router_cls, cfg.router_options))
        self.experts = Experts(E, d_model, cfg.d_ff, cfg.activation)
        self.shared: SharedExpert | None = None
        if cfg.num_shared_experts > 0 or cfg.shared_d_ff is not None:
            shared_ff = cfg.shared_d_ff or max(1, cfg.num_shared_experts) * cfg.d_ff
            self.shared = SharedExpert(d_model, shared_ff, cfg.activation, cfg.shared_gate)
        self.hop_routers = nn.ModuleList(
            router_cls(d_model, E, k, make_config(router_cls, cfg.router_options))
            for _ in range(cfg.hops - 1 if cfg.hop_routers else 0)
        )
        self.hop_scale = nn.Parameter(torch.ones(cfg.hops)) if cfg.hop_scale else None
        #: RMSNorms of the inputs of hops >= 1 (``hop_norm``): none, one shared, or one per hop
        n_norms = 0 if cfg.hops == 1 else {"none": 0, "shared": 1, "per_hop": cfg.hops - 1}[cfg.hop_norm]
        self.hop_norms = nn.ModuleList(nn.RMSNorm(d_model, eps=HOP_NORM_EPS) for _ in range(n_norms))
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

    def hop_input(self, h_TD: Tensor, hop: int) -> Tensor:
        """What hop ``hop`` routes and computes on: ``h`` itself for hop 0 or ``hop_norm="none"``,
        else its RMSNorm (the shared one, or hop ``hop``'s own)."""
        if hop == 0 or not len(self.hop_norms):
            return h_TD
        return self.hop_norms[min(hop, len(self.hop_norms)) - 1](h_TD)

    def _check_input(self, x: Tensor, token_ids: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.dim() not in (2, 3):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [T, D] or [B, S, D]; got {shape}")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: last dimension must be d_model={self.d_model}; got {x.shape[-1]}")
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
        """h_{i+1} = h_i + MoE_i(n_i) over H hops, n_i = :meth:`hop_input` (h_i, or RMSNorm_i(h_i) for
        i >= 1 with ``hop_norm``), halting tokens in eval mode. Returns h_H - x and
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
            n_AD = self.hop_input(h_AD, hop)
            routing = self.route(n_AD, ids_A, sl, hop=hop, token_mixing=mix_A)
            if first is None:
                first = routing
            for name, value in routing.losses.items():
                losses[name] = losses[name] + value if name in losses else value
            load_E = load_E + routing.stats["tokens_per_expert"].to(load_E.device)
            pairs = pairs + (routing.indices >= 0).sum()
            d_AD = self._hop_output(n_AD, routing, executor, hop)
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
                # the relative update norm ||dh_i|| / ||h_i|| that halting compares with tau: the update
                # against the raw state it is added to (not the normalised input n_i of hop_norm)
                with torch.no_grad():
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
