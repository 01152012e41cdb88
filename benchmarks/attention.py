"""Block-sparse attention against dense causal SDPA: time and peak memory.

B = 1, H = 8, Dh = 64 (``--heads``, ``--head-dim``), fp32, S in ``--seq`` (default 4096, 8192,
16384), block 64: each query block keeps its own block and k - 1 distinct past blocks (chosen at
random, the same selection for every repeat), with k the count that brings the kept fraction of
the causal score matrix closest to ``--density`` (default 1/8). For each S, forward and
forward+backward of :func:`sparseroute.attention.block_sparse_attention` and of
``F.scaled_dot_product_attention(is_causal=True)`` run interleaved in this process, ``--repeats``
times; the speedups are medians of the paired ratios (SDPA time / sparse time).

Peak memory: the rise of the process's resident set (Linux ``VmHWM`` after a reset through
``/proc/self/clear_refs``) during one forward+backward, inputs and their gradients excluded from
neither side (both allocate the same ones); glibc is told to serve every large block by mmap so
freed memory leaves the resident set. ``memory_ratio`` = sparse peak / SDPA peak. Where the
resident set cannot be read (not Linux, or on CUDA: ``torch.cuda.max_memory_allocated``) the
field says so.

Targets: ``speedup_fwd_bwd`` >= 3 at S = 4096 and at S = 16384 with ``memory_ratio`` <= 1.5.
Prints one line per S to stderr and one JSON line last.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sparseroute.attention import block_sparse_attention
from sparseroute.attention.selection import num_blocks, selection_density

TARGET_SPEEDUP, TARGET_MEMORY = 3.0, 1.5


def random_selection(B: int, Hkv: int, N: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[B, Hkv, N, k]: each query block's own block and k - 1 distinct past blocks (all of them
    where it has fewer), -1 in the slots left over."""
    idx = torch.full((B, Hkv, N, k), -1, dtype=torch.int64)
    for n in range(N):
        idx[:, :, n, 0] = n
        if n == 0 or k == 1:
            continue
        take = min(k - 1, n)
        scores = torch.rand(B, Hkv, n, generator=generator)
        idx[:, :, n, 1 : 1 + take] = scores.topk(take, dim=-1).indices
    return idx


def choose_k(S: int, bs: int, density: float) -> int:
    N = num_blocks(S, bs)
    best, best_err = 1, float("inf")
    g = torch.Generator().manual_seed(0)
    for k in range(1, N + 1):
        d = float(selection_density(random_selection(1, 1, N, k, g), S, bs))
        if abs(d - density) < best_err:
            best, best_err = k, abs(d - density)
        if d > density:
            break
    return best


def _retain_nothing() -> bool:
    """Serve every block of 64 KiB or more by mmap (fixed threshold), so freed memory leaves the
    resident set and VmHWM measures what a step really holds."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 16))
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(fn, device: str) -> float | None:
    """The rise of peak memory while ``fn()`` runs (bytes), or None when it cannot be read."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    if not _reset_peak():
        return None
    base = _status_kib("VmRSS")
    fn()
    return float(_status_kib("VmHWM") - base) * 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="4096,8192,16384", help="comma-separated sequence lengths")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--density", type=float, default=1 / 8, help="kept fraction of the causal scores (default 1/8)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats per S (default 5)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--backend", default="auto", help="block_sparse_attention backend (default auto)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("attention: no CUDA device", file=sys.stderr)
        return 2
    retained = _retain_nothing() if dev.type == "cpu" else True
    B, H, Dh, bs = 1, args.heads, args.head_dim, args.block_size
    results = []
    for S in [int(s) for s in args.seq.split(",")]:
        g = torch.Generator().manual_seed(args.seed)
        N = num_blocks(S, bs)
        k = choose_k(S, bs, args.density)
        idx = random_selection(B, H, N, k, g).to(dev)
        density = float(selection_density(idx.cpu(), S, bs))
        q, kk, v = (torch.randn(B, H, S, Dh, generator=g).to(dev).requires_grad_() for _ in range(3))
        grad = torch.randn(B, H, S, Dh, generator=g).to(dev)

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize()

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, kk, v, is_causal=True)

        def sparse_fwd():
            with torch.no_grad():
                block_sparse_attention(q, kk, v, idx, bs, backend=args.backend)

        def sdpa_fb():
            out = F.scaled_dot_product_attention(q, kk, v, is_causal=True)
            torch.autograd.grad(out, (q, kk, v), grad)

        def sparse_fb():
            out = block_sparse_attention(q, kk, v, idx, bs, backend=args.backend)
            torch.autograd.grad(out, (q, kk, v), grad)

        def timed(fn):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t0

        for fn in (sdpa_fwd, sparse_fwd, sdpa_fb, sparse_fb):  # warm-up
            fn()
        t = {name: [] for name in ("sdpa_fwd", "sparse_fwd", "sdpa_fb", "sparse_fb")}
        for _ in range(args.repeats):
            for name, fn in (("sdpa_fwd", sdpa_fwd), ("sparse_fwd", sparse_fwd), ("sdpa_fb", sdpa_fb), ("sparse_fb", sparse_fb)):
                t[name].append(timed(fn))
        mem_sdpa = peak_bytes(sdpa_fb, dev.type)
        mem_sparse = peak_bytes(sparse_fb, dev.type)
        row = {
            "S": S,
            "k": k,
            "density": round(density, 4),
            "sdpa_fwd_s": round(statistics.median(t["sdpa_fwd"]), 4),
            "sparse_fwd_s": round(statistics.median(t["sparse_fwd"]), 4),
            "sdpa_fwd_bwd_s": round(statistics.median(t["sdpa_fb"]), 4),
            "sparse_fwd_bwd_s": round(statistics.median(t["sparse_fb"]), 4),
            "speedup_fwd": round(statistics.median(a / b for a, b in zip(t["sdpa_fwd"], t["sparse_fwd"])), 3),
            "speedup_fwd_bwd": round(statistics.median(a / b for a, b in zip(t["sdpa_fb"], t["sparse_fb"])), 3),
            "peak_sdpa_mib": None if mem_sdpa is None else round(mem_sdpa / 2**20, 1),
            "peak_sparse_mib": None if mem_sparse is None else round(mem_sparse / 2**20, 1),
            "memory_ratio": None if not (mem_sdpa and mem_sparse) else round(mem_sparse / mem_sdpa, 3),
        }
        results.append(row)
        print(
            f"S={S} k={k} density={density:.3f}: fwd {row['speedup_fwd']:.2f}x, fwd+bwd "
            f"{row['speedup_fwd_bwd']:.2f}x (SDPA {row['sdpa_fwd_bwd_s']:.3f}s, sparse {row['sparse_fwd_bwd_s']:.3f}s), "
            f"peak memory {row['peak_sparse_mib']} vs {row['peak_sdpa_mib']} MiB",
            file=sys.stderr,
        )
    met = [
        r["speedup_fwd_bwd"] >= TARGET_SPEEDUP and r["memory_ratio"] is not None and r["memory_ratio"] <= TARGET_MEMORY
        for r in results
        if r["S"] in (4096, 16384)
    ]
    out = {
        "benchmark": "attention",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "heads": H,
        "head_dim": Dh,
        "block_size": bs,
        "malloc": "mmap>=64KiB" if retained else "system",
        "results": results,
        "target": {"speedup_fwd_bwd": TARGET_SPEEDUP, "memory_ratio": TARGET_MEMORY, "at_S": [4096, 16384]},
        "target_met": bool(met) and all(met),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
