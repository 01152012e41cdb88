"""Token → expert routing: routers, stacked experts, dropless grouped dispatch, the MoE layer."""

from sparseroute.moe.dispatch import EXECUTORS, grouped_dispatch, loop_dispatch, sort_by_expert
from sparseroute.moe.experts import Experts, SharedExpert
from sparseroute.moe.config import MoEConfig
from sparseroute.moe.layer import MoE, after_optimizer_step
from sparseroute.moe.losses import load_balance_loss, z_loss
from sparseroute.moe.reference import reference_dispatch
from sparseroute.moe.routers import ROUTERS, Router, RouterConfig, build_router, register_router

__all__ = [
    "EXECUTORS",
    "Experts",
    "MoE",
    "MoEConfig",
    "ROUTERS",
    "Router",
    "RouterConfig",
    "SharedExpert",
    "after_optimizer_step",
    "build_router",
    "grouped_dispatch",
    "load_balance_loss",
    "loop_dispatch",
    "reference_dispatch",
    "register_router",
    "sort_by_expert",
    "z_loss",
]


def __getattr__(name):  # lazy: the adapter sits in a higher layer (and transformers is optional)
    if name in ("from_hf", "to_hf"):
        from sparseroute.integrations import hf

        return getattr(hf, name)
    raise AttributeError(name)
