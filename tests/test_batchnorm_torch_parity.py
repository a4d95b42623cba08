"""bnlab.nn.BatchNormNd against torch.nn.BatchNormNd: outputs, gradients, buffers, edge cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from helpers import TORCH_OF, assert_close_or_none, step, twin

SHAPES = [
    (bnn.BatchNorm1d, (16, 5)),
    (bnn.BatchNorm1d, (4, 5, 7)),
    (bnn.BatchNorm2d, (8, 3, 5, 6)),
    (bnn.BatchNorm2d, (1, 4, 3, 3)),  # one sample, H*W > 1: legal
    (bnn.BatchNorm3d, (2, 3, 2, 3, 4)),
]
F32 = dict(rtol=1e-5, atol=1e-5)


def _run_twins(ours, theirs, shape, steps=3, scale=3.0, shift=1.5):
    for _ in range(steps):
        x = torch.randn(shape) * scale + shift
        upstream = torch.randn(shape)
        got, want = step(ours, x, upstream), step(theirs, x, upstream)
        for a, b in zip(got, want):
            assert_close_or_none(a, b, **F32)
        assert_close_or_none(ours.running_mean, theirs.running_mean, **F32)
        assert_close_or_none(ours.running_var, theirs.running_var, **F32)
        assert_close_or_none(ours.num_batches_tracked, theirs.num_batches_tracked)


@pytest.mark.parametrize("cls,shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
def test_train_then_eval_matches_torch(cls, shape, momentum, affine, bias):
    ours, theirs = twin(cls, TORCH_OF[cls], shape[1], momentum=momentum, affine=affine, bias=bias)
    _run_twins(ours, theirs, shape)
    ours.eval(), theirs.eval()
    _run_twins(ours, theirs, shape, steps=1)


@pytest.mark.parametrize("cls,shape", SHAPES)
def test_no_running_stats_uses_batch_stats_in_eval(cls, shape):
    ours, theirs = twin(cls, TORCH_OF[cls], shape[1], track_running_stats=False)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    _run_twins(ours, theirs, shape, steps=2)
    ours.eval(), theirs.eval()
    _run_twins(ours, theirs, shape, steps=1)


@pytest.mark.parametrize("cls,shape", SHAPES[:3])
def test_float64_matches_torch(cls, shape):
    ours, theirs = twin(cls, TORCH_OF[cls], shape[1], dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 3 + 1.5
        upstream = torch.randn(shape, dtype=torch.float64)
        for a, b in zip(step(ours, x, upstream), step(theirs, x, upstream)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)


def test_track_running_stats_flag_flipped_after_construction():
    # torch: buffers exist, so train mode stops updating them but eval still uses them.
    ours, theirs = twin(bnn.BatchNorm1d, TORCH_OF[bnn.BatchNorm1d], 4)
    _run_twins(ours, theirs, (8, 4))
    ours.track_running_stats = theirs.track_running_stats = False
    _run_twins(ours, theirs, (8, 4))
    ours.eval(), theirs.eval()
    _run_twins(ours, theirs, (8, 4), steps=1)


def test_state_dict_loads_both_ways():
    ours, theirs = twin(bnn.BatchNorm2d, TORCH_OF[bnn.BatchNorm2d], 6)
    _run_twins(ours, theirs, (4, 6, 3, 3))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    fresh_torch = nn.BatchNorm2d(6)
    fresh_torch.load_state_dict(ours.state_dict())
    fresh_ours = bnn.BatchNorm2d(6)
    fresh_ours.load_state_dict(theirs.state_dict())
    for a, b in zip(fresh_ours.state_dict().values(), fresh_torch.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_state_dict_without_num_batches_tracked_loads():
    source = nn.BatchNorm1d(3)
    source(torch.randn(8, 3) * 2)
    state = source.state_dict()
    del state["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        nn.BatchNorm1d(3).load_state_dict(state)  # torch accepts this only for pre-1.2 checkpoints
    layer = bnn.BatchNorm1d(3)
    layer.load_state_dict(state)
    assert layer.num_batches_tracked.item() == 0
    torch.testing.assert_close(layer.running_var, source.running_var)
    del state["running_var"]
    with pytest.raises(RuntimeError, match="running_var"):
        layer.load_state_dict(state)  # only the counter is optional


def test_pre_1_2_state_dict_without_version_loads_as_torch_loads_it():
    source = nn.BatchNorm1d(3)
    source(torch.randn(8, 3) * 3 + 1)  # running statistics away from their initial values
    state = dict(source.state_dict())  # a plain dict has no version metadata: torch reads it as pre-1.2
    del state["num_batches_tracked"]
    theirs, ours = nn.BatchNorm1d(3), bnn.BatchNorm1d(3)
    theirs.num_batches_tracked.fill_(5)
    ours.num_batches_tracked.fill_(5)
    theirs.load_state_dict(dict(state))
    ours.load_state_dict(dict(state))
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    assert ours.num_batches_tracked.item() == 5  # as torch: the counter keeps its value
    torch.testing.assert_close(ours.running_mean, source.running_mean, rtol=0, atol=0)


@pytest.mark.parametrize(
    "cls,bad_shape", [(bnn.BatchNorm1d, (2, 3, 4, 5)), (bnn.BatchNorm2d, (2, 3, 4)), (bnn.BatchNorm3d, (2, 3, 4, 5))]
)
def test_input_dimension_errors_match_torch(cls, bad_shape):
    x = torch.randn(bad_shape)
    with pytest.raises(ValueError) as theirs:
        twin(cls, TORCH_OF[cls], 3)[1](x)
    with pytest.raises(ValueError) as ours:
        twin(cls, TORCH_OF[cls], 3)[0](x)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_single_value_per_channel_explains_the_fix(shape):
    layer = bnn.BatchNorm2d(3) if len(shape) == 4 else bnn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as err:
        layer(torch.randn(shape))
    assert "drop_last=True" in str(err.value)
    assert layer.running_mean.eq(0).all()  # nothing half-updated
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape  # inference on one sample is fine


def test_empty_batch_leaves_statistics_and_counts_like_torch():
    ours, theirs = twin(bnn.BatchNorm2d, TORCH_OF[bnn.BatchNorm2d], 3)
    _run_twins(ours, theirs, (4, 3, 2, 2))
    before = (ours.running_mean.clone(), ours.running_var.clone())
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    y = ours(x)
    theirs(torch.randn(0, 3, 2, 2))
    assert y.shape == (0, 3, 2, 2)
    torch.testing.assert_close(ours.running_mean, before[0], rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, before[1], rtol=0, atol=0)
    # counted like torch (so checkpoints agree), documented in the docstring
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 4
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("kernel", [None, "composite"])
def test_channels_last_matches_contiguous(kernel):
    x = torch.randn(4, 8, 5, 5) * 2 + 1
    upstream = torch.randn_like(x)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        layer = bnn.BatchNorm2d(8)
        xi = x.detach().clone(memory_format=fmt).requires_grad_(True)
        y = bnlab_forward(layer, xi, kernel)
        y.backward(upstream.to(memory_format=fmt))
        results.append((y.detach().contiguous(), xi.grad.contiguous(), layer.running_var.clone(), y))
    for a, b in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(a, b, **F32)
    if kernel is None:  # native keeps the layout, as torch does
        assert results[1][3].is_contiguous(memory_format=torch.channels_last)


def bnlab_forward(layer, x, kernel):
    if kernel is None:
        return layer(x)
    from bnlab.functional import batch_norm

    layer.num_batches_tracked.add_(1)
    return batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, True, 0.1, layer.eps, kernel=kernel)


def test_non_contiguous_input():
    base = torch.randn(6, 10, 8) * 2
    x = base.transpose(1, 2)[:, :, ::2]  # (6, 8, 5), strided
    assert not x.is_contiguous()
    ours, theirs = twin(bnn.BatchNorm1d, TORCH_OF[bnn.BatchNorm1d], 8)
    torch.testing.assert_close(ours(x), theirs(x.contiguous()), **F32)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **F32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", [None, "composite"])
def test_half_precision_input_with_float32_state(dtype, kernel):
    x32 = torch.randn(16, 4, 6, 6) * 3 + 2
    x = x32.to(dtype)
    layer = bnn.BatchNorm2d(4)
    reference = nn.BatchNorm2d(4)
    y = bnlab_forward(layer, x, kernel)
    want = reference(x.float())  # same rounded input, exact float32 maths
    assert y.dtype == dtype
    assert layer.running_mean.dtype == layer.running_var.dtype == torch.float32
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_skip_nonfinite_update_protects_running_statistics(bad):
    guarded = bnn.BatchNorm1d(3, skip_nonfinite_update=True)
    plain = bnn.BatchNorm1d(3)
    for layer in (guarded, plain):
        layer(torch.randn(8, 3))
    kept = (guarded.running_mean.clone(), guarded.running_var.clone())
    poison = torch.randn(8, 3)
    poison[2, 1] = bad
    guarded(poison), plain(poison)
    assert torch.equal(guarded.running_mean, kept[0]) and torch.equal(guarded.running_var, kept[1])
    assert not torch.isfinite(plain.running_var).all()  # what torch itself does
    clean = torch.randn(8, 3)
    guarded(clean)
    assert not torch.equal(guarded.running_mean, kept[0])  # later good batches still count
    assert "skip_nonfinite_update=True" in repr(guarded)


def test_is_a_torch_batchnorm_for_ecosystem_tools():
    layer = bnn.BatchNorm2d(4)
    assert isinstance(layer, nn.BatchNorm2d)
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)


def test_torch_conv_bn_fusion_utility():
    conv, bn = nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4)
    for _ in range(3):
        bn(conv(torch.randn(8, 3, 9, 9)))
    conv.eval(), bn.eval()
    fused = torch.nn.utils.fuse_conv_bn_eval(conv, bn)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-4, atol=1e-5)


def test_convert_sync_batchnorm_copies_state():
    model = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4))
    model(torch.randn(8, 3))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced[1], nn.SyncBatchNorm)
    torch.testing.assert_close(synced[1].running_var, model[1].running_var)


def test_replace_all_batch_norm_modules_makes_it_stateless():
    ours, theirs = twin(bnn.BatchNorm1d, TORCH_OF[bnn.BatchNorm1d], 4)
    for m in (ours, theirs):
        torch.func.replace_all_batch_norm_modules_(m)
        m.eval()
    x = torch.randn(8, 4)
    torch.testing.assert_close(ours(x), theirs(x), **F32)


def test_functional_call_with_swapped_buffers():
    layer = bnn.BatchNorm1d(3)
    x = torch.randn(10, 3)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight"] = torch.full((3,), 2.0)
    y = torch.func.functional_call(layer, state, (x,))
    want = nn.functional.batch_norm(x, None, None, torch.full((3,), 2.0), torch.zeros(3), training=True)
    torch.testing.assert_close(y, want, **F32)
    assert state["num_batches_tracked"].item() == 1  # the swapped-in buffers were updated
    assert layer.num_batches_tracked.item() == 0


@pytest.mark.slow
def test_under_torch_compile():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4), nn.ReLU())
    twin = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(compiled(x), twin(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var, rtol=1e-5, atol=1e-6)
    model.eval(), twin.eval()
    torch.testing.assert_close(compiled(x), twin(x), rtol=1e-4, atol=1e-4)


def test_bad_convention_is_a_clear_error():
    with pytest.raises(ValueError, match="convention must be one of"):
        bnn.BatchNorm1d(3, convention="tensorflow")


@pytest.mark.parametrize("dtype", [torch.float64])
def test_gradcheck_float64(dtype):
    for kernel in ("native", "composite"):
        from bnlab.functional import batch_norm

        x = torch.randn(5, 3, 4, dtype=dtype, requires_grad=True)
        w = torch.rand(3, dtype=dtype, requires_grad=True)
        b = torch.randn(3, dtype=dtype, requires_grad=True)

        def train_fn(x, w, b):
            return batch_norm(x, None, None, w, b, True, 0.1, 1e-5, kernel=kernel)

        def eval_fn(x, w, b):
            rm, rv = torch.full((3,), 0.3, dtype=dtype), torch.full((3,), 1.7, dtype=dtype)
            return batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, kernel=kernel)

        assert torch.autograd.gradcheck(train_fn, (x, w, b))
        assert torch.autograd.gradcheck(eval_fn, (x, w, b))
    layer = bnn.BatchNorm1d(3, dtype=dtype)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))
