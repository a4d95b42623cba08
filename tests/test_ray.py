"""The lab on Ray: compare's variants as tasks on a local 2-CPU Ray instance give what the sequential runner
gives, the store has one writer, a rerun reuses, and a task whose worker dies is run again."""

from __future__ import annotations

import os

import pytest
import torch

from bnlab.experiments.compare import CompareRequest, run_compare
from bnlab.store import RunStore
from fakes import fake_dataset

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


def test_without_ray_the_flag_says_how_to_install_it(monkeypatch):
    import builtins

    from bnlab.errors import BnlabError
    from bnlab.experiments.executors import RayExecutor

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(BnlabError, match=r"pip install 'bnlab\[ray\]'"):
        RayExecutor()
