"""Zero-shot relative-norm halting on a trained multi-hop MoE LM: MoE FLOPs saved vs perplexity,
and the wall-clock time of evaluation, over a grid of thresholds τ.

A token stops hopping once ||MoE(h_i)|| / ||h_i|| < τ; later hops dispatch only the tokens still
active, so the saving is real work not done. With ``--run DIR`` the latest checkpoint of a
trained run is used; otherwise a ``tiny`` cosine-routed MoE with ``--hops`` hops is trained first
(``--tokens``, seed ``--seed``) into ``--out``. τ is chosen on the validation split (the largest
saving within +0.5% PPL there) and its effect is measured on the test split, so the figures are not
those of the text τ was tuned on. Prints the validation curve to stderr and one JSON line last;
the target is >= 25% of MoE FLOPs saved at <= +0.5% test PPL.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from sparseroute.data import DataConfig, prepare
from sparseroute.evaluation.diagnostics import halting_choice, halting_taus, routing_profile
from sparseroute.models import TransformerLM, preset
from sparseroute.moe import MoEConfig
from sparseroute.train.checkpoint import find_checkpoint, load_checkpoint
from sparseroute.train.config import RunConfig, TrainConfig, parse_count
from sparseroute.train.corpus import prepare_run
from sparseroute.train.loop import train

QUANTILES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)
TARGET_SAVED, TARGET_PPL = 0.25, 0.5


def load_run(run: Path) -> tuple[TransformerLM, RunConfig]:
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    ckpt = find_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f"halting: {run} has no checkpoint")
    model = TransformerLM(cfg.model)
    model.load_state_dict(load_checkpoint(ckpt)[0], strict=True)
    return model, cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a trained multi-hop run directory (skip training)")
    ap.add_argument("--hops", type=int, default=2, help="hops of the model to train (default 2)")
    ap.add_argument("--tokens", default="600k", help="training budget when training (default 600k)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="where to train (default: a temporary folder)")
    ap.add_argument("--taus", default=None, help="comma-separated thresholds (default: at --quantiles)")
    ap.add_argument("--quantiles", default=",".join(map(str, QUANTILES)),
                    help="thresholds at these quantiles of the model's hop-0 relative update norm")
    ap.add_argument("--eval-tokens", default="64k", help="validation tokens per evaluation (default 64k)")
    ap.add_argument("--repeats", type=int, default=3, help="timed evaluations per τ, median (default 3)")
    args = ap.parse_args(argv)
    eval_tokens = parse_count(args.eval_tokens, "--eval-tokens")
    tmp = None
    if args.run is None:
        tmp = tempfile.TemporaryDirectory() if args.out is None else None
        out = Path(args.out or tmp.name) / "halting-run"
        moe = MoEConfig(num_experts=8, top_k=2, router="cosine", hops=args.hops)
        cfg = RunConfig(model=preset("tiny", moe=moe),
                        data=DataConfig(),
                        train=TrainConfig(tokens=parse_count(args.tokens), batch_size=8, seq_len=256,
                                          eval_tokens=eval_tokens, seed=args.seed, log_every=20, checkpoint_every=0))
        cfg, corpus = prepare_run(cfg, progress=False)
        train(cfg, out, progress=sys.stderr.isatty(), corpus=corpus)
        run = out
    else:
        run = Path(args.run)
    model, cfg = load_run(run)
    if cfg.model.moe is None or cfg.model.moe.hops < 2:
        raise SystemExit("halting: the run must be a multi-hop MoE model (moe.hops >= 2)")
    corpus = prepare(cfg.data)
    kw = {"batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len, "max_tokens": eval_tokens}
    if args.taus:
        taus = [float(t) for t in args.taus.split(",") if t.strip()]
    else:
        taus = halting_taus(model, corpus.val, [float(q) for q in args.quantiles.split(",")], **kw)
    choice = halting_choice(model, corpus.val, corpus.test, taus, max_ppl_change_pct=TARGET_PPL, repeats=args.repeats,
                            **kw)
    rows = choice["validation"]
    print("validation:", file=sys.stderr)
    print(f"{'tau':>6} {'ppl':>9} {'dPPL %':>8} {'MoE FLOPs saved':>16} {'time saved':>11} {'hops/token':>10}",
          file=sys.stderr)
    for r in rows:
        print(f"{r['tau']:>6.3g} {r['ppl']:>9.4f} {r['ppl_change_pct']:>+8.3f} {100 * r['moe_flops_saved']:>15.1f}% "
              f"{100 * r['time_saved']:>10.1f}% {r['hops_per_token']:>10.3f}", file=sys.stderr)
    test = choice["test"]
    print(f"test at tau {choice['tau']:.3g} (chosen on validation): {test['ppl_change_pct']:+.3f}% PPL, "
          f"{100 * test['moe_flops_saved']:.1f}% MoE FLOPs saved, {100 * test['time_saved']:.1f}% time saved",
          file=sys.stderr)
    profile = routing_profile(model, corpus.val, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                              max_tokens=eval_tokens)
    hop_cos = [round(lay["hop_cos"], 4) for lay in profile]
    print(f"cos(dh_0, dh_1) per layer: {hop_cos}", file=sys.stderr)
    print(json.dumps({
        "benchmark": "halting", "hops": cfg.model.moe.hops, "router": cfg.model.moe.router,
        "train_tokens": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len, "eval_tokens": rows[0]["tokens"],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "baseline_ppl": round(choice["test_baseline_ppl"], 4), "hop_cos_per_layer": hop_cos,
        "hop_cos": round(sum(hop_cos) / len(hop_cos), 4), "chosen_on": "validation", "reported_on": "test",
        "best_tau": choice["tau"], "moe_flops_saved": round(test["moe_flops_saved"], 4),
        "ppl_change_pct": round(test["ppl_change_pct"], 4), "time_saved": round(test["time_saved"], 4),
        "target_met": test["moe_flops_saved"] >= TARGET_SAVED and test["ppl_change_pct"] <= TARGET_PPL,
        "curve": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
