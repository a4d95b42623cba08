"""The NumPy reference against torch autograd, and bnlab's layers against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlab import reference as ref
from helpers import OURS_FOR_NDIM

F64 = dict(rtol=1e-10, atol=1e-12)


def _torch_bn64(x, gamma, beta, state, training, momentum, eps):
    """torch.nn.functional.batch_norm in float64 with autograd: the independent truth."""
    xt = torch.tensor(x, requires_grad=True)
    g = torch.tensor(gamma, requires_grad=True)
    b = torch.tensor(beta, requires_grad=True)
    rm, rv = torch.tensor(state.mean), torch.tensor(state.var)
    y = torch.nn.functional.batch_norm(xt, rm, rv, g, b, training, momentum, eps)
    return xt, g, b, y, rm, rv


@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5), (3, 2, 4, 4), (2, 2, 2, 3, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_reference_forward_and_backward_match_torch_float64(shape, training):
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=shape)
    gamma, beta = rng.uniform(0.5, 1.5, shape[1]), rng.normal(size=shape[1])
    state = ref.RunningStats(rng.normal(size=shape[1]), rng.uniform(0.5, 2, shape[1]), 3)
    y, cache, new_state = ref.batch_norm_forward(x, gamma, beta, state, training=training, momentum=0.1, eps=1e-5)

    xt, g, b, yt, rm, rv = _torch_bn64(x, gamma, beta, state, training, 0.1, 1e-5)
    np.testing.assert_allclose(y, yt.detach().numpy(), **F64)
    np.testing.assert_allclose(new_state.mean, rm.numpy(), **F64)
    np.testing.assert_allclose(new_state.var, rv.numpy(), **F64)

    dy = rng.normal(size=shape)
    yt.backward(torch.tensor(dy))
    dx, dgamma, dbeta = ref.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dgamma, g.grad.numpy(), **F64)
    np.testing.assert_allclose(dbeta, b.grad.numpy(), **F64)
    if training:
        fused = ref.batch_norm_backward_fused(dy, cache)
        for a, b_ in zip(fused, (dx, dgamma, dbeta)):
            np.testing.assert_allclose(a, b_, rtol=1e-9, atol=1e-11)


def test_reference_is_pure():
    x = np.arange(12.0).reshape(4, 3)
    state = ref.RunningStats.initial(3)
    x_before, mean_before = x.copy(), state.mean.copy()
    _, _, new_state = ref.batch_norm_forward(x, np.ones(3), np.zeros(3), state, training=True)
    assert np.array_equal(x, x_before) and np.array_equal(state.mean, mean_before)
    assert state.num_batches_tracked == 0 and new_state.num_batches_tracked == 1
    _, _, same = ref.batch_norm_forward(x, np.ones(3), np.zeros(3), new_state, training=False)
    assert same is new_state


def test_reference_cumulative_average_with_momentum_none():
    rng = np.random.default_rng(2)
    batches = [rng.normal(i, 1 + i, size=(6, 2)) for i in range(4)]
    state = ref.RunningStats.initial(2)
    for xb in batches:
        _, _, state = ref.batch_norm_forward(xb, np.ones(2), np.zeros(2), state, training=True, momentum=None)
    np.testing.assert_allclose(state.mean, np.mean([xb.mean(0) for xb in batches], axis=0), **F64)
    np.testing.assert_allclose(state.var, np.mean([xb.var(0, ddof=1) for xb in batches], axis=0), **F64)


def test_keras_convention_keeps_biased_variance():
    x = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    _, _, state = ref.batch_norm_forward(x, np.ones(1), np.zeros(1), ref.RunningStats.initial(1), training=True,
                                         momentum=0.0, convention="keras")
    np.testing.assert_allclose(state.var, [1553.36], rtol=1e-12)  # Keras' own doc example


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("convention,momentum", [("torch", 0.1), ("torch", None), ("keras", 0.9)])
def test_bnlab_layers_match_reference(ndim, convention, momentum):
    rng = np.random.default_rng(ndim)
    shape = (6, 3) + (4,) * (ndim - 2)
    layer = OURS_FOR_NDIM[ndim](3, momentum=momentum, convention=convention)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(gamma)), layer.bias.copy_(torch.tensor(beta))
    state = ref.RunningStats.initial(3)
    for step in range(3):
        x = rng.normal(step, 1 + step, size=shape)
        y_ref, cache, state = ref.batch_norm_forward(x, gamma, beta, state, training=True, momentum=momentum,
                                                     eps=layer.eps, convention=convention)
        xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
        y = layer(xt)
        dy = rng.normal(size=shape)
        y.backward(torch.tensor(dy, dtype=torch.float32))
        dx_ref, dgamma_ref, _ = ref.batch_norm_backward(dy, cache)
        assert ref.compare("y", y, y_ref, rtol=1e-4, atol=1e-5, echo=False).approximate
        assert ref.compare("dx", xt.grad, dx_ref, rtol=1e-3, atol=1e-4, echo=False).approximate
        assert ref.compare("dgamma", layer.weight.grad, dgamma_ref, rtol=1e-4, atol=1e-4, echo=False).approximate
        assert ref.compare("running_var", layer.running_var, state.var, rtol=1e-5, atol=1e-6, echo=False).approximate
        layer.zero_grad()


def test_compare_prints_exact_approximate_maxdiff(capsys):
    a = np.array([1.0, 2.0, 3.0])
    same = ref.compare("same", a, a.copy())
    close = ref.compare("close", a + 1e-9, a)
    far = ref.compare("far", a + 0.5, a)
    out = capsys.readouterr().out.splitlines()
    assert same.exact and same.approximate and same.max_abs_diff == 0.0
    assert not close.exact and close.approximate
    assert not far.approximate and far.max_abs_diff == pytest.approx(0.5)
    assert out[2].startswith("far") and "exact: False" in out[2] and "maxdiff: 0.5" in out[2]
    with pytest.raises(ValueError, match="shapes differ"):
        ref.compare("bad", a, a[:2])
