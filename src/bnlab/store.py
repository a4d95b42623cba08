"""The run store: every training run, its config, status and metric series, in one SQLite file.

One row per run (a model trained from one seed) in ``runs``; runs trained
together in one stacked job share a ``group_id``, and the group's resumable
checkpoint lives next to the database in ``checkpoints/<group_id>.pt``.
Metric series are rows ``(run_id, step, name, value)``.

SQLite runs in WAL mode with a busy timeout, so several processes (two
``bnlab compare`` at once, the web app reading while a job writes) can share
one store; a write that still finds the store locked waits and retries rather
than failing the job. Every write is one short transaction: a killed process
leaves the store consistent, and :meth:`RunStore.truncate_metrics` drops what
was logged after the checkpoint a resumed run restarts from.

A group being trained is leased (:meth:`RunStore.claim_group`): its rows carry the
owner's pid and host and a heartbeat the owner renews while it trains. A group
whose heartbeat is older than :data:`LEASE_SECONDS` (a killed process, a reused
pid, another machine gone) counts as interrupted; an identical job started while
the lease is live waits for it and reuses its result instead of training twice.

The file's schema version is ``PRAGMA user_version``: older stores are migrated
forward on open, a store written by a newer bnlab is refused, and columns this
version does not know are ignored when reading.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from bnlab._paths import user_data_path
from bnlab.errors import BnlabError

__all__ = ["RunStore", "RunRecord", "default_store_path", "config_key", "StoreError", "DiskFullError", "LeaseLost",
           "LEASE_SECONDS", "HEARTBEAT_SECONDS"]

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
    summary      TEXT,
    heartbeat    REAL
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
SCHEMA_VERSION = 2
LEASE_SECONDS = 120.0  # a running group whose owner has not renewed its heartbeat for this long is interrupted
HEARTBEAT_SECONDS = 5.0  # how often a training job renews its lease (and banks its wall time)
# What runs stored before schema version 1 were made with (bnlab.train.TrainConfig's newer fields).
LEGACY_TRAIN_SETTINGS = {"data_order": "shared", "eval_subset": 0, "eval_train_subset": 0}
LEGACY_MODEL_SETTINGS = {"norm_momentum": None, "norm_eps": None}  # bnlab.models.ModelSpec's newer fields


class StoreError(BnlabError, RuntimeError):
    """The store cannot do what was asked (unknown run, unreadable file); the message says why."""


class DiskFullError(StoreError):
    """No space left for the store or a checkpoint; what is stored is intact and the job can resume."""


class LeaseLost(StoreError):
    """Another process has taken over the group this process was training."""


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
    heartbeat: float | None = None

    @property
    def effective_status(self) -> str:
        """``running`` rows whose owner is gone read as ``interrupted``: the heartbeat is older than
        :data:`LEASE_SECONDS`, or the owner was on this machine and its process no longer exists."""
        if self.status == "running" and not self.lease_live:
            return "interrupted"
        return self.status

    @property
    def lease_live(self) -> bool:
        """Whether the process that marked this run running still holds it."""
        if self.status != "running" or self.pid is None:
            return False
        if self.heartbeat is not None and time.time() - self.heartbeat > LEASE_SECONDS:
            return False  # also catches a pid that another process reused
        if self.host != socket.gethostname():
            return True  # cannot look at another machine's processes: the heartbeat decides
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class RunStore:
    """A handle on one store file.

    ``readonly=True`` (listing, showing, exporting) never creates, migrates or modifies the file:
    a missing file reads as an empty store, and a store on a read-only mount can be read.
    ``busy_timeout``: seconds SQLite waits for another writer before bnlab's own retry takes over.
    """

    def __init__(self, path: Path | str | None = None, *, readonly: bool = False, busy_timeout: float = 30.0):
        self.path = Path(path).expanduser() if path is not None else default_store_path()
        self.readonly = readonly
        self._warned_locked = False
        try:
            self._db = self._open_readonly() if readonly else self._connect_writable(busy_timeout)
            self._db.row_factory = sqlite3.Row
            if not readonly:
                self._write(lambda: self._db.executescript(SCHEMA))
                self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable bnlab run store ({exc}); "
                             "point --store/BNLAB_STORE at another file") from exc

    def _connect_writable(self, busy_timeout: float) -> sqlite3.Connection:
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory; --store/BNLAB_STORE must name a file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the run store's directory {self.path.parent} ({exc.strerror}); "
                             "point --store/BNLAB_STORE at a writable place") from exc
        if self.path.exists() and not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK):
            raise StoreError(f"the run store {self.path} is read-only; training needs a writable store "
                             "(point --store/BNLAB_STORE elsewhere); 'bnlab runs list/show/export' can read it")
        db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        _check_schema(db, self.path)  # before anything is written: a foreign file stays as it was
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.path.exists():
            db = sqlite3.connect(":memory:")  # an empty store, and no file left behind
            db.executescript(SCHEMA)
            return db
        uri = self.path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)
        try:
            _check_schema(db, self.path)
        except sqlite3.OperationalError as exc:
            db.close()
            if "unable to open" not in str(exc) or _wal_pending(self.path):
                raise  # locked, or changes only in the -wal file: never read a partial store as a whole one
            # a WAL store on a read-only mount cannot create its shared-memory file; with no pending
            # -wal content, the main file is the whole store: read it as an immutable file
            db = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
            _check_schema(db, self.path)
        if "runs" not in _tables(db):
            if _wal_pending(self.path):
                db.close()
                raise StoreError(f"{self.path} has changes that only its -wal file holds and cannot be read "
                                 "read-only here; open it once where it is writable")
            db.executescript(_TEMP_SCHEMA)  # an empty SQLite file: an empty store, read without writing to it
        return db

    def _migrate(self) -> None:
        """Bring a store written by an older bnlab up to this version's schema, once per file.

        Version 1 (2026-12-02): training settings added since (per-seed batch order, cheap
        evaluation) get the values those runs were made with, so every run made with shared
        batches says so in its config (``data_order: shared``), and its group key is that of
        the completed config (a resume finds it).
        Version 2 (2026-12-03): the ``heartbeat`` column of the lease.
        """
        if self._db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version >= SCHEMA_VERSION:
                return  # another process migrated it meanwhile
            if version < 1:
                self._migrate_configs()
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(runs)")}
            if "heartbeat" not in columns:
                self._db.execute("ALTER TABLE runs ADD COLUMN heartbeat REAL")
                # a run an older bnlab left running gets one lease period from now: if it is still
                # being trained it is not taken over at once; if not, it reads as interrupted after that
                self._db.execute("UPDATE runs SET heartbeat = ? WHERE status = 'running'", (time.time(),))
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _migrate_configs(self) -> None:
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

    def claim_group(self, group_key: str, runs: Sequence[tuple[str, int, dict]], total_steps: int,
                    code_version: str, *, on_wait=None, poll_seconds: float = 2.0) -> tuple[str, str, list[str]]:
        """Claim the group of ``group_key`` for this process, atomically: ``(state, group_id, run_ids)``.

        ``state`` is ``"finished"`` (an identical group finished: reuse it), ``"resume"`` (an
        interrupted identical group, now leased to this process) or ``"new"`` (rows inserted, one per
        ``(label, seed, config)``, leased to this process). While another live process holds an
        identical group, this waits (calling ``on_wait(record)`` once) and then claims again, so two
        identical jobs never train the same thing twice. Run ids are in the order of ``runs``.
        """
        waited = False
        seeds = [seed for _, seed, _ in runs]
        while True:
            with self._transaction():
                groups: dict[str, list[RunRecord]] = {}
                for record in self.runs(group_key=group_key):
                    groups.setdefault(record.group_id, []).append(record)
                for group_id, records in groups.items():
                    if all(r.status == "finished" for r in records):
                        return "finished", group_id, _in_seed_order(records, seeds)
                live = next((records[0] for records in groups.values() if records[0].lease_live), None)
                if live is None:
                    now = time.time()
                    if groups:
                        group_id, records = next(iter(groups.items()))
                        self._lease(group_id, now)
                        return "resume", group_id, _in_seed_order(records, seeds)
                    group_id, ids = self._insert_group(group_key, runs, total_steps, code_version, now)
                    self._lease(group_id, now)
                    return "new", group_id, ids
            if on_wait is not None and not waited:
                on_wait(live)
            waited = True
            time.sleep(poll_seconds)

    def create_group(self, group_key: str, runs: Sequence[tuple[str, int, dict]], total_steps: int,
                     code_version: str) -> tuple[str, list[str]]:
        """Insert one run per ``(label, seed, config)``, unclaimed (status ``created``); returns
        ``(group_id, run_ids)``. Training claims groups with :meth:`claim_group` instead."""
        with self._transaction():
            return self._insert_group(group_key, runs, total_steps, code_version, time.time())

    def _insert_group(self, group_key, runs, total_steps, code_version, now) -> tuple[str, list[str]]:
        group_id, ids = _new_id(), [_new_id() for _ in runs]
        for run_id, (label, seed, config) in zip(ids, runs):
            self._db.execute(
                "INSERT INTO runs (id, group_id, group_key, label, seed, config, code_version, status,"
                " created, total_steps) VALUES (?, ?, ?, ?, ?, ?, ?, 'created', ?, ?)",
                (run_id, group_id, group_key, label, seed, json.dumps(config, sort_keys=True),
                 code_version, now, total_steps))
        return group_id, ids

    def _lease(self, group_id: str, now: float) -> None:
        self._db.execute(
            "UPDATE runs SET status = 'running', started = COALESCE(started, ?), pid = ?, host = ?, heartbeat = ?"
            " WHERE group_id = ?", (now, os.getpid(), socket.gethostname(), now, group_id))

    def heartbeat(self, group_id: str, *, add_wall_seconds: float = 0.0, steps_done: int | None = None) -> None:
        """Renew this process's lease on a group it trains, bank the wall time since the last call
        and, after a checkpoint, record how far the group durably is (``steps_done``).

        Raises :class:`LeaseLost` if another process has taken the group over (``runs resume --force``,
        or this process stalled past :data:`LEASE_SECONDS`): the caller must stop writing to it."""
        with self._transaction():
            changed = self._db.execute(
                "UPDATE runs SET heartbeat = ?, wall_seconds = wall_seconds + ?, steps_done = COALESCE(?, steps_done)"
                " WHERE group_id = ? AND status = 'running' AND pid = ? AND host = ?",
                (time.time(), add_wall_seconds, steps_done, group_id, os.getpid(), socket.gethostname())).rowcount
        if not changed:
            raise LeaseLost(f"group {group_id} was taken over by another process; this one stops training it")

    def release(self, group_id: str) -> None:
        """Mark a group interrupted whoever holds it (``runs resume --force``): its holder, if still
        alive, stops at its next heartbeat."""
        with self._transaction():
            self._db.execute("UPDATE runs SET status = 'interrupted', heartbeat = NULL WHERE group_id = ?"
                             " AND status = 'running'", (group_id,))

    def mark(self, group_id: str, status: str, *, steps_done: int | None = None,
             add_wall_seconds: float = 0.0) -> None:
        """End this process's work on a group: ``interrupted``, ``failed`` or ``finished`` (the lease ends).
        A group another process has taken over meanwhile is left as that process has it."""
        if status not in STATUSES or status == "running":
            raise ValueError(f"unknown final status {status!r}; a group is claimed with claim_group")
        now = time.time()
        with self._transaction():
            self._db.execute(
                "UPDATE runs SET status = ?, wall_seconds = wall_seconds + ?,"
                " steps_done = COALESCE(?, steps_done), heartbeat = NULL,"
                " finished = CASE WHEN ? = 'finished' THEN ? ELSE finished END"
                " WHERE group_id = ? AND NOT (status = 'running' AND (pid IS NOT ? OR host IS NOT ?))",
                (status, add_wall_seconds, steps_done, status, now, group_id, os.getpid(), socket.gethostname()),
            )

    def log_metrics(self, step: int, values: Iterable[tuple[str, str, float]]) -> None:
        """Record ``(run_id, name, value)`` at ``step`` in one transaction."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)",
                [(run_id, step, name, None if value != value else float(value)) for run_id, name, value in values],
            )

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
        """A run by id, or by a unique prefix of it (taken literally: no wildcards)."""
        if not run_id:
            raise StoreError("an empty run id matches nothing; see 'bnlab runs list'")
        rows = self._db.execute("SELECT * FROM runs WHERE substr(id, 1, ?) = ?", (len(run_id), run_id)).fetchall()
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
        return _Transaction(self)

    def _write(self, operation):
        """Run ``operation`` (one write); when another process holds the store's write lock past the
        busy timeout, wait and retry with backoff instead of failing: a lock never costs a job."""
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only")
        delay = 0.05
        while True:
            try:
                return operation()
            except sqlite3.OperationalError as exc:
                if _disk_full(exc):
                    raise DiskFullError(disk_full_message(self.path)) from exc
                if "readonly database" in str(exc):
                    raise StoreError(f"the run store {self.path} is read-only; training needs a writable store "
                                     "(point --store/BNLAB_STORE elsewhere)") from exc
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if not self._warned_locked:
                    print(f"bnlab: the run store {self.path} is locked by another process; waiting for it",
                          file=sys.stderr)
                    self._warned_locked = True
                time.sleep(delay)
                delay = min(2 * delay, 5.0)


class _Transaction:
    def __init__(self, store: RunStore):
        self.store = store

    def __enter__(self):
        self.store._write(lambda: self.store._db.execute("BEGIN IMMEDIATE"))

    def __exit__(self, exc_type, exc, tb):
        db = self.store._db
        if exc_type is None:
            try:
                db.execute("COMMIT")
                return False
            except sqlite3.OperationalError as error:
                exc = error
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError) and _disk_full(exc):
            raise DiskFullError(disk_full_message(self.store.path)) from exc
        if exc_type is None:
            raise exc
        return False


def disk_full_message(path: Path) -> str:
    return (f"disk full at {path}: free some space, then rerun the same command to resume "
            "(everything stored so far is intact)")


def _disk_full(exc: BaseException) -> bool:
    return "disk is full" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC


def _wal_pending(path: Path) -> bool:
    """Whether a WAL store has committed changes that are still only in its -wal file."""
    wal = path.with_name(path.name + "-wal")
    return wal.exists() and wal.stat().st_size > 0


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _check_schema(db: sqlite3.Connection, path: Path) -> None:
    """Refuse, before anything is written, a file that is not a bnlab store or was written by a newer bnlab."""
    tables = _tables(db)  # a file that is not SQLite raises sqlite3.DatabaseError here
    if tables and "runs" not in tables:
        raise StoreError(f"{path} is an SQLite database but not a bnlab run store (its tables: "
                         f"{', '.join(sorted(tables))}); point --store/BNLAB_STORE at another file")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} was written by a newer bnlab (store schema {version}; this bnlab reads up to "
                         f"{SCHEMA_VERSION}): upgrade bnlab, or point --store/BNLAB_STORE at another file")


# the tables alone, as temporary tables: how a read-only handle shows an empty SQLite file
_TEMP_SCHEMA = "\n".join(line.replace("CREATE TABLE", "CREATE TEMP TABLE")
                         for line in SCHEMA.splitlines() if not line.startswith("CREATE INDEX"))
_RECORD_FIELDS = {f.name for f in fields(RunRecord)}


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _in_seed_order(records: list[RunRecord], seeds: list[int]) -> list[str]:
    by_seed = {r.seed: r.id for r in records}
    return [by_seed[s] for s in seeds]


def _record(row: sqlite3.Row) -> RunRecord:
    d = {k: row[k] for k in row.keys() if k in _RECORD_FIELDS}  # columns of a newer bnlab are ignored
    d["config"] = json.loads(d["config"])
    d["summary"] = json.loads(d["summary"]) if d["summary"] else None
    return RunRecord(**d)
