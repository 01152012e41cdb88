"""Attention routers, one file per mechanism, all registered by name in ``ATTENTION_ROUTERS``.

Every module of this package is imported here (importing a router's module registers it), so a
new router is one new file.
"""

import importlib
import pkgutil

from sparseroute.attention.routers.base import (
    ATTENTION_ROUTERS,
    AttentionRouter,
    AttentionRouterOptions,
    build_attention_router,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ATTENTION_ROUTERS", "AttentionRouter", "AttentionRouterOptions", "build_attention_router"]
