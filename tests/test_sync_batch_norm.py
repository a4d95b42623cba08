"""bnlab.nn.SyncBatchNorm across 2 and 3 gloo processes on this machine: slices of one batch (equal, unequal,
empty) give what one process gives on the whole batch; a dead worker is a clear error, not a hang."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from helpers import free_port, run_workers

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402


def _run(case: str, tmp_path: Path, timeout: float = 120.0) -> list[dict | None]:
    world = len(dist_worker.SLICES[case])
    port = free_port()
    outs = [tmp_path / f"{case}-{rank}.pt" for rank in range(world)]
    run_workers([[sys.executable, str(HERE / "dist_worker.py"), str(rank), str(world), str(port), case,
                  str(outs[rank])] for rank in range(world)], timeout, f"case {case!r}: a worker")
    return [torch.load(o) if o.exists() else None for o in outs]


def _single_process(case: str):
    x, up = dist_worker.full_batch(case)
    bn = dist_worker.layer("keras" if case == "unequal" else "torch")
    single = bnn.BatchNorm2d if x.dim() == 4 else bnn.BatchNorm1d
    ref = single(6, convention=bn.convention)
    ref.load_state_dict(bn.state_dict())
    x = x.clone().requires_grad_(True)
    for _ in range(2):
        y = ref(x)
    y.backward(up)
    return {"y": y.detach(), "dx": x.grad, "dw": ref.weight.grad, "db": ref.bias.grad,
            "running_mean": ref.running_mean, "running_var": ref.running_var}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["equal", "unequal", "empty", "rows"])
def test_slices_across_workers_equal_one_process_on_the_whole_batch(case, tmp_path):
    results = _run(case, tmp_path)
    assert all(r is not None and "error" not in r for r in results), results
    want = _single_process(case)
    tol = dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), want["y"], **tol)
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]), want["dx"], rtol=1e-4, atol=2e-5)
    # parameter gradients are each worker's own: summed (as DDP's all-reduce does, up to its averaging) they
    # are the whole batch's
    torch.testing.assert_close(sum(r["dw"] for r in results), want["dw"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sum(r["db"] for r in results), want["db"], rtol=1e-4, atol=1e-4)
    for r in results:  # every worker keeps the same running statistics, the whole batch's
        torch.testing.assert_close(r["running_mean"], want["running_mean"], **tol)
        torch.testing.assert_close(r["running_var"], want["running_var"], **tol)


@pytest.mark.slow
def test_a_worker_that_dies_is_a_clear_error_within_the_timeout(tmp_path):
    started = time.monotonic()
    survivor, dead = _run("die", tmp_path, timeout=90)
    assert dead is None
    assert survivor is not None and "SyncBatchNorm: the all-gather" in survivor["error"], survivor
    assert time.monotonic() - started < 90


def test_without_a_process_group_it_is_batch_norm():
    ours, plain = bnn.SyncBatchNorm(4), bnn.BatchNorm2d(4)
    x = torch.randn(8, 4, 3, 3)
    assert torch.equal(ours(x), plain(x)) and torch.equal(ours.running_var, plain.running_var)


def test_convert_and_revert_keep_the_state_and_the_class():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3),
                          nn.Sequential(nn.Flatten(), nn.Linear(16, 5), bnn.BatchNorm1d(5, convention="keras")))
    model(torch.randn(8, 3, 4, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    synced = bnn.convert_sync_batchnorm(model)
    assert isinstance(synced[1], bnn.SyncBatchNorm) and isinstance(synced[2][2], bnn.SyncBatchNorm)
    assert synced[1].momentum == 0.3 and synced[2][2].convention == "keras"
    assert all(torch.equal(v, state[k]) for k, v in synced.state_dict().items())
    back = bnn.revert_sync_batchnorm(synced)
    assert type(back[1]) is bnn.BatchNorm2d and type(back[2][2]) is bnn.BatchNorm1d
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items())


def test_convert_keeps_a_cumulative_average_and_revert_keeps_dtype():
    model = nn.Sequential(nn.BatchNorm2d(4, momentum=None, dtype=torch.float64))
    synced = bnn.convert_sync_batchnorm(model)
    assert synced[0].momentum is None
    assert bnn.SyncBatchNorm(3).momentum == 0.1 and bnn.SyncBatchNorm(3, convention="keras").momentum == 0.99
    back = bnn.revert_sync_batchnorm(synced)
    assert back[0].momentum is None and back[0].running_var.dtype == torch.float64
    assert back[0].weight.dtype == torch.float64


def test_converting_a_sync_layer_to_torch_says_what_to_do():
    from bnlab.tools import convert_batchnorm

    with pytest.raises(ValueError, match="revert_sync_batchnorm"):
        convert_batchnorm(nn.Sequential(bnn.SyncBatchNorm(3)), "torch")
