"""Training throughput: the `tiny` dense LM vs `tiny` with top-2-of-8 MoE FFNs of the same active
parameters (expert hidden = dense hidden / 2), interleaved in one process.

Each timed block is ``--steps`` full training steps as ``sparseroute train`` runs them (forward,
backward, clip, AdamW step, router hooks) on batches of the stdlib corpus; the median over
``--repeats`` blocks is taken after one warm-up block. Prints a table to stderr and one JSON line
last.

The headline ``moe_over_dense_tokens_per_s`` is the ratio of the two median throughputs. Because
the speed of a shared machine drifts over seconds, the JSON also gives the ratio within each
repeat (the dense block and the MoE block that ran next to each other): its median and its
range, so that one run shows how far a single figure can be trusted, and a 95% bootstrap
interval of the headline (the repeats resampled as dense/MoE pairs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from sparseroute.data import DataConfig, get_batch, prepare
from sparseroute.lab.stats import median_ratio_ci
from sparseroute.models import TransformerLM, preset
from sparseroute.kernels import ensure_built
from sparseroute.kernels.cpuinfo import cpu_model
from sparseroute.moe import MoEConfig
from sparseroute.train.config import TrainConfig
from sparseroute.train.loop import clip_grad_norm, make_optimizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="training steps per timed block (default 5)")
    ap.add_argument("--repeats", type=int, default=21, help="timed blocks per model (default 21)")
    ap.add_argument("--router", default="topk", help="router of the MoE model (default topk)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        ap.error("--steps and --repeats must be >= 1")
    device = torch.device(args.device)
    if device.type == "cpu":
        ensure_built(progress=True)
    corpus = prepare(DataConfig(max_bytes=4_000_000))
    tc = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, tokens=10**9)
    dense_cfg = replace(preset("tiny"), max_seq_len=max(args.seq_len, preset("tiny").max_seq_len))
    moe_cfg = replace(dense_cfg, moe=MoEConfig(num_experts=8, top_k=2, router=args.router))
    runs = {}
    for name, cfg in (("dense", dense_cfg), ("moe", moe_cfg)):
        torch.manual_seed(0)
        model = TransformerLM(cfg).to(device)
        runs[name] = {"model": model, "opt": make_optimizer(model, tc), "step": 0, "times": []}
    tokens_per_block = args.steps * args.batch_size * args.seq_len

    def block(run) -> float:
        model, opt = run["model"], run["opt"]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            x, y = get_batch(corpus.train, args.batch_size, args.seq_len, run["step"], 0)
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1)) + out.aux_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm(model.parameters(), 1.0)
            opt.step()
            model.after_optimizer_step()
            run["step"] += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for rep in range(args.repeats + 1):
        for run in runs.values():
            t = block(run)
            if rep:
                run["times"].append(t)
    tps = {name: tokens_per_block / statistics.median(r["times"]) for name, r in runs.items()}
    params = {name: sum(p.numel() for p in r["model"].parameters()) for name, r in runs.items()}
    paired = sorted(d / m for d, m in zip(runs["dense"]["times"], runs["moe"]["times"]))
    ci = median_ratio_ci(runs["dense"]["times"], runs["moe"]["times"])  # = the tokens/s ratio MoE/dense
    for name in runs:
        print(f"{name:6s} {tps[name]:10,.0f} tokens/s  {params[name]:,} parameters", file=sys.stderr)
    print(f"moe/dense per repeat: {' '.join(f'{r:.3f}' for r in paired)}", file=sys.stderr)
    print(json.dumps({
        "benchmark": "train_throughput",
        "device": str(device),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "router": args.router,
        "dense_tokens_per_s": round(tps["dense"], 1),
        "moe_tokens_per_s": round(tps["moe"], 1),
        "moe_over_dense_tokens_per_s": round(tps["moe"] / tps["dense"], 3),
        "paired_ratio_median": round(statistics.median(paired), 3),
        "paired_ratio_range": [round(paired[0], 3), round(paired[-1], 3)],
        "ratio_ci95": [round(ci[0], 3), round(ci[1], 3)],
        "repeats": args.repeats,
        "steps_per_block": args.steps,
        "dense_parameters": params["dense"],
        "moe_parameters": params["moe"],
        "threads": torch.get_num_threads(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
