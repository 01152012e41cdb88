"""The lab's results store: one SQLite file (``runs/lab.sqlite`` by default) holding sweeps, their
runs (full resolved config, seed, status, timings, sparseroute's git revision), the per-interval
metrics and the final metrics.

Every change is one transaction, so a process killed at any moment leaves the store as it was
before or after that change, never between. Metrics are keyed by (run, step): a resumed run that
logs an interval again replaces the row instead of adding a second one, and a finished run's
metrics are rewritten from its own log in the same transaction that marks it done.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sparseroute.fileio import check_folder_path
from sparseroute.lab.results import RunResult, SweepResults

__all__ = ["Store", "StoreError", "STATUSES"]

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    dir TEXT NOT NULL,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    sweep_id INTEGER NOT NULL REFERENCES sweeps(id) ON DELETE CASCADE,
    variant TEXT NOT NULL,
    seed INTEGER NOT NULL,
    position INTEGER NOT NULL,
    config_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    dir TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at TEXT,
    finished_at TEXT,
    train_seconds REAL,
    git_revision TEXT,
    environment_json TEXT,
    error TEXT,
    UNIQUE (sweep_id, variant, seed)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    loss REAL,
    record_json TEXT NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS finals (
    run_id INTEGER PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    val_ppl REAL NOT NULL,
    test_ppl REAL NOT NULL,
    val_loss REAL NOT NULL,
    test_loss REAL NOT NULL,
    flops_json TEXT NOT NULL,
    final_json TEXT NOT NULL
);
"""


class StoreError(ValueError):
    """The store file is not a sparseroute store, or a sweep/run id does not exist."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Store:
    """A connection to one results store (created on first use)."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreError(f"no results store at {self.path} (run `sparseroute compare` first)")
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"{self.path} is a folder; the store is a file such as runs/lab.sqlite")
        try:
            check_folder_path(self.path.parent, "the results store's folder")
        except ValueError as e:
            raise StoreError(f"cannot create the results store {self.path}: {e}") from None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the results store {self.path}: {e}") from None
        self.conn.row_factory = sqlite3.Row
        try:
            self.conn.execute("PRAGMA foreign_keys = ON")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise StoreError(f"{self.path} is not a sparseroute results store ({e})") from None
        if tables and version != SCHEMA_VERSION:
            self.conn.close()
            raise StoreError(
                f"{self.path} is not a sparseroute results store of schema {SCHEMA_VERSION} "
                f"(user_version {version}, tables {', '.join(sorted(tables))})"
            )
        self.conn.execute("PRAGMA journal_mode = WAL")
        if not tables:
            with self.transaction() as c:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All statements inside commit together or not at all."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # -- sweeps ------------------------------------------------------------------------------
    def create_sweep(self, name: str, fingerprint: str, spec: dict[str, Any], directory: str,
                     runs: list[tuple[str, int, dict[str, Any]]]) -> int:
        """A new sweep with every run pending; ``directory`` may contain ``{id}``."""
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO sweeps (name, fingerprint, spec_json, dir, created_at) VALUES (?, ?, ?, ?, ?)",
                (name, fingerprint, json.dumps(spec, sort_keys=True), "", _now()),
            )
            sweep_id = int(cur.lastrowid)
            sweep_dir = directory.format(id=sweep_id)
            c.execute("UPDATE sweeps SET dir = ? WHERE id = ?", (sweep_dir, sweep_id))
            self._insert_runs(c, sweep_id, sweep_dir, runs)
        return sweep_id

    def update_sweep(self, sweep_id: int, fingerprint: str, spec: dict[str, Any],
                     runs: list[tuple[str, int, dict[str, Any]]]) -> int:
        """Make a stored sweep the sweep of ``spec``, whose ``runs`` include all of its own: add the
        missing runs (pending), renumber every run's position to its place in ``runs``, store the
        spec and its fingerprint, and reopen a finished sweep that gained runs; one transaction.
        Returns the count of runs added."""
        with self.transaction() as c:
            added = self._insert_runs(c, sweep_id, self.sweep(sweep_id)["dir"], runs)
            for pos, (variant, seed, _) in enumerate(runs):
                c.execute("UPDATE runs SET position = ? WHERE sweep_id = ? AND variant = ? AND seed = ?",
                          (pos, sweep_id, variant, seed))
            c.execute("UPDATE sweeps SET fingerprint = ?, spec_json = ? WHERE id = ?",
                      (fingerprint, json.dumps(spec, sort_keys=True), sweep_id))
            if added:
                c.execute("UPDATE sweeps SET finished_at = NULL WHERE id = ?", (sweep_id,))
        return added

    @staticmethod
    def _insert_runs(c, sweep_id: int, sweep_dir: str, runs) -> int:
        added = 0
        for pos, (variant, seed, config) in enumerate(runs):
            cur = c.execute(
                "INSERT OR IGNORE INTO runs (sweep_id, variant, seed, position, config_json, status, dir) "
                "VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                (sweep_id, variant, seed, pos, json.dumps(config, sort_keys=True), f"{sweep_dir}/{variant}/seed-{seed}"),
            )
            added += cur.rowcount
        return added

    def find_sweep(self, name: str, fingerprint: str) -> int | None:
        row = self.conn.execute(
            "SELECT id FROM sweeps WHERE name = ? AND fingerprint = ? ORDER BY id DESC LIMIT 1", (name, fingerprint)
        ).fetchone()
        return None if row is None else int(row["id"])

    def sweeps(self) -> list[sqlite3.Row]:
        return self.conn.execute(
            "SELECT s.*, COUNT(r.id) AS n_runs, SUM(r.status = 'done') AS n_done, SUM(r.status = 'failed') AS n_failed "
            "FROM sweeps s LEFT JOIN runs r ON r.sweep_id = s.id GROUP BY s.id ORDER BY s.id"
        ).fetchall()

    def sweep(self, sweep_id: int) -> sqlite3.Row:
        row = self.conn.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
        if row is None:
            known = ", ".join(str(r["id"]) for r in self.conn.execute("SELECT id FROM sweeps ORDER BY id"))
            raise StoreError(f"no sweep {sweep_id} in {self.path} (sweeps: {known or 'none'})")
        return row

    def latest_sweep(self) -> int:
        row = self.conn.execute("SELECT MAX(id) AS id FROM sweeps").fetchone()
        if row is None or row["id"] is None:
            raise StoreError(f"{self.path} holds no sweep yet")
        return int(row["id"])

    def mark_sweep_finished(self, sweep_id: int) -> None:
        with self.transaction() as c:
            c.execute("UPDATE sweeps SET finished_at = ? WHERE id = ?", (_now(), sweep_id))

    # -- runs --------------------------------------------------------------------------------
    def runs(self, sweep_id: int | None = None) -> list[sqlite3.Row]:
        q = ("SELECT r.*, f.test_ppl, f.val_ppl FROM runs r LEFT JOIN finals f ON f.run_id = r.id")
        if sweep_id is None:
            return self.conn.execute(q + " ORDER BY r.sweep_id, r.position").fetchall()
        return self.conn.execute(q + " WHERE r.sweep_id = ? ORDER BY r.position", (sweep_id,)).fetchall()

    def run(self, run_id: int) -> sqlite3.Row:
        row = self.conn.execute(
            "SELECT r.*, f.final_json FROM runs r LEFT JOIN finals f ON f.run_id = r.id WHERE r.id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id} in {self.path} (see `sparseroute runs list`)")
        return row

    def start_run(self, run_id: int, git_revision: str, environment: dict[str, Any]) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status = 'running', attempts = attempts + 1, error = NULL, "
                "started_at = COALESCE(started_at, ?), git_revision = ?, environment_json = ? WHERE id = ?",
                (_now(), git_revision, json.dumps(environment, sort_keys=True), run_id),
            )

    def log_metric(self, run_id: int, record: dict[str, Any]) -> None:
        with self.transaction() as c:
            self._put_metric(c, run_id, record)

    @staticmethod
    def _put_metric(c, run_id: int, record: dict[str, Any]) -> None:
        c.execute(
            "INSERT OR REPLACE INTO metrics (run_id, step, tokens, loss, record_json) VALUES (?, ?, ?, ?, ?)",
            (run_id, int(record["step"]), int(record["tokens"]), record.get("loss"), json.dumps(record, sort_keys=True)),
        )

    def finish_run(self, run_id: int, final: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """Mark a run done with its final metrics and its whole metrics log, in one transaction."""
        with self.transaction() as c:
            c.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            for rec in records:
                self._put_metric(c, run_id, rec)
            c.execute(
                "INSERT OR REPLACE INTO finals (run_id, val_ppl, test_ppl, val_loss, test_loss, flops_json, final_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, final["val_ppl"], final["test_ppl"], final["val_loss"], final["test_loss"],
                 json.dumps(final["flops_per_token"], sort_keys=True), json.dumps(final, sort_keys=True)),
            )
            c.execute(
                "UPDATE runs SET status = 'done', finished_at = ?, train_seconds = ?, error = NULL WHERE id = ?",
                (_now(), final.get("train_seconds"), run_id),
            )

    def fail_run(self, run_id: int, error: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?", (_now(), error, run_id))

    def reset_run(self, run_id: int) -> None:
        """A failed run goes back to pending (``--retry-failed``)."""
        with self.transaction() as c:
            c.execute("UPDATE runs SET status = 'pending', error = NULL WHERE id = ?", (run_id,))

    def delete_run(self, run_id: int) -> str:
        """Remove a run and its metrics; returns its folder (relative to the store) for the caller."""
        row = self.run(run_id)
        with self.transaction() as c:
            c.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        return str(row["dir"])

    def delete_sweep(self, sweep_id: int) -> str:
        row = self.sweep(sweep_id)
        with self.transaction() as c:
            c.execute("DELETE FROM sweeps WHERE id = ?", (sweep_id,))
        return str(row["dir"])

    def metrics(self, run_id: int) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT record_json FROM metrics WHERE run_id = ? ORDER BY step", (run_id,))
        return [json.loads(r["record_json"]) for r in rows]

    def row_counts(self) -> dict[str, int]:
        return {t: int(self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
                for t in ("sweeps", "runs", "metrics", "finals")}

    # -- read back ---------------------------------------------------------------------------
    def results(self, sweep_id: int) -> SweepResults:
        """The sweep as plain data for the statistics and the report."""
        sweep = self.sweep(sweep_id)
        spec = json.loads(sweep["spec_json"])
        runs = []
        for r in self.conn.execute(
            "SELECT r.*, f.final_json FROM runs r LEFT JOIN finals f ON f.run_id = r.id "
            "WHERE r.sweep_id = ? ORDER BY r.position", (sweep_id,)
        ):
            runs.append(RunResult(
                run_id=int(r["id"]), variant=r["variant"], seed=int(r["seed"]), status=r["status"],
                config=json.loads(r["config_json"]),
                final=json.loads(r["final_json"]) if r["final_json"] else None,
                metrics=self.metrics(int(r["id"])), train_seconds=r["train_seconds"],
                git_revision=r["git_revision"], error=r["error"],
            ))
        variants = [v["name"] for v in spec.get("variants", [])] or sorted({r.variant for r in runs})
        return SweepResults(
            sweep_id=int(sweep["id"]), name=sweep["name"], spec=spec, variants=variants, runs=runs,
            created_at=sweep["created_at"], reference=spec.get("reference"),
        )
