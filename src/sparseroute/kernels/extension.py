"""The compiled CPU kernels, built on first use: the expert-parallel expert MLP and the entry to
oneDNN's matmul that :mod:`sparseroute.kernels.gemm` uses (``csrc/expert_parallel.cpp``), and the
softmax top-k routing decision (``csrc/softmax_topk.cpp``).

torch's JIT extension builder compiles it once (about a minute) into torch's extension folder
(``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), shared by every process
and rebuilt only when the source, the flags or torch change; that needs a C++ compiler and the
``ninja`` package (the ``kernels`` extra). :func:`load` returns the module, or None when it
cannot be built, and :func:`unavailable_reason` says why. The compiler's output goes to
``build.log`` in the build folder, not to the terminal. ``SPARSEROUTE_NO_EXTENSIONS=1`` turns the
kernel off.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import threading
from pathlib import Path
from types import ModuleType


_NAME = "sparseroute_expert_parallel"
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in ("expert_parallel.cpp", "softmax_topk.cpp")]
_LOCK = threading.Lock()
_state: dict[str, object] = {}


def build_dir() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(_NAME, verbose=False))


def load() -> ModuleType | None:
    """The compiled module, building it on the first call; None when that fails (see
    :func:`unavailable_reason`). A disabled build (``SPARSEROUTE_NO_EXTENSIONS=1``) counts as a
    failure."""
    if "module" in _state:  # every MoE forward asks; no lock once built
        return _state["module"]  # type: ignore[return-value]
    with _LOCK:
        if "module" in _state or "error" in _state:
            return _state.get("module")  # type: ignore[return-value]
        try:
            _state["module"] = _build()
        except Exception as exc:  # a missing compiler or ninja, a failed build, a disabled build
            text = f"{type(exc).__name__}: {exc}".strip()
            first = text.splitlines()[0][:300]
            _state["error"] = first if first == text else f"{first} … (the whole message: {_log_path()})"
            with contextlib.suppress(OSError):
                _log_path().parent.mkdir(parents=True, exist_ok=True)
                _log_path().write_text(text + "\n")
        return _state.get("module")  # type: ignore[return-value]


def set_workspace_limits(slots: int = 64, max_bytes: int = 1 << 30) -> None:
    """Limits of the ``parallel`` kernel's pool of buffers (default: 64 buffers, 1 GiB).

    The kernel's buffers (the activations its forward saves for the backward, its outputs and
    weight gradients, its per-thread scratch) are large enough to come straight from the OS,
    which would fault in fresh zeroed pages for them on every call. The kernel allocates them
    from a pool instead: a buffer goes back to the pool when the last tensor on it (a view, a
    saved activation, a ``.grad``) dies, and a later call reuses it, so live data is never
    overwritten. The pool keeps at most ``slots`` free buffers and ``max_bytes`` free bytes
    (the least recently freed go first); ``slots=0`` keeps none and frees what it kept. Without
    the kernel this does nothing."""
    if slots < 0 or max_bytes < 0:
        raise ValueError(f"set_workspace_limits: slots and max_bytes must be >= 0, got {slots} and {max_bytes}")
    module = load()
    if module is not None:
        module.set_workspace_limits(int(slots), int(max_bytes))


def workspace_state() -> dict[str, int] | None:
    """The buffer pool's limits and the free buffers it keeps (None without the kernel):
    ``{"slots", "max_bytes", "kept", "kept_bytes"}``."""
    module = load()
    if module is None:
        return None
    slots, max_bytes, kept, kept_bytes = module.workspace_state()
    return {"slots": slots, "max_bytes": max_bytes, "kept": kept, "kept_bytes": kept_bytes}


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None (after it was called), else None."""
    return _state.get("error")  # type: ignore[return-value]


def _log_path() -> Path:
    return build_dir() / "build.log"


def _headers_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(_CSRC.glob("*.h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _build() -> ModuleType:
    if os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1":
        raise RuntimeError("compiled kernels disabled by SPARSEROUTE_NO_EXTENSIONS=1")
    from torch.utils.cpp_extension import load as jit_load

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.glob(f"{_NAME}*.so")):
        print(
            "sparseroute: building the CPU kernels (once per torch version, about a minute)...",
            file=sys.stderr,
            flush=True,
        )
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        module = jit_load(
            name=_NAME,
            sources=[str(path) for path in _SOURCES],
            # torch rebuilds when a source or a flag changes; the headers' hash in a flag makes
            # a change to a header count too
            extra_cflags=["-O3", "-fopenmp", f"-DSPARSEROUTE_HEADERS={_headers_hash()}"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(out),
            verbose=False,
        )
    _log_path().write_text(log.getvalue())
    return module
