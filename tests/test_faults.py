"""Faults and bad input (issue 13): nothing lost, nothing cryptic, every output valid.

Process-level faults (kill -9, SIGTERM, two identical jobs at once) run the real CLI in a process of
its own (``cli_driver.py``: ``bnlab`` on the synthetic dataset); the rest run in-process.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import bnlab.experiments.compare as compare_module
import bnlab.train.engine as engine_module
from bnlab.cli.main import main
from bnlab.models import ModelSpec
from bnlab.store import LEASE_SECONDS, SCHEMA_VERSION, DiskFullError, RunStore, StoreError
from bnlab.train import TrainConfig, run_group
from bnlab.train.engine import previous_checkpoint
from bnlab.train.runner import resume
from fakes import fake_dataset

TESTS = Path(__file__).resolve().parent
CHECKPOINT_EVERY = 40
# 6,000 synthetic images, batch 64, 2 epochs: 188 steps, a checkpoint every 40
COMPARE = ["compare", "--seeds", "2", "--epochs", "2", "--no-progress",
           "--set", f"checkpoint_every={CHECKPOINT_EVERY}", "--set", "eval_every=40"]


def _env(store: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BNLAB_STORE": str(store),
            "BNLAB_FAKE_TRAIN": "6000", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _start(args: list[str], store: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TESTS / "cli_driver.py"), *args], env=_env(store),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def _wait_for_checkpoint(store: Path, proc: subprocess.Popen, at_least: int) -> None:
    """Poll the store (read-only, as `bnlab runs list` does) until a group has checkpointed ``at_least``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"finished before step {at_least}: {proc.communicate()}"
        if store.exists():
            try:
                with RunStore(store, readonly=True) as s:
                    if any(r.steps_done >= at_least and r.status == "running" for r in s.runs()):
                        return
            except StoreError:  # the child is still creating the store (its schema only in the -wal file)
                pass
        time.sleep(0.01)
    raise AssertionError("no checkpoint in time")


def _per_seed(summary_path: Path) -> dict:
    summary = json.loads(summary_path.read_text())
    return {label: [(r["seed"], r["final_test_acc"], r["final_train_loss"]) for r in v["per_seed"]]
            for label, v in summary["variants"].items()}


def _curves(summary_path: Path) -> dict:
    summary = json.loads(summary_path.read_text())
    return {label: sorted(tuple(map(tuple, c["test_acc"])) for c in v["curves"].values())
            for label, v in summary["variants"].items()}


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_results_and_honest_bookkeeping(tmp_path):
    clean_store, store = tmp_path / "clean" / "runs.sqlite", tmp_path / "killed" / "runs.sqlite"
    code, _, err = _finish(_start([*COMPARE, "--out", str(tmp_path / "clean-out")], clean_store))
    assert code == 0, err

    proc = _start([*COMPARE, "--out", str(tmp_path / "out")], store)
    target = random.Random().choice([CHECKPOINT_EVERY, 2 * CHECKPOINT_EVERY])
    _wait_for_checkpoint(store, proc, target)
    proc.kill()
    proc.wait()
    with RunStore(store, readonly=True) as s:
        killed = [r for r in s.runs() if r.status != "finished"]
        assert killed and all(r.effective_status == "interrupted" for r in killed)
        # the store shows what is durable: the step of the last checkpoint, which a resume restarts from
        assert all(r.steps_done % CHECKPOINT_EVERY == 0 and r.steps_done >= target for r in killed)
        banked = killed[0].wall_seconds
        assert banked > 0  # the killed segment's time up to its last heartbeat is kept
        group = killed[0].group_id
    code, _, err = _finish(_start([*COMPARE, "--out", str(tmp_path / "out")], store))
    assert code == 0, err
    assert _per_seed(tmp_path / "out" / "summary.json") == _per_seed(tmp_path / "clean-out" / "summary.json")
    assert _curves(tmp_path / "out" / "summary.json") == _curves(tmp_path / "clean-out" / "summary.json")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    resumed = next(v for v in summary["variants"].values() if v["group_id"] == group)
    with RunStore(store, readonly=True) as s:
        total = s.runs(group_id=group)[0].wall_seconds
    assert resumed["train_wall_seconds"] == pytest.approx(total) and total > banked  # segments add up


@pytest.mark.slow
def test_sigterm_saves_and_exits_143_and_two_identical_jobs_train_once(tmp_path):
    store = tmp_path / "runs.sqlite"
    proc = _start([*COMPARE, "--out", str(tmp_path / "a")], store)
    _wait_for_checkpoint(store, proc, CHECKPOINT_EVERY)
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == 143 and "progress is saved" in err and "Traceback" not in err
    with RunStore(store, readonly=True) as s:
        assert {r.effective_status for r in s.runs()} == {"interrupted"}
    # two identical jobs started together: one trains (resuming), the other waits and reuses
    first, second = (_start([*COMPARE, "--out", str(tmp_path / name)], store) for name in ("b", "c"))
    (code1, _, err1), (code2, _, err2) = _finish(first), _finish(second)
    assert code1 == 0 and code2 == 0, err1 + err2
    with RunStore(store, readonly=True) as s:
        runs = s.runs()
    assert len(runs) == 4 and len({r.group_id for r in runs}) == 2  # 2 variants x 2 seeds, no duplicate group
    assert _per_seed(tmp_path / "b" / "summary.json") == _per_seed(tmp_path / "c" / "summary.json")


# -- in-process ---------------------------------------------------------------------------------

SPEC = ModelSpec(hidden=(16,), norm="batch")
CFG = TrainConfig(lr=0.05, momentum=0.9, batch_size=32, epochs=1, eval_every=5, checkpoint_every=4)


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_then_to_a_restart(tmp_path, capsys, monkeypatch):
    data = fake_dataset(n_train=320, n_test=64)
    clean = run_group(RunStore(tmp_path / "clean.sqlite"), "x", SPEC, CFG, [0, 1], dataset=data, progress=False)
    clean_store = RunStore(tmp_path / "clean.sqlite")
    expected = {r.seed: clean_store.metrics(r.id)["test_acc"] for r in clean_store.runs(group_id=clean.group_id)}

    for damage_previous in (False, True):
        store = RunStore(tmp_path / f"runs{damage_previous}.sqlite")
        trainer_run = engine_module.StackedTrainer.run

        def stop_at_9(self, **kwargs):
            kwargs["progress"] = _raise_at(9, kwargs["progress"], self)
            return trainer_run(self, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(engine_module.StackedTrainer, "run", stop_at_9)
            with pytest.raises(_Killed):
                run_group(store, "x", SPEC, CFG, [0, 1], dataset=data, progress=False)
        (record, *_) = store.runs()
        checkpoint = store.checkpoint_path(record.group_id)
        assert previous_checkpoint(checkpoint).exists()
        checkpoint.write_bytes(checkpoint.read_bytes()[:300])  # truncated
        if damage_previous:
            previous_checkpoint(checkpoint).write_bytes(b"garbage")
        capsys.readouterr()
        result = run_group(store, "x", SPEC, CFG, [0, 1], dataset=data, progress=False)
        err = capsys.readouterr().err
        assert f"checkpoint {checkpoint} is damaged" in err
        assert ("restarting the group from step 0" if damage_previous else "resuming from step 4") in err
        got = {r.seed: store.metrics(r.id)["test_acc"] for r in store.runs(group_id=result.group_id)}
        assert got == expected  # the same numbers as a run that was never interrupted


class _Killed(BaseException):
    pass


def _raise_at(step, progress, trainer):
    def wrapped(n):
        progress(n)
        if trainer.step == step:
            raise _Killed  # the process dies after its checkpoint at step 8 (the run is left failed)
    return wrapped


def test_disk_full_is_one_line_marks_interrupted_leaves_no_partial_file_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_module, "load_dataset", lambda name, **_: fake_dataset(n_train=320, n_test=64))
    store, out = tmp_path / "runs.sqlite", tmp_path / "out"
    argv = ["compare", "--seeds", "1", "--epochs", "1", "--no-progress", "--store", str(store), "--out", str(out),
            "--set", "checkpoint_every=3", "--set", "hidden=16"]
    real_save, calls = torch.save, []

    def full_disk(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) >= 2:
            Path(path).write_bytes(b"half")  # what a write cut short leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(engine_module.torch, "save", full_disk)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"disk full at {store.parent / 'checkpoints'}" in err
    with RunStore(store, readonly=True) as s:
        assert {r.effective_status for r in s.runs()} == {"interrupted"}
    assert not list((store.parent / "checkpoints").glob("*.partial"))
    monkeypatch.setattr(engine_module.torch, "save", real_save)  # space freed
    assert main(argv) == 0
    with RunStore(store, readonly=True) as s:
        assert {r.status for r in s.runs()} == {"finished"}


def test_a_full_store_is_a_disk_full_error(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    _, group, (run_id,) = store.claim_group("k", [("x", 0, {})], 10, "test")
    store._db.execute("PRAGMA max_page_count = 8")  # what SQLite reports on a full disk: SQLITE_FULL
    with pytest.raises(DiskFullError, match="disk full at"):
        store.log_metrics(1, [(run_id, f"m{i}", 0.5) for i in range(5000)])


def test_a_long_write_lock_is_waited_for_not_fatal(tmp_path, capsys):
    path = tmp_path / "runs.sqlite"
    store = RunStore(path, busy_timeout=0.05)
    _, group, (run_id,) = store.claim_group("k", [("x", 0, {})], 10, "test")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    started = time.monotonic()
    store.log_metrics(1, [(run_id, "acc", 0.5)])
    assert time.monotonic() - started >= 0.4 and store.metrics(run_id) == {"acc": [(1, 0.5)]}
    assert "is locked by another process; waiting" in capsys.readouterr().err


def test_leases_heartbeats_and_force(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "runs.sqlite")
    _, group, (run_id,) = store.claim_group("k", [("x", 0, {})], 10, "test")
    assert store.run(run_id).effective_status == "running"
    # a pid reused by another live process: the stale heartbeat decides
    store._db.execute("UPDATE runs SET pid = ?, heartbeat = ?", (os.getppid(), time.time() - LEASE_SECONDS - 1))
    assert store.run(run_id).effective_status == "interrupted"
    # a live lease held by another process: resume --force takes it over at once
    monkeypatch.setattr("bnlab.train.runner.load_dataset", lambda name: fake_dataset(n_train=320, n_test=64))
    data_store = RunStore(tmp_path / "train.sqlite")
    result = run_group(data_store, "x", SPEC, CFG, [0], dataset=fake_dataset(n_train=320, n_test=64), progress=False)
    data_store._db.execute("UPDATE runs SET status = 'running', pid = ?, heartbeat = ?, steps_done = 0",
                           (os.getppid(), time.time()))
    (record,) = data_store.runs(group_id=result.group_id)
    assert record.lease_live  # without --force, a resume would wait for that process
    done = resume(data_store, record.id, progress=False, force=True)
    assert done.group_id == result.group_id and data_store.run(record.id).status == "finished"


def test_store_schema_newer_foreign_and_unknown_columns(tmp_path):
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    store.create_group("k", [("x", 0, {"a": 1})], 10, "test")
    store._db.execute("ALTER TABLE runs ADD COLUMN from_the_future TEXT")  # a newer bnlab's column
    assert RunStore(path).runs()[0].config == {"a": 1}
    store._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    for readonly in (False, True):
        with pytest.raises(StoreError, match="written by a newer bnlab"):
            RunStore(path, readonly=readonly)
    foreign = tmp_path / "other.sqlite"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE songs (title TEXT)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a bnlab run store"):
        RunStore(foreign)
    db = sqlite3.connect(foreign)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # left as it was, not switched to WAL


def test_read_only_commands_create_nothing_and_read_only_handles_do_not_write(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "runs.sqlite"
    for argv in (["runs", "list"], ["claims", "list"]):
        assert main([*argv, "--store", str(missing)]) == 0
    assert not missing.exists() and not missing.parent.exists()
    assert "no runs in" in capsys.readouterr().out
    path = tmp_path / "runs.sqlite"
    RunStore(path).create_group("k", [("x", 0, {})], 10, "test")
    reader = RunStore(path, readonly=True)
    assert len(reader.runs()) == 1
    with pytest.raises(StoreError, match="opened read-only"):
        reader.log_metrics(1, [("x", "acc", 1.0)])


@pytest.mark.parametrize("argv, reason", [
    (["compare", "--epochs", "inf"], "must be a positive finite number"),
    (["compare", "--epochs", "nan"], "must be a positive finite number"),
    (["runs", "list", "--status", "bogus"], "invalid choice: 'bogus'"),
])
def test_malformed_flags_are_one_line_and_exit_2(argv, reason, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and reason in err and err.count("\n") == 1


def test_out_pointing_at_a_file_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_module, "load_dataset", lambda name, **_: pytest.fail("data loaded before the check"))
    out = tmp_path / "report"
    out.write_text("not a directory")
    store = tmp_path / "runs.sqlite"
    assert main(["compare", "--out", str(out), "--store", str(store), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err and not store.exists()


def test_run_id_prefixes_are_literal(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    store.create_group("k", [("x", 0, {}), ("x", 1, {})], 10, "test")
    for pattern in ("%", "_", "%%"):
        with pytest.raises(StoreError, match="no run with id"):
            store.run(pattern)


def test_help_prints_percent_signs_once(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "95% CI" in text and "%%" not in text


def test_store_in_an_uncreatable_place_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["runs", "resume", "abc", "--store", str(blocker / "sub" / "runs.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create the run store's directory" in err


def test_every_json_the_cli_prints_is_strict(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_module, "load_dataset", lambda name, **_: fake_dataset(n_train=320, n_test=64))
    store = tmp_path / "runs.sqlite"
    # one seed and a threshold never reached: the cases that used to write bare NaN tokens
    assert main(["compare", "--seeds", "1", "--epochs", "0.2", "--no-progress", "--store", str(store),
                 "--out", str(tmp_path / "out"), "--set", "hidden=16"]) == 0
    _strict((tmp_path / "out" / "summary.json").read_text())
    capsys.readouterr()
    with RunStore(store, readonly=True) as s:
        run_id = s.runs()[0].id
    for argv in (["runs", "show", run_id], ["runs", "export", run_id, "--format", "json"]):
        assert main([*argv, "--store", str(store)]) == 0
        _strict(capsys.readouterr().out.split("\nresume with:")[0])


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_a_process_that_lost_its_lease_stops_and_leaves_the_new_holder_alone(tmp_path):
    from bnlab.store import LeaseLost

    store = RunStore(tmp_path / "runs.sqlite")
    _, group, (run_id,) = store.claim_group("k", [("x", 0, {})], 10, "test")
    store.heartbeat(group, steps_done=4)  # ours: fine
    # another process takes the group over (runs resume --force elsewhere, or this one stalled)
    store._db.execute("UPDATE runs SET pid = ?, heartbeat = ?", (os.getppid(), time.time()))
    with pytest.raises(LeaseLost, match="taken over"):
        store.heartbeat(group, steps_done=8)
    store.mark(group, "finished", steps_done=8)  # what the old holder would do at its end: no effect
    record = store.run(run_id)
    assert (record.status, record.pid, record.steps_done) == ("running", os.getppid(), 4)
    with pytest.raises(StoreError, match="empty run id"):
        store.run("")


def test_runs_left_running_by_an_older_bnlab_get_one_lease_period(tmp_path):
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    _, group, (run_id,) = store.claim_group("k", [("x", 0, {})], 10, "test")
    store._db.execute("UPDATE runs SET host = 'another-machine'")
    store._db.execute("ALTER TABLE runs DROP COLUMN heartbeat")  # as schema version 1 had it
    store._db.execute("PRAGMA user_version = 1")
    store.close()
    migrated = RunStore(path).run(run_id)
    assert migrated.heartbeat is not None and migrated.effective_status == "running"
    RunStore(path)._db.execute("UPDATE runs SET heartbeat = ?", (time.time() - LEASE_SECONDS - 1,))
    assert RunStore(path).run(run_id).effective_status == "interrupted"  # not a wait forever


def test_a_checkpoint_that_cannot_be_read_for_a_passing_reason_is_not_called_damaged(tmp_path, monkeypatch):
    from bnlab.train.engine import CheckpointDamaged, load_checkpoint_file

    path = tmp_path / "c.pt"
    torch.save({"model": {}}, path)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(engine_module.torch, "load", denied)
    with pytest.raises(PermissionError):
        load_checkpoint_file(path)
    monkeypatch.undo()
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointDamaged):
        load_checkpoint_file(path)
