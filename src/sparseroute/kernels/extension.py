"""The compiled CPU kernels (``csrc/``): the expert-parallel expert MLP, the entry to oneDNN's
matmul that :mod:`sparseroute.kernels.gemm` uses, the counting sort by expert, and the softmax
top-k routing decision.

They are built ahead of use, never implicitly: :func:`build` compiles them (about a minute, with
torch's extension builder, which needs a C++ compiler and ``ninja``: the ``kernels`` extra) into
``<cache root>/<module>-<sparseroute version>-torch<torch version>-<hash>``, where the
cache root is ``$SPARSEROUTE_KERNELS_CACHE`` or ``~/.cache/sparseroute/kernels`` and the hash covers the sources,
the headers, the flags and the Python ABI, so a change to any of them gets a folder of its own.
The command ``sparseroute kernels build`` calls it. :func:`load` only imports a module built
before (None when there is none, and :func:`unavailable_reason` says why), so the first MoE
forward never stalls on a compiler. ``SPARSEROUTE_NO_EXTENSIONS=1`` turns the kernels off:
:func:`load` returns None and :func:`build` raises.

Builds are serialised between processes by a lock that dies with its holder (an fcntl lock on
``<folder>.lock``), under which a ``lock`` file that torch's builder may have left behind in
the folder when a build was killed is removed first: a killed build never makes later builds
wait forever. The compiler's output goes to ``build.log`` in the build folder.

Two modules come from the same sources: the shipped one, and a test module
(``load(testing=True)``, ``build(testing=True)``, compiled with ``-DSPARSEROUTE_TESTING=1``)
that also has the test hooks (the kernel's own loops one at a time, the switches of its work
sharing). The integer codes both take are defined in :mod:`sparseroute.kernels.codes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

from sparseroute import __version__
from sparseroute.fileio import atomic_write_text, file_lock
from sparseroute.kernels import codes

__all__ = [
    "KernelBuildError",
    "build",
    "build_dir",
    "build_flags",
    "disabled",
    "cache_root",
    "load",
    "module_name",
    "set_workspace_limits",
    "unavailable_reason",
    "workspace_state",
]

_NAME = "sparseroute_kernels"
_CSRC = Path(__file__).with_name("csrc")
_DISABLE = "SPARSEROUTE_NO_EXTENSIONS"
_CACHE_ENV = "SPARSEROUTE_KERNELS_CACHE"
_LDFLAGS = ("-fopenmp",)
_BUILT = "built.json"  # written after a successful build: what load() imports
_FAILED = "failed.json"  # written after a failed build: why
_LOCK = threading.Lock()  # the module table
_BUILD_LOCK = threading.Lock()  # one build at a time in this process (file_lock: between processes)
_modules: dict[str, ModuleType] = {}  # build folder -> the module imported from it
_import_errors: dict[str, str] = {}  # build folder -> why its module did not import
_folders: dict[tuple, str] = {}  # (testing, $SPARSEROUTE_KERNELS_CACHE, $HOME) -> build folder
_hashes: dict[bool, str] = {}  # testing -> the folder name (the sources' hash, taken once)


class KernelBuildError(RuntimeError):
    """The compiled kernels could not be built (or are disabled by ``SPARSEROUTE_NO_EXTENSIONS=1``)."""


def cache_root() -> Path:
    """Where the kernels are built: ``$SPARSEROUTE_KERNELS_CACHE``, else
    ``~/.cache/sparseroute/kernels``. Apart from the data cache (``$SPARSEROUTE_CACHE``) on
    purpose: a built module serves every run and data cache on the machine."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparseroute" / "kernels"


def module_name(*, testing: bool = False) -> str:
    """The name of the shipped module, or of the test module (``..._testing``)."""
    return f"{_NAME}_testing" if testing else _NAME


def build_flags(*, testing: bool = False) -> list[str]:
    """The compiler flags: optimisation, OpenMP, the codes of :mod:`~sparseroute.kernels.codes`,
    and for the test module ``-DSPARSEROUTE_TESTING=1``."""
    flags = ["-O3", "-fopenmp", *codes.compile_definitions()]
    if testing:
        flags.append("-DSPARSEROUTE_TESTING=1")
    return flags


def _sources(csrc: Path = _CSRC) -> list[Path]:
    """Every ``.cpp`` under ``csrc`` (the bindings first: the longest to compile)."""
    return sorted(csrc.glob("*.cpp"), key=lambda p: (p.name != "bindings.cpp", p.name))


def _folder_name(name: str, cflags: Sequence[str], ldflags: Sequence[str] = _LDFLAGS, csrc: Path = _CSRC) -> str:
    """``<name>-<sparseroute version>-torch<torch version>-<16 hex>``: the hash covers every source
    and header under ``csrc``, the flags, and the Python ABI the module is built for."""
    import torch

    digest = hashlib.sha256()
    for path in sorted([*csrc.glob("*.cpp"), *csrc.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in ("cflags", *cflags, "ldflags", *ldflags, sys.implementation.cache_tag, platform.machine()):
        digest.update(part.encode() + b"\0")
    return f"{name}-{__version__}-torch{torch.__version__}-{digest.hexdigest()[:16]}"


def build_dir(*, testing: bool = False) -> Path:
    """The build folder of the shipped module (or of the test module) for these sources, flags,
    sparseroute and torch, under :func:`cache_root`. The sources are hashed once per process."""
    return Path(_folder(testing))


def _folder(testing: bool) -> str:
    """:func:`build_dir` as a string, remembered per cache root (every MoE forward asks)."""
    key = (testing, os.environ.get(_CACHE_ENV), os.environ.get("HOME"))
    folder = _folders.get(key)
    if folder is None:
        if testing not in _hashes:
            _hashes[testing] = _folder_name(module_name(testing=testing), build_flags(testing=testing))
        folder = _folders[key] = str(cache_root() / _hashes[testing])
    return folder


def disabled() -> bool:
    """Whether ``SPARSEROUTE_NO_EXTENSIONS=1`` turns the compiled kernels off."""
    return os.environ.get(_DISABLE) == "1"


def load(*, testing: bool = False) -> ModuleType | None:
    """The compiled module (the test module with ``testing=True``) where it was built, else None
    (see :func:`unavailable_reason`). Never builds: :func:`build` does, or ``sparseroute kernels
    build``. Imports the built module once per process; later calls cost a dictionary lookup."""
    return _load(testing)


def _load(testing: bool) -> ModuleType | None:
    """:func:`load` (which tests may replace; :func:`build` and :func:`unavailable_reason` call
    this one)."""
    if disabled():
        return None
    key = _folder(testing)
    module = _modules.get(key)  # every MoE forward asks: no lock once loaded
    if module is not None:
        return module
    with _LOCK:
        module = _modules.get(key)
        if module is None and key not in _import_errors:
            module = _import_built(Path(key))
        return module


def _import_built(folder: Path) -> ModuleType | None:
    """The module the marker of ``folder`` names, imported (called with ``_LOCK`` held); None when
    there is no marker or it does not match the folder's module file."""
    try:
        marker = json.loads((folder / _BUILT).read_text())
        path = folder / marker["file"]
        stat = path.stat()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if marker.get("folder") != folder.name or stat.st_size != marker.get("size") or stat.st_mtime_ns != marker.get("mtime_ns"):
        return None
    try:
        module = _import_file(marker["name"], path)
    except Exception as exc:  # a module that does not load (e.g. a library it needs is gone)
        _import_errors[str(folder)] = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        return None
    _modules[str(folder)] = module
    return module


def _import_file(name: str, path: Path) -> ModuleType:
    import torch  # noqa: F401  (the module links against torch's libraries, loaded by this import)

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unavailable_reason(*, testing: bool = False) -> str | None:
    """Why :func:`load` returns None (disabled, not built yet, the build failed, or the built
    module does not import), else None."""
    if disabled():
        return f"the compiled kernels are disabled by {_DISABLE}=1"
    if _load(testing) is not None:
        return None
    folder = build_dir(testing=testing)
    how = "sparseroute.kernels.extension.build(testing=True)" if testing else "`sparseroute kernels build`"
    if str(folder) in _import_errors:
        return f"the built kernels in {folder} do not import ({_import_errors[str(folder)]}); delete the folder and run {how}"
    try:
        failed = json.loads((folder / _FAILED).read_text())
        return f"the build of the compiled kernels failed: {failed['error']} (the compiler's output: {failed['log']}); fix that and run {how}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return f"the compiled kernels are not built yet: run {how} (about a minute, once per version of sparseroute and torch)"


def build(*, testing: bool = False, progress: bool = True) -> ModuleType:
    """The compiled module (the test module with ``testing=True``), built first where it is not
    built yet: about a minute, with a one-line progress message on stderr unless ``progress`` is
    False; the compiler's output goes to ``build.log`` in :func:`build_dir`. Raises
    :class:`KernelBuildError` when the build fails (with its first error and the log's path) or
    the kernels are disabled (``SPARSEROUTE_NO_EXTENSIONS=1``)."""
    if disabled():
        raise KernelBuildError(f"the compiled kernels are disabled by {_DISABLE}=1")
    module = _load(testing)
    if module is not None:
        return module
    folder = build_dir(testing=testing)
    with _BUILD_LOCK:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(folder.with_name(folder.name + ".lock")):
            with _LOCK:  # built meanwhile by another process?
                _import_errors.pop(str(folder), None)
                module = _import_built(folder)
            if module is None:
                module = _compile(folder, testing=testing, progress=progress)
                with _LOCK:
                    _modules[str(folder)] = module
    return module


def _compile(folder: Path, *, testing: bool, progress: bool) -> ModuleType:
    """Compile into ``folder`` (called with its lock held) and write the marker."""
    from torch.utils.cpp_extension import load as jit_load

    folder.mkdir(parents=True, exist_ok=True)
    # torch's builder takes a `lock` file in the folder (FileBaton) and waits for as long as one
    # exists; a build killed midway leaves it behind. Nobody else builds here while we hold the
    # folder's lock, so one now is stale.
    (folder / "lock").unlink(missing_ok=True)
    for marker in (_BUILT, _FAILED):
        (folder / marker).unlink(missing_ok=True)
    log = folder / "build.log"
    log.write_text("")
    if progress:
        print("sparseroute: building the CPU kernels (about a minute)…", end="", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        with _output_to(log), _ninja_on_path():
            module = jit_load(
                name=module_name(testing=testing),
                sources=[str(p) for p in _sources()],
                extra_cflags=build_flags(testing=testing),
                extra_ldflags=list(_LDFLAGS),
                build_directory=str(folder),
                verbose=True,  # the compiler's output goes to the log
            )
    except Exception as exc:  # no compiler, no ninja, a compile error
        text = f"{type(exc).__name__}: {exc}".strip()
        with open(log, "a") as f:
            f.write("\n" + text + "\n")
        first = _first_error(log) or text.splitlines()[0]
        first = first[:300]
        with contextlib.suppress(OSError):
            atomic_write_text(folder / _FAILED, json.dumps({"error": first, "log": str(log)}))
        if progress:
            print(" failed", file=sys.stderr, flush=True)
        raise KernelBuildError(f"building the compiled kernels failed: {first} (the compiler's output: {log})") from exc
    path = Path(module.__file__)
    stat = path.stat()
    marker = {"name": module.__name__, "file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "folder": folder.name}
    atomic_write_text(folder / _BUILT, json.dumps(marker))
    if progress:
        print(f" done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return module


def _first_error(log: Path) -> str | None:
    """The compiler's first error line in the log, if it has one."""
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            if re.search(r"(^|[\s:])(fatal )?error:", line):
                return line.strip()
    return None


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Everything written to stdout and stderr, by Python or by a child process (ninja, the
    compiler), goes to ``path`` within the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "ab", buffering=0) as f, open(f.fileno(), "w", buffering=1, closefd=False) as text:
        saved = (os.dup(1), os.dup(2))
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        finally:
            text.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's builder runs ``ninja`` from PATH: where it is not there but the ``ninja`` package
    is installed (in this interpreter's environment, whose bin folder need not be on PATH), put
    it there for the build."""
    if shutil.which("ninja") is not None:
        yield
        return
    folders = [str(Path(sys.executable).parent)]
    with contextlib.suppress(ImportError):
        import ninja  # type: ignore[import-not-found]

        folders.insert(0, str(ninja.BIN_DIR))
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([*folders, *([before] if before else [])])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def set_workspace_limits(slots: int = 64, max_bytes: int = 1 << 30) -> None:
    """Limits of the ``parallel`` kernel's pool of buffers (default: 64 buffers, 1 GiB).

    The kernel's buffers (the activations its forward saves for the backward, its outputs and
    weight gradients, its per-thread scratch) are large enough to come straight from the OS,
    which would fault in fresh zeroed pages for them on every call. The kernel allocates them
    from a pool instead: a buffer goes back to the pool when the last tensor on it (a view, a
    saved activation, a ``.grad``) dies, and a later call reuses it, so live data is never
    overwritten. The pool keeps at most ``slots`` free buffers and ``max_bytes`` free bytes
    (the least recently freed go first); ``slots=0`` keeps none and frees what it kept. Acts on
    the built module (:func:`load`; it never builds); where there is none this does nothing."""
    if slots < 0 or max_bytes < 0:
        raise ValueError(f"set_workspace_limits: slots and max_bytes must be >= 0, got {slots} and {max_bytes}")
    module = load()
    if module is not None:
        module.set_workspace_limits(int(slots), int(max_bytes))


def workspace_state() -> dict[str, int] | None:
    """The buffer pool's limits and the free buffers it keeps (None where the kernels are not
    built): ``{"slots", "max_bytes", "kept", "kept_bytes"}``."""
    module = load()
    if module is None:
        return None
    slots, max_bytes, kept, kept_bytes = module.workspace_state()
    return {"slots": slots, "max_bytes": max_bytes, "kept": kept, "kept_bytes": kept_bytes}
