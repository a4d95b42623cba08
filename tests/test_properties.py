"""Invariants of batch normalization, checked with hypothesis over shapes and values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bnlab.functional as BF
import bnlab.nn as bnn
from bnlab.functional import kernels as bn_module
from helpers import OURS_FOR_NDIM


@st.composite
def bn_inputs(draw, min_values=2):
    ndim = draw(st.integers(2, 5))
    channels = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 6))
    spatial = [draw(st.integers(1, 4)) for _ in range(ndim - 2)]
    shape = (batch, channels, *spatial)
    per_channel = batch * torch.Size(spatial).numel()
    if per_channel < min_values:
        shape = (batch + min_values, channels, *spatial)
    scale = draw(st.floats(1e-2, 1e3))
    offset = draw(st.floats(-100, 100))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale + offset


def _reduce_dims(x):
    return [0, *range(2, x.dim())]


@given(x=bn_inputs(), convention=st.sampled_from(["torch", "keras"]))
def test_training_output_is_standardized(x, convention):
    layer = OURS_FOR_NDIM[x.dim()](x.shape[1], affine=False, convention=convention)
    y = layer(x).double()
    x64 = x.double()
    var_in = x64.var(dim=_reduce_dims(x), unbiased=False)
    mean_out = y.mean(dim=_reduce_dims(x))
    var_out = y.var(dim=_reduce_dims(x), unbiased=False)
    # exact expectation with eps: Var[y] = v / (v + eps); mean 0 up to float32 rounding of |offset|/std
    torch.testing.assert_close(var_out, var_in / (var_in + layer.eps), rtol=2e-3, atol=2e-3)
    rel_offset = (x64.mean(dim=_reduce_dims(x)).abs() + 1) / var_in.sqrt()
    assert (mean_out.abs() <= 1e-4 * rel_offset + 1e-4).all()


@given(x=bn_inputs())
def test_keras_momentum_zero_makes_eval_equal_train(x):
    layer = OURS_FOR_NDIM[x.dim()](x.shape[1], momentum=0.0, convention="keras")
    g = torch.Generator().manual_seed(0)  # not the global generator: the same weights for every example
    with torch.no_grad():
        layer.weight.copy_(torch.rand(x.shape[1], generator=g) * 1.5 + 0.5)
        layer.bias.copy_(torch.randn(x.shape[1], generator=g))
    y_train = layer(x)
    layer.eval()
    # train and eval normalize with the same statistics, rounded differently in float32: the error of x − μ is
    # ~ulp(|x|), amplified by γ/σ, so the tolerance scales with |x|max/σ (large offsets, small spreads)
    dims = [0, *range(2, x.dim())]
    spread = x.double().std(dim=dims, unbiased=False).clamp_min(1e-3).min()
    atol = 1e-4 + 4 * torch.finfo(torch.float32).eps * float(x.abs().max() / spread) * 2.0
    torch.testing.assert_close(layer(x), y_train, rtol=1e-4, atol=atol)


@given(x=bn_inputs(min_values=1), momentum=st.sampled_from([0.1, 0.9, None]))
def test_eval_never_changes_statistics(x, momentum):
    layer = OURS_FOR_NDIM[x.dim()](x.shape[1], momentum=momentum)
    with torch.no_grad():
        layer.running_mean.normal_(), layer.running_var.uniform_(0.5, 2), layer.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@given(a=st.floats(0.05, 20.0), seed=st.integers(0, 1000))
def test_scale_invariance_ioffe_szegedy_3_3(a, seed):
    """BN(aWu) = BN(Wu); d/du is unchanged; d/d(aW) = (1/a) d/dW."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(32, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    upstream = torch.randn(32, 5, generator=g, dtype=torch.float64)
    outputs, grads_u, grads_w = [], [], []
    for scale in (1.0, a):
        ws = (w * scale).requires_grad_(True)
        u.grad = None
        # eps breaks exact invariance; 0 is refused in training (as torch does), 1e-300 vanishes next to var
        layer = bnn.BatchNorm1d(5, eps=1e-300, dtype=torch.float64)
        y = layer(u @ ws.T)
        y.backward(upstream)
        outputs.append(y.detach()), grads_u.append(u.grad.clone()), grads_w.append(ws.grad.clone())
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(grads_u[1], grads_u[0])
    torch.testing.assert_close(grads_w[1] * a, grads_w[0])


@given(
    x=bn_inputs(),
    momentum=st.floats(0.0, 1.0),
    correction=st.sampled_from([0, 1]),
    training=st.booleans(),
    channels_last=st.booleans(),
)
def test_native_and_composite_kernels_agree(x, momentum, correction, training, channels_last):
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    c = x.shape[1]
    g = torch.Generator().manual_seed(c)
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    initial_mean, initial_var = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    # float32 loses |mean|/std digits to cancellation, differently in each kernel
    var, mean = torch.var_mean(x.double(), dim=[0, *range(2, x.dim())], unbiased=False)
    conditioning = max(1.0, ((mean.abs() + 1) / (var.sqrt() + 1e-3)).max().item())
    results = []
    for kernel in ("native", "composite"):
        rm, rv = initial_mean.clone(), initial_var.clone()
        xi = x.detach().clone().requires_grad_(True)
        y = BF.batch_norm(xi, rm, rv, weight, bias, training, momentum, 1e-3,
                          running_var_correction=correction, kernel=kernel)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xi.grad, rm, rv))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5 * conditioning * max(1.0, b.abs().max().item()))


def test_registered_kernel_is_used_only_for_its_layout(monkeypatch):
    monkeypatch.setattr(bn_module, "_KERNELS", list(bn_module._KERNELS))
    calls = []

    def counting_kernel(*args):
        calls.append(args[0].shape)
        return bn_module._composite_kernel(*args)

    BF.register_kernel(BF.Kernel("nhwc-test", counting_kernel, layouts=frozenset({"channels_last"})))
    assert BF.kernel_names()[0] == "nhwc-test"
    layer = bnn.BatchNorm2d(3)
    layer(torch.randn(4, 3, 5, 5))
    assert calls == []
    layer(torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last))
    assert calls == [torch.Size([4, 3, 5, 5])]
    with pytest.raises(ValueError, match="unknown layouts"):
        BF.register_kernel(BF.Kernel("bad", counting_kernel, layouts=frozenset({"nchw"})))
    with pytest.raises(ValueError, match="unknown batch-norm kernel"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=True, kernel="nope")


def test_functional_errors_are_clear():
    with pytest.raises(ValueError, match=r"shape \(N, C, \*\)"):
        BF.batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var must be given"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_compute_stats_is_stable_for_large_offsets():
    """|mean| >> std: the one-pass E[x²] − E[x]² in float32 loses the variance here; the oracle is the
    two-pass variance in float64 of the same half-precision values."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(10000, 2, generator=g) * 40 + 3e4).half()  # fp16 steps of 16 at 3e4: a spread of ~40
    mean, var = BF.compute_stats(x, [0])
    assert mean.dtype == torch.float32
    values = x.double().numpy()
    torch.testing.assert_close(var.double(), torch.from_numpy(values.var(axis=0)), rtol=1e-4, atol=0)
    naive = (x.float() ** 2).mean(0) - x.float().mean(0) ** 2  # the plausible bug this test must catch
    assert not torch.allclose(naive.double(), torch.from_numpy(values.var(axis=0)), rtol=1e-4, atol=0)
