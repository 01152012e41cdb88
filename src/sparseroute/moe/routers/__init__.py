"""Token → expert routers, one file per mechanism, all registered by name in ``ROUTERS``."""

from sparseroute.moe.routers import (  # noqa: F401  (imports register the routers)
    cosine,
    expert_choice,
    hash,
    kmeans,
    oracle,
    random_fixed,
    relu,
    sigmoid,
    similarity,
    sinkhorn,
    topk,
)
from sparseroute.moe.routers.base import ROUTERS, Router, RouterConfig, build_router, register_router

__all__ = ["ROUTERS", "Router", "RouterConfig", "build_router", "register_router"]
