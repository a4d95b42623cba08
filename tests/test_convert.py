"""bnlab.tools.convert against torch.nn and real Keras 3 (torch backend): same outputs, same moving averages."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.tools import KerasBatchNorm, convert_batchnorm, from_keras, to_keras

os.environ.setdefault("KERAS_BACKEND", "torch")


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 5),
                          nn.BatchNorm1d(5, momentum=0.3))
    model[4].weight.requires_grad_(False)
    return model


def _steps(model, n=3):
    outs = []
    for i in range(n):
        x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i))
        outs.append(model(x))
    return outs


def test_to_bnlab_and_back_is_bit_identical():
    model = _model()
    _steps(model, 2)  # statistics away from their initial values
    ours = convert_batchnorm(model, "bnlab")
    assert type(ours[1]) is bnn.BatchNorm2d and type(ours[5]) is bnn.BatchNorm1d
    assert ours[5].momentum == 0.3 and ours[5].num_batches_tracked.item() == 2
    assert not ours[4].weight.requires_grad and ours.training
    for a, b in zip(_steps(model), _steps(ours)):
        assert torch.equal(a, b)
    back = convert_batchnorm(ours, "torch")
    assert type(back[1]) is nn.BatchNorm2d
    model.eval(), back.eval()
    for a, b in zip(_steps(model), _steps(back)):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_to_the_keras_convention_keeps_the_moving_average():
    model = _model()
    keras_style = convert_batchnorm(model, "bnlab", convention="keras")
    assert keras_style[1].convention == "keras" and keras_style[1].momentum == pytest.approx(0.9)
    for a, b in zip(_steps(model), _steps(keras_style)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(keras_style[1].running_mean, model[1].running_mean)  # the same average
    back = convert_batchnorm(keras_style, "torch")
    assert type(back[1]) is nn.BatchNorm2d and back[1].momentum == pytest.approx(0.1)


def test_what_torch_cannot_represent_is_refused():
    with pytest.raises(ValueError, match="no torch.nn equivalent"):
        convert_batchnorm(nn.Sequential(bnn.BatchRenorm1d(3)), "torch")
    with pytest.raises(ValueError, match="bias=False"):
        convert_batchnorm(bnn.BatchNorm1d(3, bias=False), "torch")
    with pytest.raises(ValueError, match="to must be"):
        convert_batchnorm(nn.BatchNorm1d(3), "jax")
    with pytest.warns(UserWarning, match="skip_nonfinite_update"):
        convert_batchnorm(bnn.BatchNorm1d(3, skip_nonfinite_update=True), "torch")


@pytest.fixture
def keras_layer():
    keras = pytest.importorskip("keras")
    layer = keras.layers.BatchNormalization(axis=1, momentum=0.95, epsilon=2e-3)
    layer.build((16, 4))
    g = np.random.default_rng(0)
    layer.set_weights([g.random(4).astype("float32") + 0.5, g.standard_normal(4).astype("float32"),
                       g.standard_normal(4).astype("float32"), g.random(4).astype("float32") + 0.3])
    return layer


@pytest.mark.parametrize("target", [lambda: nn.BatchNorm1d(4), lambda: bnn.BatchNorm1d(4),
                                    lambda: bnn.BatchNorm1d(4, convention="keras")], ids=["torch.nn", "bnlab", "keras"])
def test_from_keras_gives_keras_inference_and_continues_its_average(keras_layer, target):
    layer = from_keras(keras_layer, target())
    x = torch.randn(16, 4) * 2 + 1
    want = keras_layer(x, training=False).detach()
    torch.testing.assert_close(layer.eval()(x), want, rtol=1e-5, atol=1e-5)
    assert layer.eps == pytest.approx(2e-3)
    keras_layer(x, training=True)  # one training step each: the moving means must agree
    layer.train()(x)
    torch.testing.assert_close(layer.running_mean, torch.as_tensor(np.asarray(keras_layer.moving_mean)),
                               rtol=1e-5, atol=1e-6)


def test_to_keras_round_trip_through_a_real_keras_layer():
    keras = pytest.importorskip("keras")
    ours = bnn.BatchNorm2d(3)
    ours(torch.randn(8, 3, 4, 4) * 3 + 2)
    ours.eval()
    state = to_keras(ours)
    assert state.momentum == pytest.approx(0.9) and state.epsilon == pytest.approx(1e-5)
    theirs = keras.layers.BatchNormalization(axis=1, momentum=state.momentum, epsilon=state.epsilon)
    theirs.build((8, 3, 4, 4))
    theirs.set_weights(state.weights())
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(theirs(x, training=False).detach(), ours(x), rtol=1e-5, atol=1e-5)
    again = from_keras(KerasBatchNorm.of(theirs), bnn.BatchNorm2d(3))
    torch.testing.assert_close(again.eval()(x), ours(x))


def test_convert_momentum_command(capsys):
    from bnlab.cli.main import main

    assert main(["convert-momentum", "0.99", "--from", "keras"]) == 0
    out = capsys.readouterr().out
    assert "torch momentum 0.01" in out and "100 batches" in out
    assert main(["convert-momentum", "0.1", "--from", "torch"]) == 0
    assert "Keras momentum 0.9" in capsys.readouterr().out
    assert main(["convert-momentum", "1.5", "--from", "keras"]) == 2
