"""bnlab.tools.fold_batchnorm: the folded model computes what the eval-mode model computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.tools import fold_batchnorm


def _randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.2)
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if p is not None and isinstance(m, (nn.modules.batchnorm._BatchNorm,)):
                    p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _check(model, x, folded_count, rtol=1e-5, atol=1e-5):
    model = _randomize_statistics(model)
    folded, report = fold_batchnorm(model)
    assert len(report.folded) == folded_count, str(report)
    torch.testing.assert_close(folded(x), model(x), rtol=rtol, atol=atol)
    remaining = [m for m in folded.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm,))]
    assert len(remaining) == len(report.kept)
    return folded, report


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, bnn.BatchNorm2d, lambda c: bnn.BatchNorm2d(c, convention="keras"),
                                  bnn.BatchRenorm2d, lambda c: bnn.GhostBatchNorm2d(c, virtual_batch_size=2),
                                  bnn.FrozenBatchNorm2d],
                         ids=["torch", "bnlab", "keras", "renorm", "ghost", "frozen"])
def test_every_batch_norm_kind_after_a_convolution(norm):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), norm(8), nn.ReLU(), nn.Conv2d(8, 4, 3), norm(4))
    if isinstance(model[1], bnn.FrozenBatchNorm2d):
        with torch.no_grad():
            for m in (model[1], model[4]):
                m.weight.copy_(torch.rand(m.weight.shape) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape))
                m.running_mean.copy_(torch.randn(m.running_mean.shape))
    _check(model, torch.randn(4, 3, 10, 10), 2)


@pytest.mark.parametrize("layer,norm,shape", [
    (lambda: nn.Linear(6, 5), nn.BatchNorm1d(5), (7, 6)),
    (lambda: nn.Conv1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), (3, 4, 9)),
    (lambda: nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6), (2, 6, 7, 7)),  # depthwise
    (lambda: nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4), (2, 2, 4, 4, 4)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose1d(3, 4, 3), nn.BatchNorm1d(4), (2, 3, 8)),
], ids=["linear", "grouped-conv1d", "depthwise-conv2d", "conv3d", "conv-transpose2d", "grouped-transpose2d",
        "conv-transpose1d"])
def test_every_layer_kind(layer, norm, shape):
    _check(nn.Sequential(layer(), norm), torch.randn(shape), 1)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.branch = nn.Conv2d(4, 4, 1)
        self.branch_bn = nn.BatchNorm2d(4)
        self.untracked = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        z = self.branch(y)
        return self.untracked(self.branch_bn(z) + z)  # z is read twice: branch_bn cannot absorb its map


def test_nested_models_through_fx_and_what_is_kept():
    model = nn.Sequential(Residual(), nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)))
    folded, report = _check(model, torch.randn(2, 4, 6, 6), 2)
    assert report.folded == {"0.bn": "0.conv", "1.1": "1.0"}
    assert "reads" in report.kept["0.branch_bn"] and "running statistics" in report.kept["0.untracked"]
    assert "folded 2 batch norm(s), kept 2" in str(report)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return self.body(x)


def test_a_model_fx_cannot_trace_folds_by_its_sequential_structure():
    _check(Untraceable(), torch.randn(8, 5), 2)


def test_the_folded_model_is_a_copy_and_inplace_changes_the_model():
    model = _randomize_statistics(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    before = model[0].weight.clone()
    folded, _ = fold_batchnorm(model)
    assert isinstance(model[1], nn.BatchNorm1d) and torch.equal(model[0].weight, before)
    same, _ = fold_batchnorm(model, inplace=True)
    assert same is model and isinstance(model[1], nn.Identity)


def test_a_model_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"eval mode.*model.eval\(\)"):
        fold_batchnorm(model)
    model.eval()
    model[1].train()  # one module left in training mode is enough to refuse
    with pytest.raises(ValueError, match="1"):
        fold_batchnorm(model)
