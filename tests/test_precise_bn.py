"""bnlab.tools.recompute_bn_stats against hand-written pooled statistics and torch's own cumulative average."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.models import ModelSpec, StackedModel, build_model
from bnlab.tools import recompute_bn_stats


def _data(n=600, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0])[:c] + torch.tensor([5.0, -2.0, 0.0, 1.0])[:c]


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(4), bnn.BatchNorm1d(4)], ids=["torch", "bnlab"])
@pytest.mark.parametrize("sizes", [(600,), (100,) * 6, (7, 93, 250, 250)])
def test_population_statistics_of_the_first_layer_do_not_depend_on_the_split(layer, sizes):
    x = _data()
    model = nn.Sequential(layer)
    used = recompute_bn_stats(model, list(torch.split(x, list(sizes))))
    assert used == len(sizes)
    torch.testing.assert_close(layer.running_mean, x.mean(0))
    torch.testing.assert_close(layer.running_var, x.var(0))  # unbiased over all 600 samples, as torch stores it


def test_keras_convention_stores_the_biased_variance():
    x = _data()
    layer = bnn.BatchNorm1d(4, convention="keras")
    recompute_bn_stats(nn.Sequential(layer), torch.split(x, 50))
    torch.testing.assert_close(layer.running_var, x.var(0, correction=0))


def test_batch_mean_estimator_is_the_size_weighted_mean_of_batch_variances():
    x = _data()
    layer = nn.BatchNorm1d(4)
    batches = list(torch.split(x, [100, 200, 300]))
    recompute_bn_stats(nn.Sequential(layer), batches, estimator="batch_mean")
    want = sum(len(b) * b.var(0, correction=0) for b in batches) / 600 * 600 / 599
    torch.testing.assert_close(layer.running_var, want)
    torch.testing.assert_close(layer.running_mean, x.mean(0))


def test_deep_layers_match_torchs_cumulative_average_over_equal_batches():
    """torch's momentum=None running average, over equal batches of n, is the mean of the batch means and of
    the unbiased batch variances: the same batch statistics, so ours must equal it up to the Bessel factors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6), nn.BatchNorm1d(6))
    reference = copy.deepcopy(model)
    batches, n = list(torch.split(_data(), 50)), 50
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None
    reference.train()
    with torch.no_grad():
        for b in batches:
            reference(b)
    model.eval()
    recompute_bn_stats(model, batches, estimator="batch_mean")
    total = n * len(batches)
    for ours, theirs in ((model[1], reference[1]), (model[4], reference[4])):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var * (n - 1) / n * total / (total - 1))


def test_modes_momentum_counters_and_rng_are_left_as_they_were():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=0.3), nn.Dropout(0.5), nn.Linear(8, 3))
    model.eval()
    model[2].train()  # an odd mix, to see that each module keeps its own mode
    tracked = model[1].num_batches_tracked.clone()
    rng = torch.get_rng_state()
    recompute_bn_stats(model, torch.split(_data(), 100), num_batches=2)
    assert [m.training for m in model] == [False, False, True, False]
    assert model[1].momentum == 0.3 and torch.equal(model[1].num_batches_tracked, tracked)
    assert torch.equal(torch.get_rng_state(), rng)


def test_num_batches_limits_the_batches_used_and_a_dataloader_style_tuple_works():
    x = _data()
    layer = nn.BatchNorm1d(4)
    used = recompute_bn_stats(nn.Sequential(layer), [(b, torch.zeros(len(b))) for b in torch.split(x, 100)], num_batches=3)
    assert used == 3
    torch.testing.assert_close(layer.running_mean, x[:300].mean(0))


def test_a_stacked_model_gets_each_models_own_statistics():
    spec = ModelSpec(hidden=(8, 6), norm="batch")
    models = [build_model(spec, seed=s) for s in (0, 1)]
    stacked = StackedModel(copy.deepcopy(models))
    x = torch.randn(300, 784)
    batches = list(torch.split(x, 60))
    recompute_bn_stats(stacked, batches)
    for model, back in zip(models, stacked.write_back()):
        recompute_bn_stats(model, batches)
        for (name, ours), (_, single) in zip(back.named_buffers(), model.named_buffers()):
            if "running" in name:
                torch.testing.assert_close(ours, single, rtol=1e-4, atol=1e-5)


def test_bad_calls_say_what_is_wrong_and_change_nothing():
    layer = nn.BatchNorm1d(4)
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match="no batches"):
        recompute_bn_stats(model, [])
    assert torch.equal(layer.running_mean, torch.zeros(4)) and torch.equal(layer.running_var, torch.ones(4))
    with pytest.raises(ValueError, match="estimator"):
        recompute_bn_stats(model, [_data()], estimator="median")
    with pytest.raises(ValueError, match="no batch norm"):
        recompute_bn_stats(nn.Sequential(nn.Linear(4, 4)), [_data()])
    with pytest.raises(ValueError, match="num_batches"):
        recompute_bn_stats(model, [_data()], num_batches=0)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.unused = nn.BatchNorm1d(4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.first(x)


def test_a_batch_norm_the_passes_never_reach_is_an_error_and_nothing_is_written():
    model = Branchy()
    with pytest.raises(ValueError, match="no values reached unused"):
        recompute_bn_stats(model, [_data()])
    assert torch.equal(model.first.running_mean, torch.zeros(4))  # all or nothing


def test_empty_batches_add_nothing():
    x = _data()
    layer = nn.BatchNorm1d(4)
    recompute_bn_stats(nn.Sequential(layer), [x[:0], x, x[:0]])
    torch.testing.assert_close(layer.running_mean, x.mean(0))
