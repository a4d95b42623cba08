"""The lab on Ray: compare's variants as tasks on a local 2-CPU Ray instance give what the sequential runner
gives, the store has one writer, a rerun reuses, and a task whose worker dies is run again."""

from __future__ import annotations

import os

import pytest
import torch

from bnlab.experiments.compare import CompareRequest, run_compare
from bnlab.store import RunStore
from fakes import fake_dataset
from test_claims import tiny_protocols  # noqa: F401 - a fixture

import ray  # noqa: E402,F401  - the Makefile installs the [ray] extra: its absence must fail, not skip


@pytest.fixture(scope="module")
def executor():
    from bnlab.experiments.executors import RayExecutor

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ex = RayExecutor(num_cpus=2)
    yield ex
    ex.shutdown()


REQUEST = CompareRequest(preset="torch-mlp", seeds=2, epochs=1,
                         settings={"hidden": [16], "batch_size": 32, "eval_every": 5})


@pytest.mark.slow
def test_variants_as_ray_tasks_equal_the_sequential_runner(executor, tmp_path):
    data = fake_dataset(n_train=192, n_test=64)
    with RunStore(tmp_path / "ray.sqlite") as store:
        on_ray = run_compare(REQUEST, store, progress=False, dataset=data, executor=executor)
        assert all(not v["reused"] for v in on_ray["variants"].values())
        runs = store.runs()
        assert len(runs) == 4 and all(r.status == "finished" for r in runs)
        assert all(store.checkpoint_path(r.group_id).exists() for r in runs)
        again = run_compare(REQUEST, store, progress=False, dataset=data, executor=executor)
        assert all(v["reused"] for v in again["variants"].values()) and len(store.runs()) == 4
    with RunStore(tmp_path / "here.sqlite") as store:
        here = run_compare(REQUEST, store, progress=False, dataset=data)
    for label, variant in here["variants"].items():
        ours = [r["final_test_acc"] for r in on_ray["variants"][label]["per_seed"]]
        theirs = [r["final_test_acc"] for r in variant["per_seed"]]
        assert ours == pytest.approx(theirs, abs=1e-6), label


def _dies_once(marker: str, value: int) -> int:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker process dies mid-task
    return value * 2


@pytest.mark.slow
def test_a_task_whose_worker_dies_is_run_again(executor, tmp_path):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    assert executor.map(_dies_once, [(str(tmp_path / "died"), 21)]) == [42]
    assert (tmp_path / "died").exists()  # the first attempt did die


@pytest.fixture
def without_ray(monkeypatch):
    """``import ray`` fails, as where the [ray] extra is not installed."""
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)


def test_without_ray_the_executor_says_how_to_install_it(without_ray):
    from bnlab.errors import BnlabError
    from bnlab.experiments.executors import RayExecutor

    with pytest.raises(BnlabError, match=r"pip install 'bnlab\[ray\]'"):
        RayExecutor()


@pytest.mark.parametrize("command", [["compare", "--ray"], ["claims", "run", "ics", "--ray"]])
def test_the_ray_flag_without_ray_is_a_clear_error(command, without_ray, tmp_path, capsys):
    from bnlab.cli.main import main

    code = main([*command, "--store", str(tmp_path / "runs.sqlite")])
    assert code != 0 and "pip install 'bnlab[ray]'" in capsys.readouterr().err
    if command[0] == "compare":  # the flag is checked before the store is opened
        assert not (tmp_path / "runs.sqlite").exists()


def test_claims_take_jobs_or_ray_not_both(tmp_path, capsys):
    from bnlab.cli.main import main

    assert main(["claims", "run", "ics", "placement", "--ray", "--jobs", "2", "--store", str(tmp_path / "r.sqlite")]) == 2
    assert "not both" in capsys.readouterr().err


def _flat(value, prefix=""):
    """Every number of a claim's numbers, keyed by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["higher-lr", "ics", "frozen-transfer", "bn-lag"])
def test_claims_on_ray_equal_the_sequential_runner(name, executor, tmp_path, tiny_protocols):
    """Claims whose arms go to Ray as tasks (several at once through train_all, probes riding along,
    claim 11's fine-tuning starting from a checkpoint the driver sends) give the numbers and verdict of
    the same claims run here; only the driver writes the store, and a rerun trains nothing."""
    from bnlab.experiments.claims import CLAIMS, ClaimContext

    datasets = {"mnist": fake_dataset(n_train=128, n_test=100), "fashion": fake_dataset(n_train=128, n_test=100,
                                                                                       name="fashion")}
    results = {}
    for where, ex in (("ray", executor), ("here", None)):
        with RunStore(tmp_path / f"{where}.sqlite") as store:
            ctx = ClaimContext(store=store, quick=True, seeds=2, out_dir=tmp_path, progress=False,
                               datasets=datasets, executor=ex)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as the tasks do: the same reductions, the same bits
            try:
                results[where] = CLAIMS[name].execute(ctx)
                if ex is not None:
                    assert ctx._remote_seconds  # the arms did train as tasks
                    runs = store.runs()
                    assert runs and all(r.status == "finished" for r in runs)
                    # each arm trained once: on Ray, then read back by ctx.train, not trained again here
                    assert len({r.group_id for r in runs}) == ctx.arms_done
                    again = CLAIMS[name].execute(ctx)
                    assert len(store.runs()) == len(runs) and again.numbers == results[where].numbers
            finally:
                torch.set_num_threads(threads)
    ray_numbers, here_numbers = _flat(results["ray"].numbers), _flat(results["here"].numbers)
    assert ray_numbers.keys() == here_numbers.keys()
    for key, value in here_numbers.items():
        if isinstance(value, float):
            assert ray_numbers[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key
        else:
            assert ray_numbers[key] == value, key
    assert results["ray"].verdict == results["here"].verdict
