"""``sparseroute doctor``: what a bug report needs, gathered without side effects (nothing is
built, tuned or downloaded): versions, the CPU and its features, threads, the GEMM backend, the
compiled kernels, where each product of the expert kernel runs at typical shapes and why, and the
CUDA devices."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

from sparseroute import __version__
from sparseroute.kernels import backend, codes, extension, plan
from sparseroute.kernels.cpuinfo import cache_bytes, cpu_features, cpu_model

__all__ = ["report", "render", "SHAPES"]

#: (label, D, F, E, K, activation): the tiny LM's MoE layers and the MoE benchmark's two shapes
SHAPES = (
    ("tiny LM MoE (D 256, E 8, k 2, F 512)", 256, 512, 8, 2, "swiglu"),
    ("coarse (D 512, E 8, k 2, F 1024)", 512, 1024, 8, 2, "swiglu"),
    ("fine-grained (D 512, E 64, k 8, F 128)", 512, 128, 64, 8, "swiglu"),
)
_PACKAGES = ("numpy", "scipy", "safetensors", "transformers", "tokenizers", "ninja", "filelock", "jinja2")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def report() -> dict[str, Any]:
    """Everything ``sparseroute doctor`` prints, as a JSON-serialisable dict."""
    module = extension.load()
    info: dict[str, Any] = {
        "sparseroute": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "cpu": {
            "model": cpu_model(),
            "machine": platform.machine(),
            "cores": os.cpu_count(),
            "features": {k: v for k, v in cpu_features().items()},
            "l2_bytes": cache_bytes(2),
        },
        "threads": torch.get_num_threads(),
        "gemm": {
            "backend": backend.get_backend(),
            "resolved": backend.resolved_backend(),
            "onednn_in_torch": backend.onednn_available(),
            "env": os.environ.get("SPARSEROUTE_GEMM"),
        },
        "kernels": {
            "built": module is not None,
            "folder": str(extension.build_dir()),
            "reason": None if module is not None else extension.unavailable_reason(),
            "disabled": extension.disabled(),
            "onednn_float32": bool(module.onednn_usable()) if module is not None else None,
            "plan_mode": os.environ.get("SPARSEROUTE_KERNEL_PLAN", "tune"),
        },
        "cuda": {
            "available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
            "version": torch.version.cuda,
        },
    }
    products: dict[str, Any] = {}
    if module is not None:
        for label, D, F, E, K, act in SHAPES:
            try:
                p = plan.expert_plan(torch.float32, D, F, E, K, act, torch.get_num_threads(), peek=True)
                products[label] = {"source": p.source, **p.describe()}
            except ValueError as e:  # e.g. a bad $SPARSEROUTE_KERNEL_PLAN
                products[label] = {"error": str(e)}
    info["expert_products"] = products
    return info


def render(info: dict[str, Any]) -> str:
    """The report as text."""
    cpu, gemm, kern = info["cpu"], info["gemm"], info["kernels"]
    features = ", ".join(k for k, v in cpu["features"].items() if v) or "none reported"
    l2 = f"{cpu['l2_bytes'] // 1024} KiB" if cpu["l2_bytes"] else "unknown"
    lines = [
        f"sparseroute {info['sparseroute']}, torch {info['torch']}, Python {info['python']}",
        f"platform: {info['platform']}",
        "packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v),
        f"CPU: {cpu['model']} ({cpu['machine']}, {cpu['cores']} logical cores, L2 {l2} a core)",
        f"CPU features: {features}",
        f"threads: {info['threads']}",
        f"GEMM backend: {gemm['backend']} -> {gemm['resolved']} (oneDNN in this torch: "
        f"{'yes' if gemm['onednn_in_torch'] else 'no'}; $SPARSEROUTE_GEMM={gemm['env'] or 'unset'})",
    ]
    if kern["built"]:
        lines.append(f"compiled kernels: built ({kern['folder']}); oneDNN's float32 matmul runs here: "
                     f"{'yes' if kern['onednn_float32'] else 'no'}")
    else:
        lines.append(f"compiled kernels: not loaded: {kern['reason']}")
    lines.append(f"expert kernel plan mode: {kern['plan_mode']} ($SPARSEROUTE_KERNEL_PLAN)")
    for label, products in info["expert_products"].items():
        lines.append(f"  {label}: {products.get('source', '')}")
        for name in codes.PRODUCTS:
            if name in products:
                lines.append(f"    {name:<10} {products[name]}")
        if "error" in products:
            lines.append(f"    {products['error']}")
    cuda = info["cuda"]
    devices = "; ".join(cuda["devices"]) if cuda["devices"] else "none"
    lines.append(f"CUDA: {'available' if cuda['available'] else 'not available'} (devices: {devices}; "
                 f"CUDA {cuda['version'] or '-'})")
    return "\n".join(lines)
