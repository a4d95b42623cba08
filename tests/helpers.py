"""Shared test helpers: twin layers (ours and torch's with the same parameters) and comparing them."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
import torch

import bnlab.nn as bnn

TORCH_OF = {bnn.BatchNorm1d: torch.nn.BatchNorm1d, bnn.BatchNorm2d: torch.nn.BatchNorm2d, bnn.BatchNorm3d: torch.nn.BatchNorm3d}
OURS_FOR_NDIM = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}


def twin(ours_cls, theirs_cls, *args, **kwargs):
    """A bnlab layer and its torch.nn counterpart built with the same arguments and the same
    non-trivial parameters (weights in [0.5, 1.5), biases around 0), so a forgotten affine shows."""
    ours, theirs = ours_cls(*args, **kwargs), theirs_cls(*args, **kwargs)
    with torch.no_grad():
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            p.copy_(torch.rand_like(p) + 0.5 if name == "weight" else torch.randn_like(p) * 0.5)
            q.copy_(p)
    return ours, theirs


def step(layer, x, upstream):
    """Forward, then backward with a fixed upstream gradient; returns (y, dx, dweight, dbias)."""
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(upstream)
    grads = [p.grad.clone() if p is not None and p.grad is not None else None for p in (layer.weight, layer.bias)]
    layer.zero_grad()
    return y.detach(), x.grad, *grads


def assert_close_or_none(a, b, **tol):
    if a is None or b is None:
        assert a is None and b is None
    else:
        torch.testing.assert_close(a, b, **tol)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a test's process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(commands: list[list[str]], timeout: float, what: str, **popen) -> list[subprocess.Popen]:
    """Start one process per command, wait for all within ``timeout`` seconds in total, kill them all and
    fail the test if one hangs (a distributed test must never hang the suite); returns the finished processes."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen) for c in commands]
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{what} hung past {timeout:.0f} s")
    return procs
