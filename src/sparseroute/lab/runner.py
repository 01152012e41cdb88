"""Running a sweep: register it in the store (or find the unfinished one with the same spec), then
train its runs one after another (or ``jobs`` at a time), each in its own folder next to the
store, resuming any run that was interrupted from its last checkpoint.

A run that diverges (non-finite loss or gradient) is a result, not a crash: it is stored as
``failed`` with the message and the sweep goes on. Anything else (a missing GPU, a full disk, ^C)
stops the sweep; the interrupted run stays ``running`` and resumes on the next start.

The worker processes of a ``jobs > 1`` sweep die with the process that started them, even when it
is killed with SIGKILL (Linux's parent-death signal, and a watchdog thread everywhere), so a sweep
started again never trains a run next to a leftover worker.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sparseroute.lab.spec import SweepSpec
from sparseroute.lab.store import Store
from sparseroute._testing import fault
from sparseroute.fileio import LockBusy, file_lock
from sparseroute.train.config import RunConfig
from sparseroute.train.corpus import corpus_for, prepare_run

__all__ = ["register_sweep", "run_sweep", "execute_run", "git_revision", "SweepBusy", "SweepInterrupted"]


class SweepBusy(ValueError):
    """Another process is running this sweep."""


class SweepInterrupted(ValueError):
    """A worker process of a ``jobs > 1`` sweep died (^C or a kill); the sweep can be resumed."""


@lru_cache(maxsize=1)
def git_revision() -> str:
    """The git commit of the sparseroute source in use (``+dirty`` with uncommitted changes), or the
    package version when it is not a git checkout."""
    from sparseroute import __version__

    src = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not rev:
            return f"v{__version__}"
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"v{__version__}"


def _environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "machine": platform.machine()}


def register_sweep(store: Store, spec: SweepSpec, *, new: bool = False, progress: bool = True,
                   corpora: dict | None = None, say: Callable[[str], None] | None = None) -> tuple[int, bool]:
    """Validate every run, prepare the corpora, and find or create the sweep; returns
    ``(sweep_id, created)``. Unless ``new``, the latest sweep of this name whose runs are all runs
    of ``spec`` with the same resolved configurations is reused, finished or not: the runs the spec
    adds (variants, seeds) are added to it, and its stored spec, fingerprint and run positions
    become the new spec's, so that the table and the report show every variant (``say`` is told
    what changed in the spec, in one line)."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    plan = spec.plan()  # every (variant, seed) validated before anything trains
    corpora = {} if corpora is None else corpora
    runs = []
    for p in plan:
        cfg, _ = prepare_run(p.config, corpora=corpora, progress=progress)
        runs.append((p.variant, p.seed, cfg.to_dict()))
    fingerprint = spec.fingerprint()
    if not new:
        found = store.find_sweep(spec.name, fingerprint)
        if found is None:
            found = _same_runs_sweep(store, spec.name, runs)
        if found is not None:
            stored = json.loads(store.sweep(found)["spec_json"])
            store.update_sweep(found, fingerprint, spec.to_dict(), runs)
            change = _spec_change(stored, spec.to_dict())
            if change:
                say(f"sweep {found}: spec changed: {change}; stored spec updated")
            return found, False
    return store.create_sweep(spec.name, fingerprint, spec.to_dict(), f"{spec.name}-{{id}}", runs), True


def _spec_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two stored specs, in words ("" when nothing does)."""
    try:  # both as this version writes them, so that a field added since is no change
        old = SweepSpec.from_dict(old).to_dict()
    except (ValueError, TypeError, KeyError):
        pass
    old_variants = {v.get("name"): v for v in old.get("variants", []) if isinstance(v, dict)}
    new_variants = {v.get("name"): v for v in new.get("variants", []) if isinstance(v, dict)}
    parts = []
    added = [n for n in new_variants if n not in old_variants]
    if added:
        parts.append(f"added variant(s) {', '.join(map(str, added))}")
    seeds = [s for s in new.get("seeds", []) if s not in old.get("seeds", [])]
    if seeds:
        parts.append(f"added seed(s) {', '.join(map(str, seeds))}")
    changed = sorted(k for k in set(old) | set(new) if k not in ("variants", "seeds") and old.get(k) != new.get(k))
    kept_old = [v for n, v in old_variants.items() if n in new_variants]
    kept_new = [v for n, v in new_variants.items() if n in old_variants]
    if kept_old != kept_new:  # a variant written differently (same runs), or the order
        changed.append("variants")
    if [s for s in old.get("seeds", []) if s in new.get("seeds", [])] != \
            [s for s in new.get("seeds", []) if s in old.get("seeds", [])]:
        changed.append("seeds")
    if changed:
        parts.append(f"changed {', '.join(changed)}")
    return ", ".join(parts)


def _same_runs_sweep(store: Store, name: str, runs) -> int | None:
    """The latest sweep of this name (finished or not) whose stored runs are all among ``runs``
    with the same resolved configurations: a sweep that ``runs`` extends by variants or seeds, or
    one started by an earlier sparseroute whose configs lacked fields added since (with their
    defaults)."""
    want = {(v, s, json.dumps(RunConfig.from_dict(c).to_dict(), sort_keys=True, default=list)) for v, s, c in runs}
    for sw in reversed(store.sweeps()):
        if sw["name"] != name:
            continue
        try:
            have = {(r["variant"], int(r["seed"]),
                     json.dumps(RunConfig.from_dict(json.loads(r["config_json"])).to_dict(), sort_keys=True, default=list))
                    for r in store.runs(int(sw["id"]))}
        except (ValueError, TypeError, KeyError):
            continue
        if have and have <= want:
            return int(sw["id"])
    return None


@contextmanager
def _sweep_lock(store: Store, sweep_id: int) -> Iterator[None]:
    lock_path = store.path.parent / f".{store.path.name}.sweep-{sweep_id}.lock"
    try:
        held = file_lock(lock_path, timeout=0)
    except LockBusy:
        raise SweepBusy(f"sweep {sweep_id} is being run by another process; wait for it or stop it") from None
    with held:
        yield


def execute_run(store: Store, run_id: int, *, progress: bool = True, corpora: dict | None = None) -> str:
    """Train (or resume) one run of the store and record it; returns its final status."""
    from sparseroute.train.loop import TrainingDiverged, train

    row = store.run(run_id)
    cfg = RunConfig.from_dict(json.loads(row["config_json"]))
    run_dir = store.path.parent / row["dir"]
    corpus = corpus_for(cfg.data, corpora=corpora, progress=progress)
    resume = (run_dir / "config.json").exists()
    store.start_run(run_id, git_revision(), _environment())
    try:
        final = train(cfg, run_dir, resume=resume, progress=progress, corpus=corpus,
                      on_log=lambda rec: store.log_metric(run_id, rec))
    except TrainingDiverged as e:
        store.fail_run(run_id, str(e))
        return "failed"
    fault("run_trained", int(row["position"]))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    store.finish_run(run_id, final, records)
    return "done"


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_WATCH_SECONDS = 0.5


def _init_worker(parent_pid: int) -> None:
    """Runs first in each worker process of a ``jobs > 1`` sweep: the worker dies with the process
    that started it. Without this, a compare killed with SIGKILL would leave its workers training,
    and a compare started again would train the same runs next to them. On Linux the kernel sends
    SIGKILL when the parent dies (PR_SET_PDEATHSIG: it fires when the parent *thread* that spawned
    the worker ends; run_sweep spawns them from the thread that stays in the pool's ``with`` block
    until they are done); a daemon thread checking the parent every half second covers other
    systems and the moment before the signal was set."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog alone
    if os.getppid() != parent_pid:  # the parent died before the signal was set
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="sparseroute-watch-parent", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(_WATCH_SECONDS)
        if os.getppid() != parent_pid:  # reparented: the compare process is gone
            os._exit(1)  # at once: no cleanup may write to the store or the run folder now


def _worker(store_path: str, run_id: int, threads: int) -> tuple[int, str]:
    torch.set_num_threads(threads)
    with Store(store_path, create=False) as store:
        return run_id, execute_run(store, run_id, progress=False)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop the pool's worker processes (SIGTERM, then SIGKILL after 2 s) and drop the runs not
    started, without waiting on the executor's own threads (a run's folder lock and checkpoints
    make the next start resume it)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # no public handle on them
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 2.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
    pool.shutdown(wait=False, cancel_futures=True)


def run_sweep(store: Store, sweep_id: int, *, jobs: int = 1, retry_failed: bool = False, progress: bool = True,
              say: Callable[[str], None] | None = None, corpora: dict | None = None) -> dict[str, int]:
    """Run every run of the sweep that is not done; returns the count of runs per status."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1; got {jobs!r}")
    with _sweep_lock(store, sweep_id):
        rows = store.runs(sweep_id)
        if retry_failed:
            for r in rows:
                if r["status"] == "failed":
                    store.reset_run(int(r["id"]))
            rows = store.runs(sweep_id)
        # seed-major order (every variant's seed 0, then every variant's seed 1, ...): a sweep cut short
        # still compares every variant; within a seed, spec order
        todo = sorted((r for r in rows if r["status"] in ("pending", "running")),
                      key=lambda r: (r["seed"], r["position"]))
        total = len(rows)
        done_before = total - len(todo)
        if done_before and todo:
            say(f"sweep {sweep_id}: {done_before} of {total} runs already finished; {len(todo)} to go")
        if jobs == 1 or len(todo) <= 1:
            for i, r in enumerate(todo, start=done_before + 1):
                how = "resuming" if r["status"] == "running" else "training"
                say(f"[{i}/{total}] {how} {r['variant']} seed {r['seed']} -> {r['dir']}")
                status = execute_run(store, int(r["id"]), progress=progress, corpora=corpora)
                if status == "failed":
                    say(f"  {r['variant']} seed {r['seed']} diverged: {store.run(int(r['id']))['error']}")
        else:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            say(f"sweep {sweep_id}: {len(todo)} runs, {jobs} at a time, {threads} thread(s) each")
            # the spawn context starts the workers inside submit(), in this thread (see _init_worker)
            pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                                       initargs=(os.getpid(),))
            stopped = False
            try:
                futures = {pool.submit(_worker, str(store.path), int(r["id"]), threads): r for r in todo}
                finished = done_before
                for fut in as_completed(futures):
                    r = futures[fut]
                    _, status = fut.result()
                    finished += 1
                    say(f"[{finished}/{total}] {r['variant']} seed {r['seed']}: {status}")
            except BrokenProcessPool:
                raise SweepInterrupted(
                    f"a worker process of sweep {sweep_id} stopped (interrupted or killed); the finished runs "
                    "are stored, run the same command again to resume the others"
                ) from None
            except KeyboardInterrupt:
                # an interrupt that reached only this process (not the workers, as a terminal's Ctrl-C
                # does): a pool's usual shutdown would wait for the running runs to end
                _stop_workers(pool)
                stopped = True
                raise
            finally:
                if not stopped:
                    pool.shutdown(wait=True)
        counts: dict[str, int] = {}
        for r in store.runs(sweep_id):
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        if counts.get("done", 0) + counts.get("failed", 0) == total:
            store.mark_sweep_finished(sweep_id)
        return counts
