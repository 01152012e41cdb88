"""MoE layer vs a dense SwiGLU of the same active FLOPs vs Hugging Face's Mixtral block.

fp32 (``--dtype bf16`` for the other), forward + backward, timed in one process with the
variants interleaved; the median of ``--repeats`` runs after one warm-up. Variants per shape:

  moe        sparseroute MoE, learned ``topk`` router, default dispatch ("auto") and GEMM
             backend (``sparseroute.kernels.backend``: oneDNN on an x86 CPU, in fp32), each
             product of its expert kernel where the kernels' plan puts it on this machine
             (``sparseroute.kernels.plan``; the plan is decided before the timing and is in the JSON)
  moe_<d>    the same layer with dispatch <d> (informational)
  moe_aten   (CPU, where the MoE's products run on oneDNN: fp32, and bf16 where oneDNN's bf16
             matmul runs) the same layer with torch's own matmul
  dense_fused, dense_split   SwiGLU MLP of hidden k·F (the same active FLOPs as the MoE's
             experts), gate/up as one matmul or two, on torch's matmul
  dense_fused_onednn, dense_split_onednn   (fp32, where the MoE's backend is oneDNN) the same on
             oneDNN, the MoE's own GEMM library (in bf16 torch's own matmul runs on oneDNN)
  hf_eager, hf_grouped_mm   transformers' MixtralSparseMoeBlock with that experts implementation
  moe_from_hf   the MoE that ``sparseroute.moe.from_hf`` makes of that block (its weights):
             ``hf_over_moe`` is the faster HF block's time over this one's
  loop       (only without transformers) a per-expert loop in the style of HF's eager path

``dense`` is the fastest dense variant, so that the MoE is compared with a dense layer on the same
GEMM library: torch's CPU matmul (MKL) runs AVX2 code on AMD CPUs where oneDNN runs AVX-512, and
a MoE on oneDNN against a dense layer on MKL would measure the libraries, not the routing.
Per shape, ``moe_over_dense`` is the ratio of the two medians, and ``moe_over_dense_torch`` the
MoE against the faster of the two dense variants on torch's matmul (what a plain PyTorch model
runs). The machine's speed drifts over seconds, so the JSON also gives the ratio within each
round (the MoE and the dense layer timed next to each other), ``moe_over_dense_paired`` (its
median), and ``moe_over_dense_ci95``, a 95% bootstrap interval of ``moe_over_dense`` (the rounds
resampled as pairs).

A layer's time also depends on how the process's memory allocator serves it: a step whose large
tensors come from fresh pages pays the OS to zero-fill them (~1 ms per 1,000 minor faults on the
2-core CPU). The MoE kernel reuses its own buffers; the dense layer's tensors come from glibc's
malloc, which by default maps fresh pages for every block of 32 MiB and more (the dense layer's
[T, k·F] activations at both shapes) and unmaps them when they are freed: in a run with glibc's
defaults the dense layer pays for 64 MB (fine-grained) and 320–450 MB (coarse) of fresh pages a
step, and the MoE for none. So that the comparison measures the layers and not the allocator,
the benchmark first tells glibc to keep freed memory for reuse (``mallopt``: blocks under 1 GiB
from its heap, the heap never trimmed), much as the allocators often used for CPU training
(jemalloc, tcmalloc) do by design. ``--system-malloc`` keeps glibc's defaults. The JSON says
which (``malloc``: ``retain`` or ``system``; ``system`` also where the C library is not glibc),
and ``faults_per_step`` gives each side's median minor page faults, so that a run where either
side paid for fresh memory shows as such.

By default every round takes the same input batch, so the routing and the experts' loads are
the same at every step. ``--fresh-inputs`` draws a new batch per round: the loads then change at
every step, as in training, and a GEMM library that builds kernels for exact shapes (oneDNN)
shows what that costs (``inputs`` in the JSON: ``fixed`` or ``fresh``).

Prints a table to stderr and one JSON line last on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from sparseroute.kernels import gemm, ops, plan
from sparseroute.kernels.cpuinfo import cpu_model
from sparseroute.lab.stats import median_ratio_ci
from sparseroute.moe import EXECUTORS, MoE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = [
    dict(E=8, k=2, F=1024),
    dict(E=64, k=8, F=128),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_dense(D: int, H: int, device, dtype, fused_gate_up: bool, mm: Callable = torch.matmul):
    """SwiGLU MLP of hidden H: gate and up as one [D, 2H] matmul, or as two (LLaMA style); the
    products through ``mm`` (torch's matmul, or ``sparseroute.kernels.gemm.matmul``)."""

    def param(*shape, fan_in):
        return torch.nn.Parameter(torch.randn(*shape, device=device, dtype=dtype) * fan_in**-0.5)

    w_out = param(H, D, fan_in=H)
    if fused_gate_up:
        w_in = param(D, 2 * H, fan_in=D)

        def run(x):
            gate, up = mm(x, w_in).chunk(2, dim=-1)
            return mm(F.silu(gate) * up, w_out)

        return run, [w_in, w_out]
    w_gate, w_up = param(D, H, fan_in=D), param(D, H, fan_in=D)

    def run_split(x):
        return mm(F.silu(mm(x, w_gate)) * mm(x, w_up), w_out)

    return run_split, [w_gate, w_up, w_out]


def _on_aten(moe: MoE, x):
    with gemm.use_backend("aten"):  # the backward runs on the forward's backend
        return moe(x)[0]


def make_hf(moe: MoE, impl: str, device, dtype):
    """transformers' Mixtral block with ``moe``'s weights and experts implementation ``impl``;
    returns (run, params, block)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    c = moe.config
    cfg = MixtralConfig(
        hidden_size=moe.d_model,
        intermediate_size=c.d_ff,
        num_local_experts=c.num_experts,
        num_experts_per_tok=c.top_k,
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.experts.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(moe.experts.w_out.transpose(1, 2))

    def run(x):
        return block(x.unsqueeze(0)).squeeze(0)

    return run, list(block.parameters()), block


def expert_plan_of(moe: MoE, dtype) -> plan.ExpertPlan | None:
    """Where the MoE's expert kernel runs each product here (deciding it now, before the timing:
    tuning, on first use of a shape class, times candidate plans); None where the kernel does
    not run (not built, or not on the CPU)."""
    if not ops.available() or moe.experts.w_in.device.type != "cpu":
        return None
    c = moe.config
    return plan.expert_plan(dtype, moe.d_model, c.d_ff, c.num_experts, c.top_k, c.activation, torch.get_num_threads())


def make_loop(moe: MoE):
    """Per-expert loop as in HF's eager experts: one-hot mask, where(), index_add_."""
    E, k = moe.config.num_experts, moe.config.top_k
    w_r = moe.router.weight.detach().clone().requires_grad_()
    w_in = moe.experts.w_in.detach().clone().requires_grad_()
    w_out = moe.experts.w_out.detach().clone().requires_grad_()

    def run(x):
        probs = F.linear(x, w_r).float().softmax(dim=-1)
        top_w, top_i = probs.topk(k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        mask = F.one_hot(top_i, E).permute(2, 1, 0)
        for e in range(E):
            slot, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            gate, up = (x[tok] @ w_in[e]).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ w_out[e]
            out.index_add_(0, tok, y * top_w[tok, slot, None].to(x.dtype))
        return out

    return run, [w_r, w_in, w_out]


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse: blocks under 1 GiB from its heap
    instead of fresh mappings, and the heap's free top never given back to the OS. True when it
    took; False on another C library, which keeps its own policy."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
    return mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def time_variants(
    variants: dict[str, tuple[Callable, list]],
    xs: list,
    g,
    repeats: int,
    device,
    faults: dict[str, list[int]] | None = None,
) -> dict[str, list[float]]:
    """Seconds of forward + backward per variant, one per round, the variants interleaved; round r
    takes the input ``xs[r % len(xs)]``. With ``faults``, also each round's minor page faults per
    variant."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeats + 1):  # first round is warm-up
        for name, (fn, params) in variants.items():
            for p in params:
                p.grad = None
            xx = xs[rep % len(xs)].detach().requires_grad_()
            sync(device)
            f0 = _minor_faults()
            t0 = time.perf_counter()
            y = fn(xx)
            if isinstance(y, tuple):
                y = y[0]
            y.backward(g)
            sync(device)
            if rep:
                times[name].append(time.perf_counter() - t0)
                if faults is not None:
                    faults.setdefault(name, []).append(_minor_faults() - f0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per batch T (default 8192)")
    ap.add_argument("--d-model", type=int, default=512, help="model dim D (default 512)")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per variant, median taken (default 7)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp32 (default) or bf16")
    ap.add_argument(
        "--dispatch", nargs="*", default=None,
        help="extra dispatch modes to time (informational; default grouped loop fused parallel on the CPU, "
        "grouped loop fused elsewhere)",
    )
    ap.add_argument("--no-hf", action="store_true", help="skip transformers even if installed")
    ap.add_argument("--shape", action="append", metavar="E,k,F", help="shape(s) to run (default: 8,2,1024 and 64,8,128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--fresh-inputs", action="store_true",
        help="a new input batch every round, so that the routing, and with it the experts' loads, change "
        "at every step as in training (default: one batch for all rounds)",
    )
    ap.add_argument(
        "--system-malloc", action="store_true",
        help="keep glibc's default malloc, which maps fresh pages for the dense layer's large tensors at "
        "every step (see above)",
    )
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device takes cpu or cuda; got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    if args.dispatch is None:
        args.dispatch = ["grouped", "loop", "fused"] + (["parallel"] if device.type == "cpu" else [])
    unknown = [d for d in args.dispatch if d not in EXECUTORS]
    if unknown:
        ap.error(f"unknown --dispatch {unknown}; known: {EXECUTORS.names()}")
    if device.type != "cpu" and "parallel" in args.dispatch:
        ap.error("--dispatch parallel is the CPU kernel; it cannot run on " + device.type)
    dtype = DTYPES[args.dtype]
    malloc = "system" if args.system_malloc or not _retain_freed_memory() else "retain"
    # whether gemm.matmul runs on oneDNN here (float32): then the dense layer gets oneDNN variants
    # too (in bfloat16 torch's own matmul runs on oneDNN)
    onednn = gemm.uses_onednn(torch.empty(0, device=device, dtype=dtype))
    if device.type == "cpu":
        from sparseroute.kernels import ensure_built

        ensure_built(progress=True)
    torch.manual_seed(args.seed)
    try:
        import transformers  # noqa: F401

        have_hf = not args.no_hf
    except ImportError:
        have_hf = False

    shapes = SHAPES
    if args.shape:
        try:
            shapes = [dict(zip(("E", "k", "F"), map(int, s.split(",")), strict=True)) for s in args.shape]
        except ValueError:
            ap.error(f"--shape takes E,k,F as three integers; got {args.shape}")
    T, D = args.tokens, args.d_model
    rows = []
    moe_onednn = False
    for shape in shapes:
        E, k, Fh = shape["E"], shape["k"], shape["F"]
        moe = MoE(D, Fh, E, k, router="topk").to(device=device, dtype=dtype)
        expert_plan = expert_plan_of(moe, dtype)
        # the kernel's products off torch's matmul here: the MoE is also timed on torch's
        off_aten = expert_plan is not None and any(b != "aten" for b in expert_plan.backends)
        moe_onednn = moe_onednn or off_aten
        xs = [torch.randn(T, D, device=device, dtype=dtype) for _ in range(args.repeats + 1 if args.fresh_inputs else 1)]
        g = torch.randn(T, D, device=device, dtype=dtype)
        variants: dict[str, tuple[Callable, list]] = {
            "moe": (lambda xx, m=moe: m(xx)[0], list(moe.parameters())),
            "dense_fused": make_dense(D, k * Fh, device, dtype, fused_gate_up=True),
            "dense_split": make_dense(D, k * Fh, device, dtype, fused_gate_up=False),
        }
        if onednn:
            variants["dense_fused_onednn"] = make_dense(D, k * Fh, device, dtype, True, gemm.matmul)
            variants["dense_split_onednn"] = make_dense(D, k * Fh, device, dtype, False, gemm.matmul)
        if off_aten:
            variants["moe_aten"] = (lambda xx, m=moe: _on_aten(m, xx), list(moe.parameters()))
        for d in args.dispatch:
            if d != moe.config.dispatch:
                variants[f"moe_{d}"] = (lambda xx, m=moe, d=d: m(xx, dispatch=d)[0], list(moe.parameters()))
        if have_hf:
            from sparseroute.moe import from_hf

            *variants["hf_eager"], block = make_hf(moe, "eager", device, dtype)
            *variants["hf_grouped_mm"], _ = make_hf(moe, "grouped_mm", device, dtype)
            converted = from_hf(block)
            variants["moe_from_hf"] = (lambda xx, m=converted: m(xx)[0], list(converted.parameters()))
        else:
            variants["loop"] = make_loop(moe)
        faults: dict[str, list[int]] = {}
        times = time_variants(variants, xs, g, args.repeats, device, faults)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        torch_dense = min(("dense_fused", "dense_split"), key=med.__getitem__)
        dense = min((n for n in med if n.startswith("dense_")), key=med.__getitem__)  # the fastest dense
        times["dense"], med["dense"] = times[dense], med[dense]
        paired = statistics.median(m / d for m, d in zip(times["moe"], times["dense"]))
        ci = median_ratio_ci(times["moe"], times["dense"])
        row = {
            "E": E,
            "k": k,
            "F": Fh,
            "moe_over_dense": round(med["moe"] / med["dense"], 3),
            "moe_over_dense_paired": round(paired, 3),
            "moe_over_dense_ci95": [round(ci[0], 3), round(ci[1], 3)],
            "moe_over_dense_torch": round(med["moe"] / med[torch_dense], 3),
            "dense_variant": dense,
            # minor page faults per step (median): fresh memory the OS zero-fills, which costs
            # time apart from the layer's own work (see the module docstring)
            "faults_per_step": {n: int(statistics.median(faults[n])) for n in ("moe", dense)},
        }
        if have_hf:  # HF's block against the MoE that from_hf made of it
            row["hf_eager_over_moe"] = round(med["hf_eager"] / med["moe_from_hf"], 3)
            row["hf_grouped_mm_over_moe"] = round(med["hf_grouped_mm"] / med["moe_from_hf"], 3)
            row["hf_over_moe"] = min(row["hf_eager_over_moe"], row["hf_grouped_mm_over_moe"])
            row["from_hf_over_moe"] = round(med["moe_from_hf"] / med["moe"], 3)
        else:
            row["loop_over_moe"] = round(med["loop"] / med["moe"], 3)
        if expert_plan is not None:
            row["plan"] = {"source": expert_plan.source, "backends": dict(zip(plan.codes.PRODUCTS, expert_plan.backends))}
        for name, t in med.items():
            row[f"{name}_s"] = round(t, 4)
        rows.append(row)
        print(
            f"E={E:3d} k={k} F={Fh:5d}  " + "  ".join(f"{n}={t * 1e3:8.1f}ms" for n, t in med.items()),
            file=sys.stderr,
        )
    out = {
        "benchmark": "moe_layer",
        "device": str(device),
        "dtype": args.dtype,
        "T": T,
        "D": D,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "gemm": "onednn" if moe_onednn else "aten",
        "inputs": "fresh" if args.fresh_inputs else "fixed",
        "threads": torch.get_num_threads(),
        "malloc": malloc,
        "shapes": rows,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
