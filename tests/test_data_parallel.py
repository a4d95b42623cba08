"""bnlab train's data-parallel engine: two gloo processes train the model one process trains."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from bnlab.store import RunStore
from bnlab.train.distributed import train_data_parallel
from helpers import free_port, run_workers

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import ddp_worker  # noqa: E402
from fakes import fake_dataset  # noqa: E402


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path, monkeypatch):
    port, out = free_port(), tmp_path / "rank0.pt"
    procs = run_workers([[sys.executable, str(HERE / "ddp_worker.py"), str(rank), "2", str(port), str(out)]
                         for rank in range(2)], 180, "a data-parallel worker", env={**os.environ, "PYTHONPATH": str(HERE)})
    assert all(p.returncode == 0 for p in procs), [p.stderr.read().decode()[-2000:] for p in procs]
    parallel = torch.load(out)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    store = RunStore(tmp_path / "runs.sqlite")
    single = train_data_parallel(ddp_worker.SPEC, ddp_worker.CFG, fake_dataset(n_train=ddp_worker.N_TRAIN, n_test=100), seed=3,
                                 store=store, log=lambda *a: None)
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(parallel["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert parallel["test_acc"] == pytest.approx(single.test_acc, abs=0.011)
    (record,) = store.runs()
    assert record.status == "finished" and store.metrics(record.id)["test_acc"][-1][1] == pytest.approx(single.test_acc)


def test_a_batch_that_does_not_split_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="does not split over 3 workers"):
        train_data_parallel(ddp_worker.SPEC, ddp_worker.CFG, fake_dataset(n_train=64, n_test=10))


def test_train_command_rejects_an_unknown_preset(capsys):
    from bnlab.cli.main import main

    assert main(["train", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_settings_it_does_not_do_are_refused():
    with pytest.raises(ValueError, match="does not do accumulate, bf16"):
        train_data_parallel(ddp_worker.SPEC, ddp_worker.CFG.with_(accumulate=2, bf16=True),
                            fake_dataset(n_train=64, n_test=10))


class _Interrupted(Exception):
    pass


def _single(monkeypatch, **kwargs):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    cfg = ddp_worker.CFG.with_(checkpoint_every=kwargs.pop("checkpoint_every", 500))
    return train_data_parallel(ddp_worker.SPEC, cfg, fake_dataset(n_train=ddp_worker.N_TRAIN, n_test=100), seed=3,
                               **kwargs)


def _stop_at(step: int):
    def log(message: str) -> None:
        if message.startswith(f"step {step}/"):
            raise _Interrupted  # a worker killed right after the evaluation of this step
    return log


def test_an_interrupted_run_resumes_from_its_checkpoint_and_trains_what_an_uninterrupted_one_trains(tmp_path,
                                                                                                   monkeypatch):
    whole = _single(monkeypatch, log=lambda *a: None)
    checkpoint = tmp_path / "train.pt"
    with pytest.raises(_Interrupted):  # step 16 of 24: an epoch boundary lies behind (11 batches an epoch)
        _single(monkeypatch, checkpoint=checkpoint, checkpoint_every=8, log=_stop_at(16))
    assert torch.load(checkpoint, weights_only=True)["step"] == 16
    said = []
    resumed = _single(monkeypatch, checkpoint=checkpoint, checkpoint_every=4, log=said.append)  # cadence may change
    assert said[0] == f"resuming from {checkpoint} at step 16"
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_a_checkpoint_of_another_run_is_an_error_not_a_silent_restart(tmp_path, monkeypatch):
    checkpoint = tmp_path / "train.pt"
    _single(monkeypatch, checkpoint=checkpoint, log=lambda *a: None)
    monkeypatch.setattr(ddp_worker, "CFG", ddp_worker.CFG.with_(lr=0.05))
    with pytest.raises(ValueError, match="another model, training config or seed"):
        _single(monkeypatch, checkpoint=checkpoint, log=lambda *a: None)
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is damaged.*delete it to start afresh"):
        _single(monkeypatch, checkpoint=checkpoint, log=lambda *a: None)


@pytest.mark.slow
def test_a_run_checkpointed_on_one_process_resumes_on_two(tmp_path, monkeypatch):
    whole = _single(monkeypatch, log=lambda *a: None)
    checkpoint, port, out = tmp_path / "train.pt", free_port(), tmp_path / "rank0.pt"
    with pytest.raises(_Interrupted):
        _single(monkeypatch, checkpoint=checkpoint, checkpoint_every=8, log=_stop_at(8))
    procs = run_workers([[sys.executable, str(HERE / "ddp_worker.py"), str(rank), "2", str(port), str(out),
                          str(checkpoint)] for rank in range(2)], 180, "a data-parallel worker",
                        env={**os.environ, "PYTHONPATH": str(HERE)})
    assert all(p.returncode == 0 for p in procs), [p.stderr.read().decode()[-2000:] for p in procs]
    parallel = torch.load(out)
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(parallel["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
