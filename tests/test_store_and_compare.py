"""Run store, statistics, the store-backed runner, `bnlab compare` and `bnlab runs`."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3

import pytest

from bnlab.cli.main import main
from bnlab.experiments import compare as compare_module
from bnlab.experiments.compare import CompareRequest, run_compare
from bnlab.models import ModelSpec
from bnlab.report.compare_report import format_table, write_report
from bnlab.stats import first_step_reaching, mean_ci, t_quantile
from bnlab.store import RunStore, StoreError, config_key
from bnlab.train import StopRequested, TrainConfig, run_group
from fakes import fake_dataset


@pytest.mark.parametrize("df,want", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423), (120, 1.9799)])
def test_t_quantiles_match_the_table(df, want):
    assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-4)


def test_mean_ci_by_hand():
    values = [1.0, 2.0, 3.0, 4.0]
    iv = mean_ci(values)
    half = 3.1824 * (1.2909944 / 2)  # t_{0.975,3} * s / sqrt(n)
    assert iv.mean == 2.5 and iv.half_width == pytest.approx(half, rel=1e-4)
    assert mean_ci([5.0]).n == 1 and mean_ci([5.0]).low == 5.0
    assert mean_ci([]).n == 0


def test_first_step_reaching():
    series = [(10, 0.5), (20, 0.96), (30, 0.94), (40, 0.98)]
    assert first_step_reaching(series, 0.95) == 20
    assert first_step_reaching(series, 0.99) is None


def test_store_roundtrip_and_truncate(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    state, group, (a, b) = store.claim_group("key1", [("x", 0, {"seed": 0}), ("x", 1, {"seed": 1})], 100, "test")
    assert state == "new"
    store.log_metrics(10, [(a, "acc", 0.5), (b, "acc", 0.6)])
    store.heartbeat(group, steps_done=10)
    store.log_metrics(20, [(a, "acc", 0.7), (b, "acc", float("nan"))])
    assert store.metrics(a)["acc"] == [(10, 0.5), (20, 0.7)]
    assert store.metrics(b)["acc"][1] == (20, None)  # NaN is stored as NULL, not lost
    assert store.truncate_metrics(group, after_step=10) == 2
    assert store.metrics(a)["acc"] == [(10, 0.5)]
    # steps_done is what a resume would restart from (the last checkpoint), not the last logged step
    assert store.run(a[:6]).steps_done == 10 and store.run(a).effective_status == "running"
    with pytest.raises(StoreError, match="no run with id"):
        store.run("zzzz")
    assert config_key({"b": 1, "a": [1, 2]}) == config_key({"a": [1, 2], "b": 1})


def test_dead_process_reads_as_interrupted(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    _, group, (a,) = store.claim_group("k", [("x", 0, {})], 10, "test")
    store._db.execute("UPDATE runs SET pid = 999999999")  # no such process
    assert store.run(a).effective_status == "interrupted"


def _writer(path, label, n):
    store = RunStore(path)
    _, group, (run_id,) = store.claim_group(label, [(label, 0, {})], n, "test")
    for step in range(n):
        store.log_metrics(step, [(run_id, "v", float(step))])
        store.heartbeat(group, steps_done=step)
    store.close()


def test_two_concurrent_writers_do_not_corrupt_the_store(tmp_path):
    path = tmp_path / "runs.sqlite"
    RunStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, f"w{i}", 300)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 600


def test_a_non_database_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "runs.sqlite"
    bad.write_text("this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable bnlab run store"):
        RunStore(bad)
    assert bad.read_text().startswith("this is not sqlite")  # nothing overwritten


TINY = ModelSpec(hidden=(16,), norm="batch")
CFG = TrainConfig(lr=0.05, momentum=0.9, batch_size=32, epochs=1, eval_every=5, checkpoint_every=4)


def test_runner_records_reuses_and_resumes(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "runs.sqlite")
    data = fake_dataset()
    first = run_group(store, "tiny", TINY, CFG, [0, 1], dataset=data, progress=False)
    assert not first.reused
    records = [store.run(r) for r in first.run_ids]
    assert all(r.status == "finished" and r.steps_done == 20 for r in records)
    assert records[0].summary["final_train_acc"] > 0.5
    again = run_group(store, "tiny", TINY, CFG, [0, 1], dataset=data, progress=False)
    assert again.reused and again.run_ids == first.run_ids

    # interrupt a different config at step 9: status, checkpoint, then resume to the same result
    from bnlab.train import engine

    class StopAt9:
        trainer = None

        @property
        def requested(self):
            return StopAt9.trainer.step == 9

    original_init = engine.StackedTrainer.__init__

    def spy_init(self, *a, **k):
        original_init(self, *a, **k)
        StopAt9.trainer = self

    monkeypatch.setattr(engine.StackedTrainer, "__init__", spy_init)
    monkeypatch.setattr("bnlab.train.runner.graceful_stop", lambda: _Ctx(StopAt9()))
    cfg2 = CFG.with_(lr=0.04)
    with pytest.raises(StopRequested):
        run_group(store, "tiny", TINY, cfg2, [0, 1], dataset=data, progress=False)
    stopped = [r for r in store.runs() if r.config["train"]["lr"] == 0.04]
    assert {r.status for r in stopped} == {"interrupted"} and stopped[0].steps_done == 9
    assert store.checkpoint_path(stopped[0].group_id).exists()
    monkeypatch.undo()
    resumed = run_group(store, "tiny", TINY, cfg2, [0, 1], dataset=data, progress=False)
    assert resumed.group_id == stopped[0].group_id and not resumed.reused
    fresh_store = RunStore(tmp_path / "fresh.sqlite")
    straight = run_group(fresh_store, "tiny", TINY, cfg2, [0, 1], dataset=data, progress=False)
    for a, b in zip(resumed.run_ids, straight.run_ids):
        assert store.metrics(a) == fresh_store.metrics(b)  # resumed series == uninterrupted series


class _Ctx:
    def __init__(self, flag):
        self.flag = flag

    def __enter__(self):
        return self.flag

    def __exit__(self, *exc):
        return False


def test_compare_end_to_end_writes_a_report(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    request = CompareRequest(preset="torch-mlp", seeds=3, epochs=1)
    summary = run_compare(request, store, progress=False, dataset=fake_dataset(n_train=320, n_test=100))
    assert set(summary["variants"]) == {"no norm", "BN"}
    for variant in summary["variants"].values():
        assert len(variant["per_seed"]) == 3
        acc = variant["aggregate"]["final_test_acc"]
        assert acc["n"] == 3 and acc["low"] <= acc["mean"] <= acc["high"]
    paths = write_report(summary, tmp_path / "out")
    loaded = json.loads(paths["summary"].read_text())
    assert loaded["request"]["seeds"] == 3 and loaded["train_config"]["batch_size"] == 64
    assert paths["curves"].read_bytes()[:4] == b"\x89PNG"
    page = paths["html"].read_text()
    assert "final test accuracy" in page and 'src="curves.png"' in page
    table = format_table(summary)
    assert "mean ± 95% CI" in table and "steps to 97% test acc" in table


def test_compare_cli_and_runs_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_module, "load_dataset", lambda name, **_: fake_dataset(n_train=256, n_test=64))
    store = str(tmp_path / "runs.sqlite")
    out = tmp_path / "report"
    assert main(["compare", "--seeds", "2", "--epochs", "1", "--store", store, "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "final test accuracy" in text and (out / "index.html").exists()
    assert main(["runs", "list", "--store", store]) == 0
    listing = capsys.readouterr().out
    run_id = listing.splitlines()[1].split()[0]
    assert "finished" in listing
    assert main(["runs", "show", run_id, "--store", store]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "finished"
    assert main(["runs", "export", run_id, "--format", "csv", "--store", store]) == 0
    assert capsys.readouterr().out.startswith("run_id,step,metric,value")
    assert main(["runs", "export", run_id, "--format", "json", "--store", store]) == 0
    assert "test_acc" in json.loads(capsys.readouterr().out)["metrics"]
    assert main(["runs", "show", "nope", "--store", store]) == 2
    assert "no run with id 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,reason", [
    (["compare", "--seeds", "0"], "must be a positive integer"),
    (["compare", "--preset", "resnet"], "invalid choice: 'resnet'"),
    (["compare", "--epochs", "-1"], "must be a positive finite number"),
    (["runs", "frob"], "invalid choice: 'frob'"),
])
def test_bad_compare_flags_exit_2(argv, reason, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and reason in capsys.readouterr().err


def test_welch_diff_by_hand():
    from bnlab.stats import welch_diff

    a, b = [10.0, 12.0, 11.0, 13.0], [7.0, 7.5, 8.0]
    iv = welch_diff(a, b)
    va, vb = (1.6666667 / 4), (0.25 / 3)  # sample variances / n
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)  # ~4.4 -> floor 4
    assert iv.mean == pytest.approx(11.5 - 7.5)
    assert iv.half_width == pytest.approx(t_quantile(0.975, int(df)) * (va + vb) ** 0.5, rel=1e-4)
    assert welch_diff([1.0], [2.0]).low == -1.0
