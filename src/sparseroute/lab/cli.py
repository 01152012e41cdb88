"""The lab's commands: ``compare`` (run a sweep, then print the table and write the report),
``report`` (regenerate it from the store) and ``runs list|show|delete``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

DEFAULT_STORE = "runs/lab.sqlite"
PROG = "sparseroute"


def _seeds(text: str) -> tuple[int, ...]:
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(t) for t in text.split("-"))
            seeds = tuple(range(lo, hi + 1))
        else:
            seeds = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"--seeds takes a list like 0,1,2 or a range like 0-4; got {text!r}") from None
    if not seeds:
        raise ValueError(f"--seeds selects no seed: {text!r}")
    return seeds


def add_lab_commands(sub) -> None:
    from sparseroute.lab.presets import SWEEP_PRESETS

    p = sub.add_parser(
        "compare", help="the lab: train routing variants x seeds under identical budgets and compare them",
        description="Run a sweep (a preset or a TOML spec): every variant is trained once per seed with the same "
        "model size, token budget, data order and evaluation text; results go to a SQLite store. Stop it at any "
        "moment and run the same command again: finished runs are kept, the interrupted one resumes from its "
        "checkpoint. Ends with a table (mean test PPL with 95% CI, TOST equivalence against the reference "
        "variant) and a self-contained report.html.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(SWEEP_PRESETS), default=None,
                     help="a named sweep: quick (a few minutes), equifinality (a CPU day), equifinality-paper (GPU), "
                     "attention (sparse attention routers at a 2048-token context), nm (2:4 sparsity from scratch), prune "
                     "(one-shot pruning of a trained LM and of MiniLM); docs/lab.md lists them all")
    src.add_argument("--spec", default=None, metavar="FILE.toml", help="a sweep spec file (see docs/lab.md)")
    p.add_argument("--store", default=DEFAULT_STORE, help="the results store; run folders go next to it")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (threads are split among them)")
    p.add_argument("--seeds", default=None, help="override the seeds, e.g. 0,1,2 or 0-4")
    p.add_argument("--tokens", default=None, help="override every run's token budget, e.g. 300k (same as "
                   "--set train.tokens=300k)")
    p.add_argument("--set", action="append", default=None, metavar="SECTION.FIELD=VALUE", dest="settings",
                   help="change the base config of every variant, e.g. model.moe.num_experts=16 (repeatable)")
    p.add_argument("--margin", type=float, default=None, help="TOST equivalence margin in PPL (default: the spec's, 1.0)")
    p.add_argument("--relative-margin", action="store_true", default=None,
                   help="read --margin as a fraction of the reference variant's mean test PPL (e.g. 0.02)")
    p.add_argument("--no-correction", action="store_true", help="verdicts from the raw p-values of each pair "
                   "(default: Holm-adjusted over all tested pairs)")
    p.add_argument("--new", action="store_true", help="start a new sweep even if one with the same runs exists "
                   "(default: resume it, or extend it with the variants and seeds the spec adds)")
    p.add_argument("--retry-failed", action="store_true", help="train the runs that diverged again")
    p.add_argument("--dry-run", action="store_true", help="validate the spec, print the planned runs and the "
                   "estimated wall-clock on this machine (a few timed training steps per variant, or the finished "
                   "runs' times in --store); train nothing")
    p.add_argument("--no-estimate", action="store_true", help="with --dry-run: skip the wall-clock estimate")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    r = sub.add_parser("report", help="print the comparison table and regenerate report.html from the store",
                       description="Recompute the statistics of a sweep from the store and write its report.html.")
    r.add_argument("store", nargs="?", default=DEFAULT_STORE, help="the results store")
    r.add_argument("--sweep", type=int, default=None, help="sweep id (default: the latest; see `sparseroute runs list`)")
    r.add_argument("--out", default=None, help="where to write the HTML (default: report.html in the sweep's folder)")
    r.add_argument("--margin", type=float, default=None, help="TOST margin (default: the sweep spec's)")
    r.add_argument("--relative-margin", action="store_true", default=None, help="--margin is a fraction of the "
                   "reference variant's mean test PPL")
    r.add_argument("--no-correction", action="store_true", help="verdicts from the raw p-values of each pair "
                   "(default: Holm-adjusted over all tested pairs)")
    r.add_argument("--plan-seeds", action="store_true", help="print (and add to the report) how many seeds per "
                   "variant TOST needs to conclude equivalence against the reference, from the sweep's seed spread")
    r.add_argument("--plan-power", type=float, default=0.8, help="the power --plan-seeds aims at (default: 0.8)")
    r.add_argument("--plan-observed-diff", action="store_true", help="--plan-seeds assumes the observed difference "
                   "of the means is the true one (default: 0)")

    runs = sub.add_parser("runs", help="list, show or delete sweeps and runs in the store",
                          description="Inspect the results store.")
    rs = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    lp = rs.add_parser("list", help="sweeps and their runs")
    lp.add_argument("--store", default=DEFAULT_STORE)
    lp.add_argument("--sweep", type=int, default=None, help="only this sweep's runs")
    sp = rs.add_parser("show", help="one run: config, status, timings, final metrics")
    sp.add_argument("run_id", type=int)
    sp.add_argument("--store", default=DEFAULT_STORE)
    sp.add_argument("--json", action="store_true", help="print JSON")
    dp = rs.add_parser("delete", help="delete runs (they are trained again by the next compare) or a whole sweep")
    dp.add_argument("run_ids", type=int, nargs="*", metavar="RUN_ID")
    dp.add_argument("--sweep", type=int, default=None, help="delete this whole sweep")
    dp.add_argument("--store", default=DEFAULT_STORE)
    dp.add_argument("--keep-files", action="store_true", help="keep the run folders (checkpoints) on disk")
    dp.add_argument("--yes", action="store_true", help="do it without asking")


# -- compare ------------------------------------------------------------------------------------


def cmd_compare(args) -> int:
    from sparseroute.kernels import ensure_built
    from sparseroute.lab.presets import sweep_preset
    from sparseroute.lab.prune_sweep import PruneSweepSpec
    from sparseroute.lab.runner import register_sweep, run_sweep
    from sparseroute.lab.spec import load_spec
    from sparseroute.lab.store import Store

    if args.preset is None and args.spec is None:
        raise ValueError("compare needs --preset NAME or --spec FILE.toml (try --preset quick)")
    if args.jobs < 1:  # before anything is created
        raise ValueError(f"--jobs must be 1 or more (runs trained at the same time); got {args.jobs}")
    spec = sweep_preset(args.preset) if args.preset else load_spec(args.spec)
    settings = list(args.settings or [])
    if args.tokens is not None:
        settings.append(f"train.tokens={args.tokens}")
    if isinstance(spec, PruneSweepSpec):
        return _compare_prune(spec, settings, args)
    given = spec
    spec = spec.with_changes(
        seeds=_seeds(args.seeds) if args.seeds else None, settings=settings,
        margin=args.margin, relative_margin=args.relative_margin,
    )
    plan = spec.plan()  # validates every run before anything is trained
    for item in given.ineffective_settings(settings):
        print(f"{PROG}: warning: --set {item} changes no run: every variant sets {item.partition('=')[0].strip()} "
              "itself", file=sys.stderr)
    if args.dry_run:
        _print_plan(spec, plan)
        if not args.no_estimate:
            _print_estimate(spec, plan, args)
        return 0
    store = Store(args.store)  # a store path that cannot be used fails here, before the kernels' build
    try:
        ensure_built(progress=not args.quiet)  # before the workers start, not inside a forward
        sweep_id, created = register_sweep(store, spec, new=args.new, progress=not args.quiet)
        sweep = store.sweep(sweep_id)
        print(f"sweep {sweep_id} ({spec.name}, {len(plan)} runs) {'created' if created else 'resumed'} in "
              f"{store.path}; run folders under {store.path.parent / sweep['dir']}", file=sys.stderr)
        counts = run_sweep(store, sweep_id, jobs=args.jobs, retry_failed=args.retry_failed, progress=not args.quiet)
        _summarise(store, sweep_id, None, spec.margin, spec.relative_margin,
                   correction=None if args.no_correction else "holm")
        if counts.get("failed"):
            print(f"{counts['failed']} run(s) diverged (status failed); see `sparseroute runs list --store {store.path} "
                  f"--sweep {sweep_id}`; --retry-failed trains them again", file=sys.stderr)
    finally:
        store.close()
    return 0


def _compare_prune(spec, settings: list[str], args) -> int:
    """``compare`` of a pruning sweep: train its LM once (when it has one), prune it and the other
    models with every method, repair and pattern, and write the fidelity-vs-sparsity report."""
    from sparseroute.kernels import ensure_built
    from sparseroute.lab.prune_sweep import print_prune_summary, run_prune_sweep
    from sparseroute.lab.store import Store

    if args.jobs != 1:
        print(f"{PROG}: note: a pruning sweep runs its jobs one at a time (each uses every thread); "
              f"--jobs {args.jobs} is ignored", file=sys.stderr)
    spec = spec.with_changes(settings=settings, seeds=_seeds(args.seeds) if args.seeds else None)
    if args.dry_run:
        print(f"pruning sweep {spec.name}: {len(spec.jobs())} jobs (models {', '.join(spec.models)}; methods "
              f"{', '.join(spec.methods)}; repairs {', '.join(r or 'none' for r in spec.repairs)}; patterns "
              f"{', '.join(spec.patterns)}; {spec.calib} calibration samples)")
        for job in spec.jobs():
            print(f"  {job.key}")
        return 0
    store = Store(args.store)
    try:
        ensure_built(progress=not args.quiet)
        sweep_id = run_prune_sweep(store, spec, new=args.new, progress=not args.quiet)
        print_prune_summary(store, sweep_id)
    finally:
        store.close()
    return 0


def _print_estimate(spec, plan, args) -> None:
    """The sweep's wall-clock with --jobs workers on this machine (sparseroute.lab.estimate); the
    store is read only when it exists (a dry run creates nothing)."""
    from sparseroute.lab.estimate import estimate_sweep
    from sparseroute.lab.store import Store

    store = Store(args.store) if Path(args.store).is_file() else None
    try:
        say = None if args.quiet else (lambda msg: print(f"{PROG}: {msg}…", file=sys.stderr))
        est = estimate_sweep(spec, plan, jobs=args.jobs, store=store, progress=say)
    finally:
        if store is not None:
            store.close()
    print(est.line())
    measured = sorted({src for src in est.sources.values()})
    print(f"  (per variant: {'; '.join(measured)}; the steps are timed on this machine as it is now, so other "
          "work running here makes the estimate longer)")


def _print_plan(spec, plan) -> None:
    from rich.console import Console
    from rich.table import Table

    from sparseroute.models.flops import attention_densities, parameter_counts

    t = Table(title=f"sweep {spec.name}: {len(spec.variants)} variants x {len(spec.seeds)} seeds = {len(plan)} runs")
    sparse = any(p.config.model.attention is not None for p in plan)
    weights = any(p.config.train.sparsity is not None for p in plan)
    for col in ("variant", "router", "k", "params (total / active / routing)",
                *(["attention: density at seq_len (router params)"] if sparse else []),
                *(["sparse weights (method)"] if weights else []), "tokens", "steps", "seeds"):
        t.add_column(col)
    for v in spec.variants:
        cfg = next(p.config for p in plan if p.variant == v.name)
        moe = cfg.model.moe
        # a BPE corpus fits the vocabulary when the runs are registered: count at its nominal size
        model = cfg.model.replace(vocab_size=cfg.data.bpe_vocab_size) if cfg.data.tokenizer == "bpe" else cfg.model
        pc = parameter_counts(model)
        attn = []
        if sparse:
            a, rho = cfg.model.attention, attention_densities(cfg.model, cfg.train.seq_len)
            attn = [f"{a.router} {rho[0]:.3f} ({pc['attention_routing']:,})" if a is not None else "dense (SDPA)"]
        tc = cfg.train
        sw = [f"{tc.sparsity} ({tc.sparse_method})" if tc.sparsity is not None else "dense"] if weights else []
        t.add_row(v.name, moe.router if moe else "dense", str(moe.top_k) if moe else "-",
                  f"{pc['total'] / 1e6:.2f}M / {pc['active'] / 1e6:.2f}M / {pc['routing']:,}", *attn, *sw,
                  f"{cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len:,}", str(cfg.train.steps),
                  ",".join(map(str, spec.seeds)))
    Console(stderr=False).print(t)


def _summarise(store, sweep_id: int, out: str | None, margin: float | None, relative: bool | None, *,
               correction: str | None = "holm", plan_power: float | None = None,
               plan_observed_diff: bool = False) -> Path | None:
    """Print the summary (and, with ``plan_power``, the seeds each pair needs for that power) and
    write the report."""
    from sparseroute.lab.report import (
        check_report_path,
        comparison_of,
        print_seed_plans,
        print_summary,
        write_report,
    )
    from sparseroute.lab.stats import plan_seeds

    path = Path(out) if out else store.path.parent / store.sweep(sweep_id)["dir"] / "report.html"
    check_report_path(path)  # a path that cannot take the file is refused before anything is printed
    results = store.results(sweep_id)
    margin = results.spec.get("margin", 1.0) if margin is None else margin
    relative = bool(results.spec.get("relative_margin", False)) if relative is None else relative
    comparison = comparison_of(results, margin=margin, relative=relative, correction=correction)
    print_summary(results, comparison)
    plans = None
    if plan_power is not None:
        plans = plan_seeds(comparison, power=plan_power, observed_diff=plan_observed_diff) if comparison else []
        print_seed_plans(plans, comparison)
    write_report(results, path, margin=margin, relative=relative, correction=correction, plans=plans)
    print(f"report: {path}")
    return path


def cmd_report(args) -> int:
    from sparseroute.lab.prune_sweep import is_prune_spec, print_prune_summary, write_prune_report
    from sparseroute.lab.store import Store

    if not 0.0 < args.plan_power < 1.0:
        raise ValueError(f"--plan-power must be between 0 and 1 (e.g. 0.8), got {args.plan_power:g}")
    with Store(args.store, create=False) as store:
        sweep_id = args.sweep if args.sweep is not None else store.latest_sweep()
        if is_prune_spec(json.loads(store.sweep(sweep_id)["spec_json"])):
            print_prune_summary(store, sweep_id)
            print(f"report: {write_prune_report(store, sweep_id, args.out)}")
            return 0
        _summarise(store, sweep_id, args.out, args.margin, args.relative_margin,
                   correction=None if args.no_correction else "holm",
                   plan_power=args.plan_power if args.plan_seeds else None,
                   plan_observed_diff=args.plan_observed_diff)
    return 0


# -- runs ---------------------------------------------------------------------------------------


def cmd_runs(args) -> int:
    from sparseroute.lab.store import Store

    with Store(args.store, create=False) as store:
        return {"list": _runs_list, "show": _runs_show, "delete": _runs_delete}[args.runs_command](store, args)


def _runs_list(store, args) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sweeps = Table(title=f"sweeps in {store.path}")
    for col in ("id", "name", "created", "runs done / total", "failed", "finished", "folder"):
        sweeps.add_column(col)
    for s in store.sweeps():
        sweeps.add_row(str(s["id"]), s["name"], s["created_at"], f"{s['n_done'] or 0} / {s['n_runs']}",
                       str(s["n_failed"] or 0), s["finished_at"] or "-", s["dir"])
    console.print(sweeps)
    if args.sweep is not None:
        store.sweep(args.sweep)
    rows = store.runs(args.sweep)
    if not rows:
        return 0
    t = Table(title="runs" if args.sweep is None else f"runs of sweep {args.sweep}")
    for col in ("run", "sweep", "variant", "seed", "status", "test ppl", "val ppl", "train s", "attempts", "revision"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["id"]), str(r["sweep_id"]), r["variant"], str(r["seed"]), r["status"],
                  "-" if r["test_ppl"] is None else f"{r['test_ppl']:.3f}",
                  "-" if r["val_ppl"] is None else f"{r['val_ppl']:.3f}",
                  "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}", str(r["attempts"]),
                  (r["git_revision"] or "-")[:12])
    console.print(t)
    return 0


def _runs_show(store, args) -> int:
    r = store.run(args.run_id)
    info = {
        "run": int(r["id"]), "sweep": int(r["sweep_id"]), "variant": r["variant"], "seed": int(r["seed"]),
        "status": r["status"], "folder": str(store.path.parent / r["dir"]), "attempts": int(r["attempts"]),
        "started_at": r["started_at"], "finished_at": r["finished_at"], "train_seconds": r["train_seconds"],
        "git_revision": r["git_revision"], "environment": json.loads(r["environment_json"] or "null"),
        "error": r["error"], "config": json.loads(r["config_json"]),
        "final": json.loads(r["final_json"]) if r["final_json"] else None,
        "metric_records": len(store.metrics(int(r["id"]))),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.pretty import Pretty

    Console().print(Pretty(info))
    return 0


def _runs_delete(store, args) -> int:
    if not args.run_ids and args.sweep is None:
        raise ValueError("runs delete needs RUN_ID(s) or --sweep ID")
    targets = []
    if args.sweep is not None:
        s = store.sweep(args.sweep)
        targets.append(("sweep", args.sweep, f"sweep {args.sweep} ({s['name']}) with all its runs"))
    for rid in args.run_ids:
        r = store.run(rid)
        targets.append(("run", rid, f"run {rid} ({r['variant']} seed {r['seed']} of sweep {r['sweep_id']})"))
    if not args.yes:
        if not sys.stdin.isatty():
            raise ValueError("runs delete would remove " + "; ".join(t[2] for t in targets) + " — pass --yes to confirm")
        answer = input("delete " + "; ".join(t[2] for t in targets) + "? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return 1
    root = store.path.parent.resolve()
    for kind, ident, what in targets:
        folder = store.delete_sweep(ident) if kind == "sweep" else store.delete_run(ident)
        path = (store.path.parent / folder).resolve()
        if not args.keep_files and folder and path != root and root in path.parents and path.exists():
            shutil.rmtree(path)
        print(f"deleted {what}", file=sys.stderr)
    return 0


LAB_COMMANDS = {"compare": cmd_compare, "report": cmd_report, "runs": cmd_runs}
