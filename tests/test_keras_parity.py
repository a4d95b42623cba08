"""convention="keras" against real keras.layers.BatchNormalization (Keras 3, torch backend).

Both layers see the same inputs and upstream gradients step after step; outputs,
input/γ/β gradients and the moving statistics must agree at every step.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

import bnlab.nn as bnn  # noqa: E402
from helpers import OURS_FOR_NDIM  # noqa: E402

if keras.backend.backend() != "torch":  # pragma: no cover - conftest sets it first
    pytest.skip("Keras was imported with another backend", allow_module_level=True)

TOL = dict(rtol=2e-5, atol=2e-5)


def _twins(shape, momentum, epsilon, center=True):
    channels = shape[1]
    theirs = keras.layers.BatchNormalization(axis=1, momentum=momentum, epsilon=epsilon, center=center)
    theirs.build(shape)
    gamma, beta = torch.rand(channels) + 0.5, torch.randn(channels)
    theirs.gamma.assign(gamma)
    if center:
        theirs.beta.assign(beta)
    ours = OURS_FOR_NDIM[len(shape)](channels, momentum=momentum, eps=epsilon, convention="keras", bias=center)
    with torch.no_grad():
        ours.weight.copy_(gamma)
        if center:
            ours.bias.copy_(beta)
    return ours, theirs


def _keras_step(layer, x, upstream, training):
    x = x.clone().requires_grad_(True)
    y = layer(x, training=training)
    y.backward(upstream)
    grads = [v.value.grad.clone() if v.value.grad is not None else None for v in (layer.gamma, layer.beta) if v is not None]
    for v in (layer.gamma, layer.beta):
        if v is not None:
            v.value.grad = None
    return y.detach(), x.grad, grads


def _our_step(layer, x, upstream):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(upstream)
    grads = [p.grad.clone() for p in (layer.weight, layer.bias) if p is not None]
    layer.zero_grad()
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("shape", [(32, 6), (8, 4, 9), (8, 3, 5, 5), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("momentum,epsilon", [(0.99, 1e-3), (0.9, 1e-5), (0.0, 1e-3), (0.5, 0.1)])
def test_matches_keras_step_by_step(shape, momentum, epsilon):
    ours, theirs = _twins(shape, momentum, epsilon)
    for step in range(4):
        x = torch.randn(shape) * (1 + step) + step
        upstream = torch.randn(shape)
        y_k, dx_k, grads_k = _keras_step(theirs, x, upstream, training=True)
        y_o, dx_o, grads_o = _our_step(ours, x, upstream)
        torch.testing.assert_close(y_o, y_k, **TOL)
        torch.testing.assert_close(dx_o, dx_k, **TOL)
        for a, b in zip(grads_o, grads_k):
            torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(ours.running_mean, theirs.moving_mean.value.detach(), **TOL)
        torch.testing.assert_close(ours.running_var, theirs.moving_variance.value.detach(), **TOL)
    ours.eval()
    x, upstream = torch.randn(shape), torch.randn(shape)
    y_k, dx_k, _ = _keras_step(theirs, x, upstream, training=False)
    y_o, dx_o, _ = _our_step(ours, x, upstream)
    torch.testing.assert_close(y_o, y_k, **TOL)
    torch.testing.assert_close(dx_o, dx_k, **TOL)


def test_matches_keras_without_center():
    ours, theirs = _twins((16, 5), 0.9, 1e-3, center=False)
    x, upstream = torch.randn(16, 5) * 4, torch.randn(16, 5)
    y_k, dx_k, _ = _keras_step(theirs, x, upstream, training=True)
    y_o, dx_o, _ = _our_step(ours, x, upstream)
    torch.testing.assert_close(y_o, y_k, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.moving_variance.value.detach(), **TOL)


def test_keras_defaults():
    ours = bnn.BatchNorm2d(3, convention="keras")
    theirs = keras.layers.BatchNormalization()
    assert ours.momentum == theirs.momentum == 0.99
    assert ours.eps == theirs.epsilon == 1e-3
    explicit = bnn.BatchNorm2d(3, eps=1e-5, convention="keras")
    assert explicit.eps == 1e-5  # an explicit value wins over the convention default
