"""Shared test helpers: building twin layers and comparing them."""

from __future__ import annotations

import torch

import bnlab.nn as bnn

TORCH_OF = {bnn.BatchNorm1d: torch.nn.BatchNorm1d, bnn.BatchNorm2d: torch.nn.BatchNorm2d, bnn.BatchNorm3d: torch.nn.BatchNorm3d}
OURS_FOR_NDIM = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}


def twin_layers(ours_cls, num_features, **kwargs):
    """An bnlab layer and a torch.nn layer with identical, non-trivial parameters."""
    ours = ours_cls(num_features, **kwargs)
    theirs = TORCH_OF[ours_cls](num_features, **kwargs)
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.copy_(torch.rand(num_features, dtype=ours.weight.dtype) + 0.5)
            theirs.weight.copy_(ours.weight)
        if ours.bias is not None:
            ours.bias.copy_(torch.randn(num_features, dtype=ours.bias.dtype))
            theirs.bias.copy_(ours.bias)
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
