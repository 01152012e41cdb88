"""The ``sparseroute`` command: ``compare`` (the lab), ``report``, ``runs``, ``train`` and ``eval``
(``python -m sparseroute`` works too)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

PROG = "sparseroute"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _router_options(items: list[str] | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--router-option takes KEY=VALUE (e.g. d_space=32); got {item!r}")
        opts[key.strip()] = _parse_value(value.strip())
    return opts


def _moe_layers(text: str):
    if text in ("all", "every_other"):
        return text
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"--moe-layers takes all, every_other or a list like 0,2,3; got {text!r}") from None


CONFIG_FLAGS = (
    "preset depth router experts top_k expert_d_ff moe_layers router_option capacity_factor dense "
    "tokens batch_size seq_len lr warmup weight_decay grad_clip seed eval_tokens eval_every log_every "
    "checkpoint_every device corpus tokenizer bpe_vocab max_bytes cache_dir"
).split()


def build_run_config(args: argparse.Namespace):
    """Map the train flags onto RunConfig (preset first, then each flag given)."""
    from sparseroute.data import DataConfig
    from sparseroute.models import MoESettings, preset, sized
    from sparseroute.train.config import RunConfig, TrainConfig, parse_count

    model = sized(args.depth) if args.depth is not None else preset(args.preset or "tiny")
    moe_flags = [args.router, args.experts, args.top_k, args.expert_d_ff, args.moe_layers, args.router_option,
                 args.capacity_factor]
    if args.dense and any(v is not None for v in moe_flags):
        raise ValueError("--dense cannot be combined with MoE flags (--router, --experts, --top-k, ...)")
    if args.dense:
        model = replace(model, moe=None)
    elif any(v is not None for v in moe_flags):
        moe = model.moe or MoESettings()
        changes: dict[str, Any] = {}
        if args.router is not None:
            changes["router"] = args.router
        if args.experts is not None:
            changes["num_experts"] = args.experts
        if args.top_k is not None:
            changes["top_k"] = args.top_k
        if args.expert_d_ff is not None:
            changes["d_ff"] = args.expert_d_ff
        if args.moe_layers is not None:
            changes["layers"] = _moe_layers(args.moe_layers)
        if args.router_option is not None:
            changes["router_options"] = _router_options(args.router_option)
        if args.capacity_factor is not None:
            changes["capacity_factor"] = args.capacity_factor
        model = replace(model, moe=replace(moe, **changes))
    data_kw: dict[str, Any] = {}
    for flag, field in (("corpus", "corpus"), ("tokenizer", "tokenizer"), ("bpe_vocab", "bpe_vocab_size"),
                        ("cache_dir", "cache_dir")):
        if getattr(args, flag) is not None:
            data_kw[field] = getattr(args, flag)
    if args.max_bytes is not None:
        data_kw["max_bytes"] = parse_count(args.max_bytes, "--max-bytes")
    data = DataConfig(**data_kw)
    train_kw: dict[str, Any] = {}
    if args.tokens is not None:
        train_kw["tokens"] = parse_count(args.tokens, "--tokens")
    if args.eval_tokens is not None:
        train_kw["eval_tokens"] = parse_count(args.eval_tokens, "--eval-tokens")
    for flag, field in (("batch_size", "batch_size"), ("seq_len", "seq_len"), ("lr", "lr"),
                        ("warmup", "warmup_fraction"), ("weight_decay", "weight_decay"), ("grad_clip", "grad_clip"),
                        ("seed", "seed"), ("eval_every", "eval_every"), ("log_every", "log_every"),
                        ("checkpoint_every", "checkpoint_every"), ("device", "device")):
        if getattr(args, flag) is not None:
            train_kw[field] = getattr(args, flag)
    train = TrainConfig(**train_kw)
    if train.seq_len > model.max_seq_len:
        model = replace(model, max_seq_len=train.seq_len)
    return RunConfig(model=model, data=data, train=train)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a small LM (dense or MoE) on a fixed token budget",
        description="Train a small decoder LM. Every run is reproducible from its seed and can be killed and "
        "resumed bit-identically with --resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--preset", choices=["tiny", "small", "paper"], default=None,
                   help="model size preset (default tiny; see docs/training.md)")
    m.add_argument("--depth", type=int, default=None, help="the single size dial: layers = depth, width grows with it "
                   "(overrides --preset)")
    m.add_argument("--router", default=None, help="make the FFNs MoE layers with this router "
                   "(topk, sigmoid, expert_choice, cosine, hash, random_fixed, sinkhorn, relu, ...)")
    m.add_argument("--experts", type=int, default=None, help="number of experts per MoE layer (default 8)")
    m.add_argument("--top-k", type=int, default=None, help="experts per token (default 2)")
    m.add_argument("--expert-d-ff", type=int, default=None,
                   help="expert hidden size (default: dense d_ff / top_k, the same active parameters)")
    m.add_argument("--moe-layers", default=None, help="which FFNs are MoE: all, every_other, or e.g. 0,2,3")
    m.add_argument("--router-option", action="append", default=None, metavar="KEY=VALUE",
                   help="a router option, e.g. d_space=32 (repeatable; values parsed as JSON)")
    m.add_argument("--capacity-factor", type=float, default=None, help="drop tokens beyond this capacity factor "
                   "(default: dropless)")
    m.add_argument("--dense", action="store_true", default=None, help="force a dense model")
    d = p.add_argument_group("data")
    d.add_argument("--corpus", default=None, help="stdlib (default: this Python's standard library source), "
                   "text:PATH, or hf:NAME[:CONFIG]")
    d.add_argument("--tokenizer", choices=["bytes", "bpe"], default=None, help="tokenizer (default bytes)")
    d.add_argument("--bpe-vocab", type=int, default=None, help="BPE vocabulary size (default 4096)")
    d.add_argument("--max-bytes", default=None, help="use at most this much corpus text, e.g. 5M")
    d.add_argument("--cache-dir", default=None, help="tokenised-corpus cache (default ~/.cache/sparseroute)")
    t = p.add_argument_group("training")
    t.add_argument("--tokens", default=None, help="token budget, e.g. 300k or 2M (default 2M)")
    t.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16)")
    t.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256)")
    t.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default 3e-3)")
    t.add_argument("--warmup", type=float, default=None, help="warmup as a fraction of the steps (default 0.05)")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0.1)")
    t.add_argument("--grad-clip", type=float, default=None, help="global gradient-norm clip, 0 = off (default 1.0)")
    t.add_argument("--seed", type=int, default=None, help="seed for init, data order and routing noise (default 0)")
    t.add_argument("--eval-tokens", default=None, help="tokens per validation/test evaluation (default 64k)")
    t.add_argument("--eval-every", type=int, default=None, help="validate every N steps, 0 = only at the end")
    t.add_argument("--log-every", type=int, default=None, help="log metrics every N steps (default 10)")
    t.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (default 50)")
    t.add_argument("--device", default=None, help="cpu (default) or cuda")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="run directory (config, checkpoints, metrics.jsonl, final.json)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bar; print only the final JSON")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation and test perplexity of a run's latest checkpoint",
                       description="Print validation and test perplexity of the latest checkpoint in RUN.")
    p.add_argument("run", help="run directory written by `sparseroute train --out`")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser() -> argparse.ArgumentParser:
    from sparseroute.lab.cli import add_lab_commands

    ap = _Parser(prog=PROG, description="sparseroute: sparse routing mechanisms and a lab to compare them.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    add_lab_commands(sub)
    _add_train(sub)
    _add_eval(sub)
    return ap


def cmd_train(args) -> int:
    from sparseroute.data import prepare
    from sparseroute.train.loop import resolve_vocab, train

    given = any(getattr(args, f) is not None for f in CONFIG_FLAGS)
    cfg = None
    if not args.resume or given:
        cfg = build_run_config(args)
        if not args.resume:
            corpus = prepare(cfg.data, progress=not args.quiet)
            cfg = resolve_vocab(cfg, corpus)
            final = train(cfg, args.out, progress=not args.quiet, corpus=corpus)
            _print_final(final, args.quiet)
            return 0
    final = train(cfg, args.out, resume=True, progress=not args.quiet)
    _print_final(final, args.quiet)
    return 0


def _print_final(final: dict, quiet: bool) -> None:
    if not quiet:
        print(f"val ppl {final['val_ppl']:.3f}  test ppl {final['test_ppl']:.3f}  "
              f"({final['tokens']:,} tokens, {final['flops_per_token']['total'] / 1e6:.2f} MFLOPs/token)",
              file=sys.stderr)
    print(json.dumps(final))


def cmd_eval(args) -> int:
    from sparseroute.train.loop import evaluate_run

    res = evaluate_run(args.run)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"step {res['step']}: validation perplexity {res['val_ppl']:.4f}, test perplexity {res['test_ppl']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from sparseroute.lab.cli import LAB_COMMANDS
    from sparseroute.train.loop import TrainingDiverged

    try:
        return {"train": cmd_train, "eval": cmd_eval, **LAB_COMMANDS}[args.command](args)
    except TrainingDiverged as e:
        print(f"{PROG}: stopped: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "run the same command again" if args.command == "compare" else "continue with --resume"
        print(f"{PROG}: interrupted; {again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
