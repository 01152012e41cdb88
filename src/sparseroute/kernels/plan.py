"""Where each matrix product of the expert kernel runs, and why: decided here, in one place.

The compiled expert MLP (:func:`sparseroute.kernels.ops.expert_mlp`) runs six per-expert products
(:data:`sparseroute.kernels.codes.PRODUCTS`); each goes to torch's matmul (``aten``), oneDNN's
matmul (``onednn``) or the kernel's own float32 row products (``own``, which read the routed
rows of x and of the output gradient in place instead of gathering them). What the build and the
hardware allow comes first:

1. ``aten`` everywhere when the GEMM backend is set to ATen (``SPARSEROUTE_GEMM=aten``);
   ``onednn`` and ``own`` only (no ``aten``) when it is set to oneDNN;
2. no ``onednn`` where this torch has no oneDNN, where oneDNN's matmul does not run on this CPU
   for the dtype, or where D or F is below :data:`~sparseroute.kernels.backend.MIN_DIM`;
3. ``own`` only in float32, for products whose width the own loops run (AVX-512 CPUs, widths in
   multiples of 16), and only where oneDNN may run (the own loops belong to that backend).

Among what is allowed, the best choice depends on the CPU: the own loops win where the
per-expert matrix stays in a core's L2 and lose where it does not, MKL beats oneDNN on Intel's
CPUs and loses on others, and where exactly the lines lie differs between CPUs. The rule
(:func:`_rule`) puts a product on the own loops where its matrix fits in half of L2 and on the
GEMM backend's library elsewhere. By default (``SPARSEROUTE_KERNEL_PLAN=tune``) the first call of a
shape class (dtype, D, F, E, slots per token, activation, threads) on a machine times the candidate plans on that
shape (the rule's, each library everywhere, the own loops everywhere with either library
elsewhere), forward and backward, in turns over several rounds, and keeps the fastest; the choice is written to ``plans.json``
beside the built kernels (:func:`sparseroute.kernels.extension.cache_root`) under the CPU's model
name, the kernels' build (sparseroute and torch versions, a hash of the sources) and the GEMM setting, and every later process on the
machine reads it from there (the first writer wins, so concurrent processes agree). The rule's
plan is kept unless another plan is faster by :data:`MARGIN`. ``SPARSEROUTE_KERNEL_PLAN=rule``
uses the rule without timing anything; ``onednn`` or ``own`` force that backend wherever it may
run (for measurements).

The own loops and oneDNN sum in different orders, so the plan decides the last bits of the
weight gradients (the forward outputs agree to the bit): a run keeps its machine's cached plan,
and so its bits, across restarts.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparseroute.fileio import file_lock, write_json_atomic
from sparseroute.kernels import backend, codes, extension
from sparseroute.kernels.cpuinfo import cache_bytes, cpu_model

__all__ = ["ExpertPlan", "expert_plan", "MODES", "MARGIN", "plan_mode", "clear_cache"]

MODES = ("tune", "rule", "onednn", "own")
_ENV = "SPARSEROUTE_KERNEL_PLAN"
#: another plan replaces the rule's only when its median time is below (1 - MARGIN) x the rule's
MARGIN = 0.03
#: timed rounds per candidate (after one warm-up round), and the most tokens timed
ROUNDS = 5
TUNE_TOKENS = 8192

_memo: dict[tuple, "ExpertPlan"] = {}


@dataclass(frozen=True)
class ExpertPlan:
    """The backend of each product (:data:`~sparseroute.kernels.codes.PRODUCTS` order), why, and
    how it was decided (``rule``, ``tuned``, ``forced`` or ``cached``)."""

    backends: tuple[str, ...]
    reasons: tuple[str, ...]
    source: str

    @property
    def codes(self) -> list[int]:
        return codes.backend_codes(self.backends)

    def describe(self) -> dict[str, str]:
        """Product name -> "backend (why)"."""
        return {p: f"{b} ({r})" for p, b, r in zip(codes.PRODUCTS, self.backends, self.reasons)}


def plan_mode() -> str:
    """``$SPARSEROUTE_KERNEL_PLAN``: tune (default), rule, onednn or own."""
    mode = os.environ.get(_ENV, "tune") or "tune"
    if mode not in MODES:
        raise ValueError(f"${_ENV}: unknown plan mode {mode!r}; known: {list(MODES)}")
    return mode


def clear_cache() -> None:
    """Forget this process's plans (the file cache stays)."""
    _memo.clear()


def _limits(module, dtype: torch.dtype, D: int, F: int, H: int) -> tuple[list[list[str]], list[str]]:
    """Per product, the backends it may use (in the order own, onednn, aten) and a note on what
    was left out and why."""
    asked = backend.get_backend()
    onednn_ok = (
        asked != "aten"
        and backend.onednn_available()
        and module is not None
        and bool(module.onednn_usable_for(torch.empty(0, dtype=dtype)))
        and min(D, F) >= backend.MIN_DIM
    )
    allowed: list[list[str]] = []
    notes: list[str] = []
    for product in codes.PRODUCTS:
        K, N = codes.expert_matrix(product, D, F, H)
        options = ["aten"] if asked != "onednn" or not onednn_ok else []
        if onednn_ok:
            options.insert(0, "onednn")
            if dtype == torch.float32 and bool(module.row_gemm_runs(N)):
                options.insert(0, "own")
        allowed.append(options)
        if asked == "aten":
            notes.append("the GEMM backend is ATen")
        elif not onednn_ok:
            notes.append(f"oneDNN's matmul does not run here for {dtype} at D={D}, F={F}")
        elif options[0] != "own":
            notes.append("the own loops run float32 on AVX-512 at widths in multiples of 16")
        else:
            notes.append("")
    return allowed, notes


#: the own loops keep a per-expert matrix of at most this share of a core's L2
L2_SHARE = 0.5
#: L2 assumed where the OS does not say
DEFAULT_L2 = 512 << 10


def own_fits(K: int, N: int) -> bool:
    """Whether a K x N float32 per-expert matrix fits in the share of a core's L2 where the own
    loops keep it (each block of rows reads all of it; a larger one streams from L3 for every
    block, where the libraries' blocked matmuls keep their blocks in cache)."""
    return K * N * 4 <= L2_SHARE * (cache_bytes(2) or DEFAULT_L2)


def _rule(allowed: list[list[str]], D: int, F: int, H: int) -> tuple[list[str], list[str]]:
    """The own loops where the per-expert matrix fits in half a core's L2, else the GEMM
    backend's library (oneDNN where it resolves to oneDNN and may run, else ATen)."""
    l2 = cache_bytes(2) or DEFAULT_L2
    library = backend.resolved_backend()
    backends, reasons = [], []
    for product, options in zip(codes.PRODUCTS, allowed):
        K, N = codes.expert_matrix(product, D, F, H)
        fallback = library if library in options else options[-1]
        if "own" in options:
            fits = own_fits(K, N)
            backends.append("own" if fits else fallback)
            reasons.append(f"{K}x{N} matrix {'fits' if fits else 'exceeds'} half of L2 ({l2 >> 10} KiB)")
        else:
            backends.append(fallback)
            reasons.append("")
    return backends, reasons


def _key(dtype: torch.dtype, D: int, F: int, E: int, K: int, activation: str, threads: int) -> str:
    # the build folder's name: the sparseroute and torch versions and a hash of the kernels'
    # sources and flags, so that a changed kernel is tuned again
    return (f"{cpu_model()} | {extension.build_dir().name} | gemm {backend.get_backend()} | "
            f"{str(dtype).removeprefix('torch.')} D{D} F{F} E{E} K{K} {activation} threads{threads}")


def _cache_path():
    return extension.cache_root() / "plans.json"


def _cached(key: str, allowed: list[list[str]]) -> "ExpertPlan | None":
    """The plan stored under ``key``, where it is one this build may run."""
    stored = _read_cache().get(key)
    if not _valid(stored, allowed):
        return None
    return ExpertPlan(tuple(stored), tuple("tuned on this machine (cached)" for _ in stored), "cached")


def _read_cache() -> dict[str, list[str]]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def expert_plan(dtype: torch.dtype, D: int, F: int, E: int, K: int, activation: str, threads: int, *,
                timer: Callable[[list[str]], float] | None = None, peek: bool = False) -> ExpertPlan:
    """The plan for expert MLPs of this shape class (see the module docstring). ``timer`` (for
    tests) replaces the timing of one run of a candidate: it takes the candidate's backends and
    returns seconds. K: the slots per token of the routings (their rows per expert matter).
    ``peek``: never time anything; a shape class not tuned yet gets the rule's plan (marked
    ``untuned``) and nothing is remembered."""
    mode = plan_mode()
    memo_key = (dtype, D, F, E, K, activation, threads, mode, backend.get_backend(), backend.resolved_backend())
    if memo_key in _memo and timer is None:
        return _memo[memo_key]
    module = extension.load()
    H = 2 * F if activation == "swiglu" else F
    allowed, notes = _limits(module, dtype, D, F, H)
    rule, rule_why = _rule(allowed, D, F, H)
    if mode in ("onednn", "own"):
        backends = [mode if mode in opts else ("onednn" if "onednn" in opts else opts[-1]) for opts in allowed]
        plan = ExpertPlan(tuple(backends), tuple(f"forced by ${_ENV}={mode}" for _ in backends), "forced")
    elif mode == "rule" or all(len(opts) < 2 for opts in allowed):
        # nothing to choose between, or the rule asked for
        plan = ExpertPlan(tuple(rule), tuple(w or n for w, n in zip(rule_why, notes)), "rule")
    elif peek:
        cached = _cached(_key(dtype, D, F, E, K, activation, threads), allowed)
        if cached is not None:
            return cached
        return ExpertPlan(tuple(rule), tuple(f"{w}; not tuned yet" for w in rule_why), "untuned")
    else:
        plan = _tuned(dtype, D, F, E, K, activation, threads, allowed, rule, rule_why, timer)
    if timer is None:
        _memo[memo_key] = plan
    return plan


def _candidates(allowed: list[list[str]], rule: list[str]) -> dict[str, list[str]]:
    """The rule's plan, each library everywhere it may run, and the own loops everywhere they may
    run with either library elsewhere (duplicates dropped)."""

    def pick(*order: str) -> list[str]:
        return [next((b for b in order if b in o), o[0]) for o in allowed]

    out = {"rule": rule, "aten": pick("aten", "onednn"), "onednn": pick("onednn", "aten"),
           "own+aten": pick("own", "aten", "onednn"), "own+onednn": pick("own", "onednn", "aten")}
    unique: dict[str, list[str]] = {}
    for name, backends in out.items():
        if backends not in unique.values():
            unique[name] = backends
    return unique


def _tuned(dtype, D, F, E, K, activation, threads, allowed, rule, rule_why, timer) -> ExpertPlan:
    key = _key(dtype, D, F, E, K, activation, threads)
    cached = None if timer is not None else _cached(key, allowed)
    if cached is not None:
        return cached
    if timer is None and (torch.compiler.is_compiling() or _in_dispatch_mode()):
        # no timing inside a trace or under a dispatch mode (it would see the trial runs)
        return ExpertPlan(tuple(rule), tuple(rule_why), "rule")
    candidates = _candidates(allowed, rule)
    path = _cache_path()
    with contextlib.ExitStack() as stack:
        if timer is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(file_lock(path.with_name(path.name + ".lock")))
            cached = _cached(key, allowed)  # decided by another process meanwhile
            if cached is not None:
                return cached
        run_once = timer or _timer(dtype, D, F, E, K, activation, threads)
        # the candidates take turns, round after round (the machine's speed drifts over seconds),
        # after one warm-up round
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for r in range(ROUNDS + 1):
            for name, backends in candidates.items():
                t = run_once(backends)
                if r:
                    times[name].append(t)
        seconds = {name: statistics.median(ts) for name, ts in times.items()}
        best = min(seconds, key=seconds.__getitem__)
        # another plan replaces the rule's only when it wins by the margin, round by round
        paired = statistics.median(b / a for b, a in zip(times[best], times["rule"]))
        if best != "rule" and paired >= 1.0 - MARGIN:
            best = "rule"
        chosen = candidates[best]
        if timer is None:
            data = _read_cache()
            data[key] = chosen
            write_json_atomic(path, data)
    why = f"tuned: {best} plan fastest ({', '.join(f'{n} {s * 1e3:.1f} ms' for n, s in seconds.items())})"
    return ExpertPlan(tuple(chosen), tuple(why for _ in chosen), "tuned")


def _in_dispatch_mode() -> bool:
    """Whether a Python dispatch mode (FlopCounterMode, fake tensors) is active. torch's helper for
    it is private: where it is missing, no mode is assumed."""
    try:
        from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    except ImportError:
        return False
    return bool(is_in_torch_dispatch_mode())


def _valid(backends, allowed) -> bool:
    return (isinstance(backends, list) and len(backends) == len(allowed)
            and all(b in opts for b, opts in zip(backends, allowed)))


def _timer(dtype, D, F, E, K, activation, threads) -> Callable[[list[str]], float]:
    """Seconds of one forward + backward of the expert MLP with a given plan, on random data of
    this shape class (TUNE_TOKENS tokens, each routed to K experts)."""
    gen = torch.Generator().manual_seed(0)
    T, k = TUNE_TOKENS, K
    H = 2 * F if activation == "swiglu" else F
    x = torch.randn(T, D, generator=gen).to(dtype)
    w_in = (torch.randn(E, D, H, generator=gen) * D**-0.5).to(dtype)
    w_out = (torch.randn(E, F, D, generator=gen) * F**-0.5).to(dtype)
    idx = torch.rand(T, E, generator=gen).topk(k, dim=1).indices
    w = torch.full((T, k), 1.0 / k)
    g = torch.randn(T, D, generator=gen).to(dtype)

    def run_once(backends: list[str]) -> float:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            xs, wi, wo = (t.detach().requires_grad_() for t in (x, w_in, w_out))
            t0 = time.perf_counter()
            # the op that sparseroute.kernels.ops registers (it calls this module for its plans)
            out = torch.ops.sparseroute.expert_mlp(xs, idx, w, wi, wo, codes.activation_code(activation),
                                                   threads, codes.backend_codes(backends))[0]
            out.backward(g)
            return time.perf_counter() - t0
        finally:
            torch.set_num_threads(saved)

    return run_once
