"""The run store: every training run, its config, status and metric series, in one SQLite file.

One row per run (a model trained from one seed) in ``runs``; runs trained
together in one stacked job share a ``group_id``, and the group's resumable
checkpoint lives next to the database in ``checkpoints/<group_id>.pt``.
Metric series are rows ``(run_id, step, name, value)``.

SQLite runs in WAL mode with a busy timeout, so several processes (two
``bnlab compare`` at once, the web app reading while a job writes) can share
one store. Every write is one short transaction: a killed process leaves the
store consistent, and :meth:`RunStore.truncate_metrics` drops what was logged
after the checkpoint a resumed run restarts from.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bnlab._paths import user_data_path

__all__ = ["RunStore", "RunRecord", "default_store_path", "config_key", "StoreError"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id           TEXT PRIMARY KEY,
    group_id     TEXT NOT NULL,
    group_key    TEXT NOT NULL,
    label        TEXT NOT NULL,
    seed         INTEGER NOT NULL,
    config       TEXT NOT NULL,
    code_version TEXT NOT NULL,
    status       TEXT NOT NULL,
    created      REAL NOT NULL,
    started      REAL,
    finished     REAL,
    wall_seconds REAL NOT NULL DEFAULT 0,
    steps_done   INTEGER NOT NULL DEFAULT 0,
    total_steps  INTEGER NOT NULL,
    pid          INTEGER,
    host         TEXT,
    summary      TEXT
);
CREATE INDEX IF NOT EXISTS runs_group ON runs(group_id);
CREATE INDEX IF NOT EXISTS runs_key ON runs(group_key);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id),
    step   INTEGER NOT NULL,
    name   TEXT NOT NULL,
    value  REAL,
    PRIMARY KEY (run_id, name, step)
);
"""

STATUSES = ("created", "running", "interrupted", "finished", "failed")
SCHEMA_VERSION = 1
# What runs stored before schema version 1 were made with (bnlab.train.TrainConfig's newer fields).
LEGACY_TRAIN_SETTINGS = {"data_order": "shared", "eval_subset": 0, "eval_train_subset": 0}
LEGACY_MODEL_SETTINGS = {"norm_momentum": None, "norm_eps": None}  # bnlab.models.ModelSpec's newer fields


class StoreError(RuntimeError):
    """The store cannot do what was asked (unknown run, unreadable file); the message says why."""


def default_store_path() -> Path:
    """``$BNLAB_STORE``, else ``$XDG_DATA_HOME/bnlab/runs.sqlite``, else ``~/.local/share/bnlab/runs.sqlite``."""
    return user_data_path("runs.sqlite", env="BNLAB_STORE")


def config_key(config: dict) -> str:
    """A stable hash of a JSON-able config: equal configs, equal keys."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunRecord:
    id: str
    group_id: str
    group_key: str
    label: str
    seed: int
    config: dict
    code_version: str
    status: str
    created: float
    started: float | None
    finished: float | None
    wall_seconds: float
    steps_done: int
    total_steps: int
    pid: int | None
    host: str | None
    summary: dict | None

    @property
    def effective_status(self) -> str:
        """``running`` rows whose process is gone (killed, machine rebooted) read as ``interrupted``."""
        if self.status == "running" and not _process_alive(self.pid, self.host):
            return "interrupted"
        return self.status


def _process_alive(pid: int | None, host: str | None) -> bool:
    if pid is None:
        return False
    if host != socket.gethostname():
        return True  # cannot look at another machine's processes: trust the row
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    """A handle on one store file (created on first use)."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else default_store_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._db.row_factory = sqlite3.Row
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable bnlab run store ({exc}); "
                             "point --store/BNLAB_STORE at another file") from exc

    def _migrate(self) -> None:
        """Bring runs stored by older bnlab versions up to today's config schema, once per file.

        Version 1 (2026-12-02): training settings added since (per-seed batch order, cheap
        evaluation) get the values those runs were made with, so every run made with shared
        batches says so in its config (``data_order: shared``), and its group key is that of
        the completed config (a resume finds it).
        """
        if self._db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        with self._transaction():
            if self._db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
                return  # another process migrated it meanwhile
            for row in self._db.execute("SELECT id, config FROM runs").fetchall():
                config = json.loads(row["config"])
                train = config.get("train")
                if not isinstance(train, dict) or "data_order" in train:
                    continue
                train.update(LEGACY_TRAIN_SETTINGS, eval_bf16=bool(train.get("bf16", False)))
                if isinstance(config.get("model"), dict):
                    for name, value in LEGACY_MODEL_SETTINGS.items():
                        config["model"].setdefault(name, value)
                key = config_key({k: v for k, v in config.items() if k != "seed"})
                self._db.execute("UPDATE runs SET config = ?, group_key = ? WHERE id = ?",
                                 (json.dumps(config, sort_keys=True), key, row["id"]))
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def checkpoint_dir(self) -> Path:
        return self.path.parent / "checkpoints"

    def checkpoint_path(self, group_id: str) -> Path:
        return self.checkpoint_dir / f"{group_id}.pt"

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------

    def create_group(self, group_key: str, runs: Sequence[tuple[str, int, dict]], total_steps: int,
                     code_version: str) -> tuple[str, list[str]]:
        """Insert one run per ``(label, seed, config)``; returns ``(group_id, run_ids)``."""
        group_id = _new_id()
        ids = [_new_id() for _ in runs]
        now = time.time()
        with self._transaction():
            for run_id, (label, seed, config) in zip(ids, runs):
                self._db.execute(
                    "INSERT INTO runs (id, group_id, group_key, label, seed, config, code_version, status,"
                    " created, total_steps) VALUES (?, ?, ?, ?, ?, ?, ?, 'created', ?, ?)",
                    (run_id, group_id, group_key, label, seed, json.dumps(config, sort_keys=True),
                     code_version, now, total_steps),
                )
        return group_id, ids

    def mark(self, group_id: str, status: str, *, steps_done: int | None = None,
             add_wall_seconds: float = 0.0) -> None:
        """Set the status of every run in a group (and claim it for this process when running)."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        now = time.time()
        with self._transaction():
            self._db.execute(
                "UPDATE runs SET status = ?, wall_seconds = wall_seconds + ?,"
                " steps_done = COALESCE(?, steps_done),"
                " started = CASE WHEN ? = 'running' AND started IS NULL THEN ? ELSE started END,"
                " finished = CASE WHEN ? = 'finished' THEN ? ELSE finished END,"
                " pid = CASE WHEN ? = 'running' THEN ? ELSE pid END,"
                " host = CASE WHEN ? = 'running' THEN ? ELSE host END"
                " WHERE group_id = ?",
                (status, add_wall_seconds, steps_done, status, now, status, now, status, os.getpid(),
                 status, socket.gethostname(), group_id),
            )

    def log_metrics(self, step: int, values: Iterable[tuple[str, str, float]], *, steps_done: int | None = None,
                    group_id: str | None = None) -> None:
        """Record ``(run_id, name, value)`` at ``step`` in one transaction."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)",
                [(run_id, step, name, None if value != value else float(value)) for run_id, name, value in values],
            )
            if steps_done is not None and group_id is not None:
                self._db.execute("UPDATE runs SET steps_done = ? WHERE group_id = ?", (steps_done, group_id))

    def set_summary(self, run_id: str, summary: dict) -> None:
        with self._transaction():
            self._db.execute("UPDATE runs SET summary = ? WHERE id = ?", (json.dumps(summary), run_id))

    def truncate_metrics(self, group_id: str, after_step: int) -> int:
        """Delete the group's metrics logged after ``after_step`` (a checkpoint it resumes from)."""
        with self._transaction():
            cur = self._db.execute(
                "DELETE FROM metrics WHERE step > ? AND run_id IN (SELECT id FROM runs WHERE group_id = ?)",
                (after_step, group_id),
            )
            return cur.rowcount

    # -- reading -------------------------------------------------------------------------------

    def runs(self, *, group_id: str | None = None, group_key: str | None = None) -> list[RunRecord]:
        query, args = "SELECT * FROM runs", []
        if group_id is not None:
            query, args = query + " WHERE group_id = ?", [group_id]
        elif group_key is not None:
            query, args = query + " WHERE group_key = ?", [group_key]
        return [_record(r) for r in self._db.execute(query + " ORDER BY created, label, seed", args)]

    def run(self, run_id: str) -> RunRecord:
        """A run by id, or by a unique prefix of it."""
        rows = self._db.execute("SELECT * FROM runs WHERE id LIKE ?", (run_id + "%",)).fetchall()
        if not rows:
            raise StoreError(f"no run with id {run_id!r} in {self.path} (see 'bnlab runs list')")
        if len(rows) > 1:
            raise StoreError(f"id prefix {run_id!r} matches {len(rows)} runs; give more characters")
        return _record(rows[0])

    def metrics(self, run_id: str) -> dict[str, list[tuple[int, float | None]]]:
        """``{name: [(step, value), ...]}`` in step order."""
        series: dict[str, list[tuple[int, float | None]]] = {}
        for row in self._db.execute("SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY name, step",
                                    (run_id,)):
            series.setdefault(row["name"], []).append((row["step"], row["value"]))
        return series

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *rest):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _record(row: sqlite3.Row) -> RunRecord:
    d = dict(row)
    d["config"] = json.loads(d["config"])
    d["summary"] = json.loads(d["summary"]) if d["summary"] else None
    return RunRecord(**d)
