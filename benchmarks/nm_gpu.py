"""2:4 semi-structured sparse vs dense matmul on a CUDA GPU (fp16 or bf16), at large shapes.

For each square weight ``D x D`` (``--shapes``) and a batch of ``--tokens`` tokens, the 2:4
product ``F.linear(x, to_sparse_semi_structured(W ⊙ M))`` is timed against the dense
``F.linear(x, W ⊙ M)`` of the same masked weight: CUDA events around ``--inner`` calls, the two
variants interleaved in each of ``--repeats`` rounds (their order alternating), the median per
call. Each available backend (cuSPARSELt, CUTLASS) is measured. One JSON line per shape and
backend, then a summary line last with the best and the largest shape's speedup (target >= 1.3x;
gains are known to appear only for large GEMMs). Without a CUDA device of compute capability 8.0+
it prints a JSON line saying so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

TARGET = 1.3
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device (compute capability 8.0+, fp16/bf16); none is available here"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"needs compute capability 8.0+ for 2:4 kernels; this device has {major}.{minor}"
    return None


def _backends(choice: str) -> list[str]:
    have = ["cutlass"]
    if torch.backends.cusparselt.is_available():
        have.insert(0, "cusparselt")
    if choice == "all":
        return have
    if choice not in have:
        raise SystemExit(f"nm_gpu: backend {choice} is not available here (available: {', '.join(have)})")
    return [choice]


def _to_sparse(w: torch.Tensor, backend: str):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    before = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        return to_sparse_semi_structured(w)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = before


def _time(fn, inner: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner  # ms per call


def measure(D: int, T: int, dtype: torch.dtype, backend: str, repeats: int, inner: int, warmup: int) -> dict:
    from sparseroute.weights.patterns import nm_mask

    torch.manual_seed(0)
    w = torch.randn(D, D, device="cuda", dtype=dtype)
    w = (w * nm_mask(w.abs().float(), 2, 4)).contiguous()
    x = torch.randn(T, D, device="cuda", dtype=dtype)
    ws = _to_sparse(w, backend)
    with torch.no_grad():
        ref = F.linear(x, w).float()
        got = F.linear(x, ws).float()
        err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
        variants = {"dense": lambda: F.linear(x, w), "sparse": lambda: F.linear(x, ws)}
        for _ in range(warmup):
            for fn in variants.values():
                fn()
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                times[name].append(_time(variants[name], inner))
    dense, sparse = statistics.median(times["dense"]), statistics.median(times["sparse"])
    paired = statistics.median(d / s for d, s in zip(times["dense"], times["sparse"]))
    flops = 2 * T * D * D
    return {"benchmark": "nm_gpu", "shape": [T, D, D], "dtype": str(dtype).removeprefix("torch."),
            "backend": backend, "dense_ms": round(dense, 4), "sparse_ms": round(sparse, 4),
            "speedup": round(dense / sparse, 4), "paired_speedup": round(paired, 4),
            "dense_tflops": round(flops / dense / 1e9, 2), "max_rel_err": err, "repeats": repeats, "inner": inner}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096,8192,16384", help="square weight sizes D (default 4096,8192,16384)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens in the batch (default 8192)")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--backend", default="all", help="cusparselt, cutlass or all (default: all available)")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds, median (default 15)")
    ap.add_argument("--inner", type=int, default=10, help="calls per timed round (default 10)")
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        shapes = [int(s) for s in args.shapes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--shapes takes sizes like 4096,8192; got {args.shapes!r}")
    if not shapes or any(d < 64 or d % 64 for d in shapes):
        ap.error(f"--shapes: each size must be a multiple of 64; got {args.shapes!r}")
    if args.tokens < 64 or args.tokens % 64:
        ap.error("--tokens must be a multiple of 64")
    if args.repeats < 1 or args.inner < 1 or args.warmup < 0:
        ap.error("--repeats and --inner must be >= 1, --warmup >= 0")
    reason = _unavailable()
    if reason is not None:
        print(json.dumps({"benchmark": "nm_gpu", "ran": False, "reason": reason}))
        return 0
    dtype = DTYPES[args.dtype]
    rows = []
    for backend in _backends(args.backend):
        for D in shapes:
            row = measure(D, args.tokens, dtype, backend, args.repeats, args.inner, args.warmup)
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    best = max(rows, key=lambda r: r["speedup"])
    largest = max(r["shape"][1] for r in rows)
    at_largest = max((r for r in rows if r["shape"][1] == largest), key=lambda r: r["speedup"])
    print(json.dumps({
        "benchmark": "nm_gpu", "ran": True, "device": torch.cuda.get_device_name(), "dtype": args.dtype,
        "tokens": args.tokens, "torch": torch.__version__, "cuda": torch.version.cuda,
        "speedup": best["speedup"], "best": {k: best[k] for k in ("shape", "backend", "speedup")},
        "largest_shape_speedup": at_largest["speedup"], "target": TARGET, "meets_target": best["speedup"] >= TARGET,
        "rows": [{k: r[k] for k in ("shape", "backend", "dense_ms", "sparse_ms", "speedup", "max_rel_err")}
                 for r in rows],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
