"""The normalization family against its references: torch.nn, NumPy one-liners, Keras 3, and each other."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import bnlab.functional as BF
import bnlab.nn as bnn
from helpers import twin

F32 = dict(rtol=1e-5, atol=1e-5)


def _fwd_bwd(module, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(upstream)
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return [y.detach(), x.grad, *grads]


# -- LayerNorm / GroupNorm / InstanceNorm against torch.nn -------------------------------------------


@pytest.mark.parametrize("shape,normalized", [((8, 16), (16,)), ((4, 5, 6), (6,)), ((2, 3, 4, 5), (3, 4, 5))])
@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}])
def test_layer_norm_matches_torch(shape, normalized, kwargs):
    ours, theirs = twin(bnn.LayerNorm, nn.LayerNorm, normalized, **kwargs)
    x, up = torch.randn(shape) * 3 + 1, torch.randn(shape)
    for a, b in zip(_fwd_bwd(ours, x, up), _fwd_bwd(theirs, x, up)):
        torch.testing.assert_close(a, b, **F32)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours, nn.LayerNorm)


@pytest.mark.parametrize("groups,channels,shape", [(2, 6, (4, 6)), (3, 6, (4, 6, 5)), (4, 8, (2, 8, 3, 3)), (1, 5, (3, 5, 2, 2))])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch(groups, channels, shape, affine):
    ours, theirs = twin(bnn.GroupNorm, nn.GroupNorm, groups, channels, affine=affine)
    x, up = torch.randn(shape) * 2 - 1, torch.randn(shape)
    for a, b in zip(_fwd_bwd(ours, x, up), _fwd_bwd(theirs, x, up)):
        torch.testing.assert_close(a, b, **F32)


def test_group_norm_bad_group_count_message_matches_torch():
    with pytest.raises(ValueError) as ours:
        bnn.GroupNorm(3, 8)
    with pytest.raises(ValueError) as theirs:
        nn.GroupNorm(3, 8)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("cls,torch_cls,shape", [
    (bnn.InstanceNorm1d, nn.InstanceNorm1d, (3, 4, 7)),
    (bnn.InstanceNorm2d, nn.InstanceNorm2d, (3, 4, 5, 5)),
    (bnn.InstanceNorm3d, nn.InstanceNorm3d, (2, 4, 3, 3, 3)),
    (bnn.InstanceNorm2d, nn.InstanceNorm2d, (4, 5, 5)),  # unbatched
])
@pytest.mark.parametrize("kwargs", [{}, {"affine": True}, {"track_running_stats": True, "affine": True}])
def test_instance_norm_matches_torch(cls, torch_cls, shape, kwargs):
    channels = shape[1] if len(shape) > 3 or cls is bnn.InstanceNorm1d else shape[0]
    ours, theirs = twin(cls, torch_cls, channels, **kwargs)
    assert ours.affine == theirs.affine and (kwargs or ours.affine is False)  # torch's default affine=False
    for _ in range(2):
        x, up = torch.randn(shape) * 2 + 0.5, torch.randn(shape)
        for a, b in zip(_fwd_bwd(ours, x, up), _fwd_bwd(theirs, x, up)):
            torch.testing.assert_close(a, b, **F32)
    ours.eval(), theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x), **F32)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, **F32)


@pytest.mark.parametrize("fn,args", [
    (BF.layer_norm, ((5,),)),
    (BF.group_norm, (1,)),
])
def test_composite_kernels_match_native(fn, args):
    x = torch.randn(4, 5, 3, 3) * 2 + 1
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    if fn is BF.layer_norm:
        x = torch.randn(4, 3, 5)
    torch.testing.assert_close(fn(x, *args, w, b, 1e-5, kernel="composite"), fn(x, *args, w, b, 1e-5), **F32)


def test_instance_norm_composite_matches_native_with_running_stats():
    x = torch.randn(3, 4, 6, 6) * 2 + 1
    states = [(torch.zeros(4), torch.ones(4)) for _ in range(2)]
    outs = [BF.instance_norm(x, rm, rv, None, None, True, 0.3, 1e-5, kernel=k) for (rm, rv), k in zip(states, ["composite", None])]
    torch.testing.assert_close(outs[0], outs[1], **F32)
    torch.testing.assert_close(states[0][1], states[1][1], **F32)


# -- one-liner oracles and equivalences ---------------------------------------------------------------


@given(n=st.integers(1, 5), c=st.sampled_from([2, 4, 6]), hw=st.integers(1, 4), seed=st.integers(0, 999))
def test_group_norm_against_numpy_one_liner(n, c, hw, seed):
    assume(c // 2 * hw * hw > 1)  # one value per group raises, as in torch (tests/test_torch_dropin.py)
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=(n, c, hw, hw)).astype(np.float32)
    groups = 2
    xg = x.reshape(n, groups, -1).astype(np.float64)
    want = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    got = bnn.GroupNorm(groups, c, affine=False)(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_group_norm_1_equals_layer_norm_over_chw():
    x = torch.randn(4, 6, 5, 5) * 3
    gn = bnn.GroupNorm(1, 6, affine=False)
    ln = bnn.LayerNorm((6, 5, 5), elementwise_affine=False)
    torch.testing.assert_close(gn(x), ln(x), **F32)


def test_group_norm_c_equals_instance_norm():
    x = torch.randn(4, 6, 5, 5) * 3
    torch.testing.assert_close(bnn.GroupNorm(6, 6, affine=False)(x), bnn.InstanceNorm2d(6)(x), **F32)


# -- Batch renormalization -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls,shape", [(bnn.BatchRenorm1d, (16, 5)), (bnn.BatchRenorm2d, (8, 3, 4, 4)),
                                       (bnn.BatchRenorm3d, (4, 3, 2, 3, 3))])
@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_renorm_with_r1_d0_is_batch_norm(cls, shape, convention):
    renorm = cls(shape[1], r_max=1.0, d_max=0.0, convention=convention)
    bn = bnn.make_norm("batch", shape[1], spatial=len(shape) > 2, convention=convention) if len(shape) < 5 else \
        bnn.BatchNorm3d(shape[1], convention=convention)
    bn.load_state_dict(renorm.state_dict())
    for step in range(4):
        x, up = torch.randn(shape) * (step + 1) + step, torch.randn(shape)
        for a, b in zip(_fwd_bwd(renorm, x, up), _fwd_bwd(bn, x, up)):
            torch.testing.assert_close(a, b, **F32)
        torch.testing.assert_close(renorm.running_var, bn.running_var, **F32)
    renorm.eval(), bn.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(renorm(x), bn(x), **F32)



@pytest.mark.parametrize("dtype,layout,tol", [(torch.float32, torch.channels_last, F32),
                                              (torch.bfloat16, torch.contiguous_format, dict(rtol=2e-2, atol=2e-2))])
def test_renorm_keeps_the_layout_and_dtype_of_batch_norm(dtype, layout, tol):
    # The folded-affine path goes through ATen's inference kernel: it must keep what training-mode
    # batch norm keeps (channels_last output, half-precision input with float32 parameters).
    renorm, bn = bnn.BatchRenorm2d(4, r_max=1.0, d_max=0.0), bnn.BatchNorm2d(4)
    x = (torch.randn(8, 4, 5, 5) * 2 + 1).to(dtype).contiguous(memory_format=layout)
    up = torch.randn(8, 4, 5, 5).to(dtype)
    ours, theirs = _fwd_bwd(renorm, x, up), _fwd_bwd(bn, x, up)
    assert ours[0].dtype == dtype and ours[0].is_contiguous(memory_format=layout)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    torch.testing.assert_close(renorm.running_var, bn.running_var, **F32)

def test_renorm_against_the_paper_formula():
    torch.manual_seed(3)
    layer = bnn.BatchRenorm1d(4, momentum=0.2, r_max=1.5, d_max=0.5)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 1.0, -2.0, 0.5]))
        layer.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 9.0]))
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 1.0, 0.2]))
    x = (torch.randn(32, 4) * 2).double()
    mu, var = x.mean(0), x.var(0, unbiased=False)
    sigma_b = (var + layer.eps).sqrt()
    rm, rv = layer.running_mean.double(), layer.running_var.double()
    sigma = (rv + layer.eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / 1.5, 1.5)
    d = ((mu - rm) / sigma).clamp(-0.5, 0.5)
    want = layer.weight.double() * ((x - mu) / sigma_b * r + d) + layer.bias.double()
    got = layer(x.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert (r != sigma_b / sigma).any() and (d != (mu - rm) / sigma).any()  # clipping was exercised
    torch.testing.assert_close(layer.running_var.double(), 0.8 * rv + 0.2 * x.var(0, unbiased=True), rtol=1e-5, atol=1e-5)


def test_renorm_has_no_gradient_through_r_and_d():
    # With r and d stop-gradient, d y / d x equals BN's gradient scaled by r (d only shifts).
    layer = bnn.BatchRenorm1d(3, r_max=10.0, d_max=10.0, affine=False)
    with torch.no_grad():
        layer.running_var.fill_(4.0)
        layer.running_mean.fill_(1.0)
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    layer = layer.double()
    up = torch.randn(16, 3, dtype=torch.float64)
    layer(x).backward(up)
    sigma_b = (x.detach().var(0, unbiased=False) + layer.eps).sqrt()
    r = sigma_b / (4.0 + layer.eps) ** 0.5
    x2 = x.detach().clone().requires_grad_(True)
    nn.functional.batch_norm(x2, None, None, training=True, eps=layer.eps).backward(up * r)
    torch.testing.assert_close(x.grad, x2.grad)


def test_renorm_schedule_follows_the_paper():
    s = bnn.RenormSchedule()
    assert s.limits(0) == (1.0, 0.0) and s.limits(5000) == (1.0, 0.0)
    assert s.limits(25000)[1] == 5.0 and s.limits(40000)[0] == 3.0
    r, d = s.limits(15000)
    assert 1 < r < 3 and 0 < d < 5
    layer = bnn.BatchRenorm1d(3, schedule=bnn.RenormSchedule(start=2, r_full=4, d_full=4))
    seen = []
    for _ in range(5):
        layer(torch.randn(8, 3))
        seen.append(layer.current_limits())
    assert seen[0] == (1.0, 0.0) and seen[-1] == (3.0, 5.0)


def test_renorm_needs_running_stats_and_valid_limits():
    with pytest.raises(ValueError, match="r_max >= 1"):
        bnn.BatchRenorm1d(3, r_max=0.5)
    with pytest.raises(TypeError):
        bnn.BatchRenorm1d(3, track_running_stats=False)


def test_renorm_inference_matches_keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    theirs = keras.layers.BatchNormalization(axis=1, renorm=True, momentum=0.9, epsilon=1e-3,
                                             renorm_clipping={"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0})
    theirs.build((16, 4))
    for step in range(5):
        theirs(torch.randn(16, 4) * (2 + step) + step, training=True)
    ours = bnn.BatchRenorm1d(4, convention="keras", momentum=0.9, eps=1e-3)
    with torch.no_grad():
        ours.weight.copy_(theirs.gamma.value), ours.bias.copy_(theirs.beta.value)
        ours.running_mean.copy_(theirs.moving_mean.value), ours.running_var.copy_(theirs.moving_variance.value)
    ours.eval()
    x = torch.randn(16, 4) * 3
    torch.testing.assert_close(ours(x), theirs(x, training=False).detach(), rtol=2e-5, atol=2e-5)


# -- Ghost batch norm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 5), (32, 3, 4, 4)])
@pytest.mark.parametrize("update", ["per_ghost", "averaged"])
def test_ghost_normalizes_each_ghost_batch_separately(shape, update):
    cls = bnn.GhostBatchNorm1d if len(shape) == 2 else bnn.GhostBatchNorm2d
    ghost = cls(shape[1], virtual_batch_size=8, update=update, momentum=0.3)
    plain = bnn.BatchNorm1d(shape[1], momentum=0.3) if len(shape) == 2 else bnn.BatchNorm2d(shape[1], momentum=0.3)
    plain.load_state_dict(ghost.state_dict())
    with torch.no_grad():
        for m in (ghost, plain):
            m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
    x = torch.randn(shape) * 2 + torch.arange(shape[0]).view(-1, *([1] * (len(shape) - 1))) * 0.1
    x.requires_grad_(True)
    y = ghost(x)
    # reference: batch norm on each chunk; per_ghost = its sequential running updates
    pieces = []
    ref_mean, ref_var = plain.running_mean.clone(), plain.running_var.clone()
    chunk_stats = []
    for chunk in x.detach().chunk(4):
        pieces.append(plain(chunk))
        dims = [0, *range(2, chunk.dim())]
        chunk_stats.append((chunk.mean(dims), chunk.var(dims, unbiased=True)))
    torch.testing.assert_close(y.detach(), torch.cat(pieces).detach(), **F32)
    if update == "per_ghost":
        want_mean, want_var = plain.running_mean, plain.running_var
    else:
        want_mean = 0.7 * ref_mean + 0.3 * torch.stack([m for m, _ in chunk_stats]).mean(0)
        want_var = 0.7 * ref_var + 0.3 * torch.stack([v for _, v in chunk_stats]).mean(0)
    torch.testing.assert_close(ghost.running_mean, want_mean, **F32)
    torch.testing.assert_close(ghost.running_var, want_var, **F32)
    y.sum().backward()  # gradients flow back through the ghost reshapes
    assert x.grad.shape == x.shape


def test_ghost_with_virtual_size_equal_to_batch_is_batch_norm():
    ghost, plain = bnn.GhostBatchNorm1d(4, virtual_batch_size=16), bnn.BatchNorm1d(4)
    x, up = torch.randn(16, 4) * 3, torch.randn(16, 4)
    for a, b in zip(_fwd_bwd(ghost, x, up), _fwd_bwd(plain, x, up)):
        torch.testing.assert_close(a, b, **F32)
    torch.testing.assert_close(ghost.running_var, plain.running_var)


def test_ghost_rejects_indivisible_batches_clearly():
    layer = bnn.GhostBatchNorm1d(4, virtual_batch_size=8)
    with pytest.raises(ValueError, match="not a multiple of virtual_batch_size=8.*drop_last=True"):
        layer(torch.randn(20, 4))
    layer(torch.randn(6, 4))  # smaller than one ghost batch: plain batch norm
    layer.eval()
    layer(torch.randn(20, 4))  # inference has no ghosts


def test_ghost_skip_nonfinite_update_skips_only_the_bad_ghost_batch():
    layer = bnn.GhostBatchNorm1d(3, virtual_batch_size=4, skip_nonfinite_update=True)
    good_only = bnn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    x[5, 1] = float("inf")  # in the second ghost batch
    layer(x)
    good_only(x[:4])
    torch.testing.assert_close(layer.running_var, good_only.running_var)
    torch.testing.assert_close(layer.running_mean, good_only.running_mean)


# -- Frozen batch norm ------------------------------------------------------------------------------------


def _trained_bn(cls=bnn.BatchNorm2d, shape=(8, 4, 3, 3)):
    bn = cls(shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    for _ in range(3):
        bn(torch.randn(shape) * 2 + 1)
    return bn.eval()


def test_frozen_is_a_fixed_affine_map_equal_to_eval_batch_norm():
    bn = _trained_bn()
    frozen = bnn.FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(5, 4, 3, 3, requires_grad=True)
    torch.testing.assert_close(frozen(x), bn(x), **F32)
    frozen.train()
    y = frozen(x)  # train mode changes nothing
    torch.testing.assert_close(y, bn(x), **F32)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    one_liner = x * scale.view(1, -1, 1, 1) + (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)
    torch.testing.assert_close(y, one_liner, **F32)
    assert list(frozen.parameters()) == [] and set(frozen.state_dict()) == set(bn.state_dict())


def test_frozen_detectron2_convention_is_identity_at_init():
    x = torch.randn(3, 4, 2, 2)
    assert torch.equal(bnn.FrozenBatchNorm2d(4, convention="detectron2")(x), x)
    assert not torch.equal(bnn.FrozenBatchNorm2d(4)(x), x)


def test_frozen_loads_a_checkpoint_without_counter():
    state = {k: v for k, v in _trained_bn().state_dict().items() if k != "num_batches_tracked"}
    bnn.FrozenBatchNorm2d(4).load_state_dict(state)


def test_freeze_batchnorm_survives_model_train_and_unfreeze_restores():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 6), bnn.BatchNorm1d(6)))
    model(torch.randn(8, 3, 6, 6))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    frozen = bnn.freeze_batchnorm(model)
    assert frozen is model
    assert isinstance(model[1], bnn.FrozenBatchNorm2d) and isinstance(model[3][2], bnn.FrozenBatchNorm1d)
    model.train()  # the classic trap: this would re-enable statistic updates on a plain BN
    torch.testing.assert_close(model(x), before, **F32)
    model(torch.randn(16, 3, 6, 6) * 5)
    torch.testing.assert_close(model(x), before, **F32)  # nothing moved
    bnn.unfreeze_batchnorm(model)
    assert isinstance(model[1], bnn.BatchNorm2d) and model[1].weight.requires_grad
    model.eval()
    torch.testing.assert_close(model(x), before, **F32)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bnn.freeze_batchnorm(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))


# -- make_norm ----------------------------------------------------------------------------------------------


def test_make_norm_kinds_and_errors():
    assert isinstance(bnn.make_norm("none", 4), nn.Identity)
    assert isinstance(bnn.make_norm("layer", 4), nn.LayerNorm)
    assert bnn.make_norm("layer", 4, spatial=True).num_groups == 1
    assert bnn.make_norm("group", 64).num_groups == 32 and bnn.make_norm("group", 100).num_groups == 25
    assert bnn.make_norm("group", 8, num_groups=2).num_groups == 2
    assert bnn.make_norm("ghost", 4, virtual_batch_size=16).virtual_batch_size == 16
    assert bnn.make_norm("batch", 4, convention="keras").momentum == 0.99
    with pytest.raises(ValueError, match="unknown norm kind 'weird'"):
        bnn.make_norm("weird", 4)
    with pytest.raises(ValueError, match="instance norm needs spatial"):
        bnn.make_norm("instance", 4)
    with pytest.raises(TypeError, match="unexpected options"):
        bnn.make_norm("layer", 4, momentum=0.1)


GHOST_PATHS = ["compiled", "aten_loop", "general"]


def _ghost_on_path(path, monkeypatch, x, rm, rv, w, b, **kw):
    """Run BF.ghost_batch_norm on one of its three paths: the compiled kernel, ATen once per ghost,
    or the general chunk-and-concatenate path (which the non-finite guard selects)."""
    import bnlab.functional.norms as norms

    with monkeypatch.context() as m:
        if path == "aten_loop":
            m.setattr(norms, "load_kernels", lambda: False)
        return BF.ghost_batch_norm(x, rm, rv, w, b, True, 0.2, 1e-5, virtual_batch_size=4,
                                   skip_nonfinite_update=path == "general", **kw)


@pytest.mark.parametrize("update", ["per_ghost", "averaged"])
@pytest.mark.parametrize("shape,layout", [((16, 6), "contiguous"), ((12, 3, 5), "contiguous"),
                                          ((16, 3, 4, 4), "contiguous"), ((16, 3, 4, 4), "channels_last"),
                                          ((8, 2, 3, 2, 2), "contiguous"), ((8, 2, 3, 2, 2), "channels_last"),
                                          ((16, 3, 4, 4), "strided")])
@pytest.mark.parametrize("affine,correction", [(True, 1), (False, 0)])
def test_ghost_paths_agree_with_the_per_chunk_oracle(update, shape, layout, affine, correction, monkeypatch):
    # Oracle: torch.nn.functional.batch_norm on each chunk, in float64, with sequential (per_ghost)
    # or averaged running updates written out by hand.
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif layout == "strided":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    w, b = (torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)) if affine else (None, None)
    up = torch.randn(shape, dtype=torch.float64)

    xr = x.detach().clone().requires_grad_(True)
    wr, br = (w.clone().requires_grad_(True), b.clone().requires_grad_(True)) if affine else (None, None)
    start_mean, start_var = torch.linspace(-1, 1, c, dtype=torch.float64), torch.linspace(0.5, 2, c, dtype=torch.float64)
    want_mean, want_var = start_mean.clone(), start_var.clone()
    outs, stats = [], []
    for chunk in xr.chunk(shape[0] // 4):
        outs.append(nn.functional.batch_norm(chunk, None, None, wr, br, True, 0.2, 1e-5))
        dims = [0, *range(2, chunk.dim())]
        stats.append((chunk.detach().mean(dims), chunk.detach().var(dims, correction=correction)))
    want = torch.cat(outs)
    want.backward(up)
    if update == "per_ghost":
        for mean, var in stats:
            want_mean, want_var = 0.8 * want_mean + 0.2 * mean, 0.8 * want_var + 0.2 * var
    else:
        want_mean = 0.8 * start_mean + 0.2 * torch.stack([m for m, _ in stats]).mean(0)
        want_var = 0.8 * start_var + 0.2 * torch.stack([v for _, v in stats]).mean(0)

    for path in GHOST_PATHS:
        xi = x.detach().clone().requires_grad_(True)
        wi, bi = (w.clone().requires_grad_(True), b.clone().requires_grad_(True)) if affine else (None, None)
        rm, rv = start_mean.clone(), start_var.clone()
        y = _ghost_on_path(path, monkeypatch, xi, rm, rv, wi, bi, update=update, running_var_correction=correction)
        y.backward(up)
        torch.testing.assert_close(y, want.detach(), msg=lambda m: f"{path}: output: {m}")
        torch.testing.assert_close(xi.grad, xr.grad, msg=lambda m: f"{path}: dx: {m}")
        if affine:
            torch.testing.assert_close(wi.grad, wr.grad, msg=lambda m: f"{path}: dw: {m}")
            torch.testing.assert_close(bi.grad, br.grad, msg=lambda m: f"{path}: db: {m}")
        torch.testing.assert_close(rm, want_mean, msg=lambda m: f"{path}: running_mean: {m}")
        torch.testing.assert_close(rv, want_var, msg=lambda m: f"{path}: running_var: {m}")
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def test_compiled_kernels_build_on_this_machine():
    # CI machines have a C++ compiler and ninja (a dependency): a failed build would silently
    # put ghost batch norm on its slower path, so it is a failure here.
    from bnlab.functional.compiled import load_kernels

    assert load_kernels()


def test_a_failed_kernel_build_warns_once_and_falls_back(monkeypatch):
    import bnlab.functional.compiled as compiled

    def broken_build(name, sources, cflags=()):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(compiled, "_state", {})
    monkeypatch.setattr(compiled, "_build", broken_build)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert compiled.load_kernels() is False
    assert compiled.load_kernels() is False  # decided once: no second warning, no second build


def test_ghost_gradcheck_float64():
    x = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: BF.ghost_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, virtual_batch_size=4), (x, w, b))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(12, 3), (12, 3, 2), (4, 3, 3, 3)])
def test_renorm_gradients_match_the_formula_with_stop_gradient(affine, shape):
    # gradcheck cannot be used: its finite differences see r and d move with x, which the
    # algorithm deliberately ignores. The oracle is the paper's formula with explicit detach().
    torch.manual_seed(7)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    w = torch.rand(3, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(3, dtype=torch.float64) if affine else None
    rm = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    rv = torch.tensor([0.5, 4.0, 1.0], dtype=torch.float64)
    up = torch.randn(shape, dtype=torch.float64)
    view = (1, -1) + (1,) * (len(shape) - 2)
    dims = [0, *range(2, len(shape))]

    xs = x.clone().requires_grad_(True)
    ws, bs = (w.clone().requires_grad_(True), b.clone().requires_grad_(True)) if affine else (None, None)
    mu, var = xs.mean(dims), xs.var(dims, unbiased=False)
    sigma_b = (var + 1e-5).sqrt()
    sigma = (rv + 1e-5).sqrt()
    r = (sigma_b / sigma).clamp(1 / 1.5, 1.5).detach()
    d = ((mu - rm) / sigma).clamp(-0.3, 0.3).detach()
    ref = (xs - mu.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
    if affine:
        ref = ref * ws.view(view) + bs.view(view)
    ref.backward(up)

    xo = x.clone().requires_grad_(True)
    wo, bo = (w.clone().requires_grad_(True), b.clone().requires_grad_(True)) if affine else (None, None)
    out = BF.batch_renorm(xo, rm.clone(), rv.clone(), wo, bo, True, 0.1, 1e-5, r_max=1.5, d_max=0.3)
    out.backward(up)
    assert ((r == 1.5) | (r == 1 / 1.5)).any() and (d.abs() == 0.3).any()  # clipping active somewhere
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xo.grad, xs.grad)
    if affine:
        torch.testing.assert_close(wo.grad, ws.grad)
        torch.testing.assert_close(bo.grad, bs.grad)


@st.composite
def image_batches(draw):
    n, c = draw(st.integers(2, 6)), draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 4)), draw(st.integers(2, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(n, c, h, w, generator=g) * draw(st.floats(0.5, 5.0)) + draw(st.floats(-3, 3))


@given(x=image_batches())
def test_family_equivalences_hold_for_any_shape(x):
    n, c = x.shape[:2]
    torch.testing.assert_close(bnn.GroupNorm(1, c, affine=False)(x),
                               bnn.LayerNorm(tuple(x.shape[1:]), elementwise_affine=False)(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bnn.GroupNorm(c, c, affine=False)(x), bnn.InstanceNorm2d(c)(x), rtol=1e-4, atol=1e-4)
    bn, renorm, ghost = bnn.BatchNorm2d(c), bnn.BatchRenorm2d(c, r_max=1.0, d_max=0.0), \
        bnn.GhostBatchNorm2d(c, virtual_batch_size=n)
    want = bn(x)
    for layer in (renorm, ghost):
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-5, atol=1e-5)


def test_renorm_skip_nonfinite_update():
    layer = bnn.BatchRenorm1d(3, skip_nonfinite_update=True)
    layer(torch.randn(8, 3))
    kept = (layer.running_mean.clone(), layer.running_var.clone())
    bad = torch.randn(8, 3)
    bad[2, 1] = float("nan")
    layer(bad)
    assert torch.equal(layer.running_mean, kept[0]) and torch.equal(layer.running_var, kept[1])
    layer(torch.randn(8, 3))
    assert not torch.equal(layer.running_var, kept[1])


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("correction", [1, 0])
def test_renorm_compiled_and_eager_paths_agree(affine, correction, monkeypatch):
    # float32 inputs take the compiled per-channel step; the eager twin is the float64-tested formula
    import bnlab.functional.norms as norms

    torch.manual_seed(3)
    x = torch.randn(32, 6, 3, 3) * 3 + 1
    w, b = (torch.rand(6) + 0.5, torch.randn(6)) if affine else (None, None)
    up = torch.randn_like(x)
    results = []
    for compiled in (True, False):
        with monkeypatch.context() as m:
            if not compiled:
                m.setattr(norms, "load_kernels", lambda: False)
            xi = x.clone().requires_grad_(True)
            wi, bi = (w.clone().requires_grad_(True), b.clone().requires_grad_(True)) if affine else (None, None)
            rm, rv = torch.linspace(-1, 1, 6), torch.linspace(0.2, 3, 6)
            y = BF.batch_renorm(xi, rm, rv, wi, bi, True, 0.1, 1e-5, r_max=1.5, d_max=0.4,
                                running_var_correction=correction)
            y.backward(up)
            results.append([y, xi.grad, rm, rv] + ([wi.grad, bi.grad] if affine else []))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, **F32)


@pytest.mark.parametrize("layout", ["rows", "planes", "channels_last"])
def test_ghost_statistics_survive_a_large_offset(layout):
    # The compiled kernel's one-pass (shifted) statistics must not cancel when |mean| >> std.
    shape = (64, 8) if layout == "rows" else (16, 4, 5, 5)
    x = torch.randn(shape, dtype=torch.float64) * 0.5 + 1000.0
    x32 = x.float()
    if layout == "channels_last":
        x32 = x32.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    y = BF.ghost_batch_norm(x32, rm, rv, None, None, True, 1.0, 1e-5, virtual_batch_size=4, update="averaged")
    dims = [1, *range(3, x.dim() + 1)]
    ghosts = x.view(-1, 4, *shape[1:])
    want_var = ghosts.var(dims, unbiased=True).mean(0)  # momentum 1: the averaged per-ghost unbiased variance
    torch.testing.assert_close(rv.double(), want_var, rtol=1e-4, atol=1e-6)
    mean, var = ghosts.mean(dims, keepdim=True), ghosts.var(dims, unbiased=False, keepdim=True)
    torch.testing.assert_close(y.double(), ((ghosts - mean) / (var + 1e-5).sqrt()).view(shape), rtol=1e-3, atol=1e-3)


def test_ghost_large_planes_are_as_accurate_as_aten():
    # planes sum in short float runs and across runs in double: no worse than ATen on big images
    torch.manual_seed(0)
    x64 = torch.randn(8, 2, 32, 32, 32, dtype=torch.float64) + 1000
    x = x64.float()
    y = BF.ghost_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, virtual_batch_size=4)
    ghosts = x64.view(2, 4, 2, 32, 32, 32)
    dims = (1, 3, 4, 5)
    want = ((ghosts - ghosts.mean(dims, keepdim=True))
            / (ghosts.var(dims, unbiased=False, keepdim=True) + 1e-5).sqrt()).view_as(x64)
    aten = torch.cat([nn.functional.batch_norm(chunk, None, None, training=True) for chunk in x.chunk(2)])
    aten_error = (aten.double() - want).abs().max().item()
    assert (y.double() - want).abs().max().item() <= 1.25 * aten_error + 1e-7


@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_a_nan_in_a_ghost_batch_poisons_its_statistics_as_in_aten(layout, monkeypatch):
    shape = (8, 3) if layout == "rows" else (8, 3, 2, 2)
    x = torch.randn(shape)
    x[5, 1] = float("nan")
    results = []
    for path in ("compiled", "aten_loop"):
        rm, rv = torch.zeros(3), torch.ones(3)
        _ghost_on_path(path, monkeypatch, x, rm, rv, None, None)
        results.append((rm.isnan(), rv.isnan()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][1].tolist() == [False, True, False]


def test_non_contiguous_parameters_take_the_torch_path():
    x = torch.randn(16, 6)
    weight, bias = torch.rand(12)[::2], torch.randn(12)[::2]
    stats = torch.zeros(6, 2)[:, 0], torch.ones(6, 2)[:, 0]  # running buffers as column views
    y = BF.ghost_batch_norm(x, *stats, weight, bias, True, 0.1, 1e-5, virtual_batch_size=4)
    rm, rv = torch.zeros(6), torch.ones(6)
    want = BF.ghost_batch_norm(x, rm, rv, weight.contiguous(), bias.contiguous(), True, 0.1, 1e-5,
                               virtual_batch_size=4)
    torch.testing.assert_close(y, want, **F32)
    torch.testing.assert_close(stats[1], rv, **F32)
    z = BF.batch_renorm(x, torch.zeros(6, 2)[:, 0], torch.ones(6, 2)[:, 0], weight, bias, True)
    torch.testing.assert_close(z, BF.batch_renorm(x, torch.zeros(6), torch.ones(6), weight.contiguous(),
                                                  bias.contiguous(), True), **F32)


@pytest.mark.parametrize("make", [lambda: bnn.GhostBatchNorm1d(4, virtual_batch_size=4),
                                  lambda: bnn.BatchRenorm1d(4, r_max=1.5, d_max=0.5)])
def test_ghost_and_renorm_trace_under_torch_compile(make):
    # the compiled ops have no fake-tensor implementation, so tracing takes the ATen path
    eager, traced = make(), make()
    compiled = torch.compile(traced, backend="eager", fullgraph=True)  # a graph break would hide a fallback
    x = torch.randn(16, 4) * 2 + 1
    torch.testing.assert_close(compiled(x), eager(x), **F32)
    torch.testing.assert_close(traced.running_var, eager.running_var, **F32)


def test_compiled_backwards_refuse_double_backward_clearly():
    x = torch.randn(16, 4, requires_grad=True)
    y = BF.ghost_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, virtual_batch_size=4)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        g.sum().backward()
    z = BF.batch_renorm(x, torch.zeros(4), torch.ones(4), None, None, True)
    with pytest.raises(RuntimeError, match="BNLAB_COMPILED_KERNELS=0"):
        torch.autograd.grad(z.pow(2).sum(), x, create_graph=True)


def test_compiled_ghost_results_do_not_depend_on_the_thread_count():
    # 1500 rows per ghost: chunk edges that are no multiple of the float runs, so a thread-dependent
    # split would change the rounding (it did, before the split depended on sizes only)
    x = torch.randn(3000, 8, requires_grad=True)
    up = torch.randn(3000, 8)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            rm, rv = torch.zeros(8), torch.ones(8)
            y = BF.ghost_batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5, virtual_batch_size=1500)
            z = BF.batch_renorm(x, rm, rv, None, None, True, 0.1, 1e-5)
            (dx,) = torch.autograd.grad((y * up).sum() + (z * up).sum(), x)
            results.append((y, z, dx, rm, rv))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_build_lock_left_by_a_killed_build_is_removed_under_bnlabs_own_lock(tmp_path):
    # torch's builder would wait forever on the leftover lock file; bnlab's flock proves it stale
    from bnlab.functional.compiled import _exclusive

    (tmp_path / "lock").write_text("")
    with pytest.warns(RuntimeWarning, match="killed build"):
        with _exclusive(tmp_path):
            assert not (tmp_path / "lock").exists()
    with _exclusive(tmp_path):  # nothing left over: silent
        pass


def test_compiled_kernels_can_be_switched_off_without_a_warning(monkeypatch, recwarn):
    import bnlab.functional.compiled as compiled

    monkeypatch.setattr(compiled, "_state", {})
    monkeypatch.setenv("BNLAB_COMPILED_KERNELS", "0")
    assert compiled.load_kernels() is False
    x = torch.randn(16, 4)
    y = BF.ghost_batch_norm(x, torch.zeros(4), torch.ones(4), None, None, True, 0.1, 1e-5, virtual_batch_size=4)
    want = torch.cat([nn.functional.batch_norm(c, None, None, training=True) for c in x.chunk(4)])
    torch.testing.assert_close(y, want, **F32)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def _numpy_normalized(x: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)


@pytest.mark.parametrize("kernel", [None, "composite"], ids=["native", "composite"])
def test_each_kernel_of_the_family_against_numpy_one_liners(kernel):
    """Both paths of every family member against NumPy, not against each other: a bug shared by torch's
    kernel and ours (or a composite that only copies native) cannot pass."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64) * 2 + 1
    w, b = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    xn, wn, bn_ = x.numpy(), w.numpy()[None, :, None], b.numpy()[None, :, None]
    eps = 1e-5
    grouped = xn.reshape(4, 3, 10)  # 3 groups of 2 channels × 5 positions
    expected = {
        "batch": _numpy_normalized(xn, (0, 2), eps) * wn + bn_,
        "instance": _numpy_normalized(xn, (2,), eps) * wn + bn_,
        "group": _numpy_normalized(grouped, (2,), eps).reshape(4, 6, 5) * wn + bn_,
        "layer": _numpy_normalized(xn, (1, 2), eps),
    }
    got = {
        "batch": BF.batch_norm(x, None, None, w, b, True, 0.1, eps, kernel=kernel),
        "instance": BF.instance_norm(x, None, None, w, b, True, 0.1, eps, kernel=kernel),
        "group": BF.group_norm(x, 3, w, b, eps, kernel=kernel),
        "layer": BF.layer_norm(x, (6, 5), None, None, eps, kernel=kernel),
    }
    for name, want in expected.items():
        torch.testing.assert_close(got[name], torch.from_numpy(want), rtol=1e-10, atol=1e-10, msg=name)
