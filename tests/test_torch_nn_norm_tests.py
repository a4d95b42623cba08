"""PyTorch's own norm-layer tests from test/test_nn.py and test/nn/test_load_state_dict.py, run for torch.nn
and for bnlab.nn.

Ported from PyTorch (BSD-3-Clause), rewritten for pytest; each body takes the implementation as a
parameter (``impl`` is the ``torch.nn`` or ``bnlab.nn`` namespace, ``functional`` is
``torch.nn.functional.batch_norm`` or ``bnlab.functional.batch_norm``):

* test/test_nn.py (``TestNN``, ``TestNNDeviceType``, CPU parts): test_batchnorm_nhwc_cpu,
  test_batchnorm_non_contig_cpu, test_batchnorm_nhwc_cuda (run on CPU), test_batchnorm_raises_error_if_*,
  test_batchnorm_buffer_update_when_stats_are_not_tracked, _test_InstanceNorm_general,
  _test_LayerNorm_general, _test_GroupNorm_general, the single-value / single-spatial-element errors of
  BatchNorm, InstanceNorm and GroupNorm, the momentum=None (cumulative average) and running-stat update
  checks of _test_batchnorm_simple_average / _test_batchnorm_update_stats, _test_batchnorm_eval,
  _test_batchnorm_affine, test_BatchNorm_empty and test_GroupNorm_empty (_test_module_empty_input, also
  for LayerNorm), test_groupnorm_nhwc (float and double) and test_batchnorm_load_state_dict.
* test/nn/test_load_state_dict.py (``TestLoadStateDict``): test_load_state_dict (its BatchNorm parts),
  test_load_state_dict_BC, test_load_state_dict_assign_meta, test_load_state_dict_assign_with_optimizer,
  test_load_state_dict_assign_shape_stride, each under ``swap`` True and False.

A test that fails for torch itself on this CPU is an xfail with the reason, for both implementations.
"""

from __future__ import annotations

import random
from copy import deepcopy
from itertools import product

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn import functional as F

import bnlab.functional as BF
import bnlab.nn as bnn

IMPLS = pytest.mark.parametrize("impl", [nn, bnn], ids=["torch", "bnlab"])
FUNCTIONALS = pytest.mark.parametrize("batch_norm", [F.batch_norm, BF.batch_norm], ids=["torch", "bnlab"])


# -- test/test_nn.py --------------------------------------------------------------------------------

NHWC_CASES = [
    (cls, shape, dtype, mixed)
    for cls, shapes, layout in (("BatchNorm2d", [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)], torch.channels_last),
                                ("BatchNorm3d", [(4, 8, 2, 10, 10), (4, 1, 2, 9, 9), (4, 9, 1, 1, 1)],
                                 torch.channels_last_3d))
    for shape in shapes
    for dtype, mixed in ((torch.float, False), (torch.bfloat16, False), (torch.bfloat16, True),
                         (torch.float16, False), (torch.float16, True))
]
# upstream: precision 1e-4 for the weight gradient in float and bfloat16, the default for float16
NHWC_WEIGHT_GRAD_TOL = {torch.float: 1e-4, torch.bfloat16: 1e-4, torch.float16: None}


def _nhwc_case_id(case):
    cls, shape, dtype, mixed = case
    return f"{cls}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}{'-mixed' if mixed else ''}"


@IMPLS
@pytest.mark.parametrize("case", NHWC_CASES, ids=[_nhwc_case_id(c) for c in NHWC_CASES])
def test_batchnorm_nhwc_cpu(impl, case):
    cls, size, dtype, mixed_dtype = case
    layout = torch.channels_last if len(size) == 4 else torch.channels_last_3d
    torch.manual_seed(0)
    channels = size[1]
    x = torch.randn(size, dtype=dtype).contiguous(memory_format=layout).detach().requires_grad_(True)
    grad = torch.randn(size, dtype=dtype).contiguous(memory_format=layout)
    bn = getattr(impl, cls)(channels).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref_x = x.detach().clone().contiguous().requires_grad_(True)
    ref_grad = grad.detach().clone().contiguous()
    ref_bn = getattr(impl, cls)(channels).to(dtype)
    ref_bn.load_state_dict(bn.state_dict())
    if mixed_dtype:
        bn.float()
        ref_bn.float()
    out = bn(x)
    out.backward(grad)
    ref_out = ref_bn(ref_x)
    ref_out.backward(ref_grad)
    assert out.is_contiguous(memory_format=layout)
    assert ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out)
    tol = NHWC_WEIGHT_GRAD_TOL[dtype]
    torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad)
    torch.testing.assert_close(x.grad, ref_x.grad)


@IMPLS
def test_batchnorm_non_contig_cpu(impl):
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = impl.BatchNorm2d(2).float().eval()
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref_bn = impl.BatchNorm2d(2).float().eval()
    ref_bn.load_state_dict(bn.state_dict())
    out, ref_out = bn(x), ref_bn(x.detach().clone().contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out)


@IMPLS
@pytest.mark.parametrize("dtype", [torch.half, torch.float])
def test_batchnorm_nhwc_eval_is_exact(impl, dtype):  # upstream test_batchnorm_nhwc_cuda, on this CPU
    model = impl.BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True).eval().to(dtype)
    x = torch.randn(2, 64, 50, 50, dtype=dtype)
    assert torch.equal(model(x), model(x.contiguous(memory_format=torch.channels_last)))


@IMPLS
def test_batchnorm_raises_error_if_less_than_one_value_per_channel(impl):
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError):
        impl.BatchNorm1d(10)(x)


@FUNCTIONALS
@pytest.mark.parametrize("wrong", ["running_mean", "running_var", "weight", "bias"])
def test_batchnorm_raises_error_if_a_tensor_is_not_same_size_as_input(batch_norm, wrong):
    x = torch.rand(2, 10)
    for size in (9, 11):
        tensors = dict(running_mean=torch.rand(10), running_var=torch.rand(10))
        tensors[wrong] = nn.Parameter(torch.rand(size)) if wrong in ("weight", "bias") else torch.rand(size)
        with pytest.raises(RuntimeError):
            batch_norm(x, tensors.pop("running_mean"), tensors.pop("running_var"), **tensors)


@FUNCTIONALS
def test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad(batch_norm):
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2))
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2)):
        tangents = tuple(torch.rand_like(x) for x in args)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) if i in dual_indices else p for i, (p, t) in enumerate(zip(args, tangents))]
            if (1 in dual_indices or 2 in dual_indices) and 0 in dual_indices:
                with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
                    batch_norm(*duals, training=False, momentum=-1.2)
            else:
                batch_norm(*duals, training=False, momentum=-1.2)


@IMPLS
def test_batchnorm_buffer_update_when_stats_are_not_tracked(impl):
    bn = impl.BatchNorm1d(4, track_running_stats=True)
    bn.track_running_stats = False  # use the buffers to normalize, do not update them
    before = [t.clone() for t in (bn.num_batches_tracked, bn.running_mean, bn.running_var)]
    bn(torch.rand(32, 4))
    for old, new in zip(before, (bn.num_batches_tracked, bn.running_mean, bn.running_var)):
        assert torch.equal(old, new)


@IMPLS
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_batchnorm_update_stats(impl, momentum):
    # the running statistics follow the documented update (momentum=None: the cumulative average)
    bn = impl.BatchNorm1d(3, momentum=momentum).double()
    batches = [torch.rand(4, 3, dtype=torch.float64) * (i + 1) for i in range(3)]
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for count, x in enumerate(batches, 1):
        bn(x)
        factor = 1.0 / count if momentum is None else momentum
        mean = (1 - factor) * mean + factor * x.mean(0)
        var = (1 - factor) * var + factor * x.var(0, unbiased=True)
        assert bn.num_batches_tracked.item() == count
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    if momentum is None:  # upstream _test_batchnorm_simple_average: the plain average of the batches
        torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))
    bn.eval()
    snapshot = deepcopy(bn.state_dict())
    bn(torch.rand(4, 3, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(snapshot.values(), bn.state_dict().values()))
    bn.reset_running_stats()
    assert bn.num_batches_tracked.item() == 0 and bn.running_mean.eq(0).all() and bn.running_var.eq(1).all()


@IMPLS
@pytest.mark.parametrize("cls,shape", [("InstanceNorm1d", (4, 5, 17)), ("InstanceNorm2d", (3, 4, 7, 6)),
                                       ("InstanceNorm3d", (2, 3, 4, 5, 6))])
def test_InstanceNorm_general(impl, cls, shape):
    torch.manual_seed(0)
    x = torch.rand(shape).requires_grad_()
    b, c = shape[:2]
    layer = getattr(impl, cls)(c, eps=0)
    output = layer(x)
    flat = output.view(b * c, -1)
    torch.testing.assert_close(flat.mean(1).abs().mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(1, unbiased=False).abs().mean(), torch.tensor(1.0), atol=1e-5, rtol=0)
    # eval mode does not change the behaviour without running statistics
    grad_out = torch.randn_like(output)
    res1, grad1 = output.detach().clone(), torch.autograd.grad(output, x, grad_out)[0]
    layer.eval()
    output = layer(x)
    torch.testing.assert_close(output, res1, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(output, x, grad_out)[0], grad1, rtol=0, atol=0)
    # momentum=1 and tracked statistics: the running ones are the input's (unbiased variance)
    layer = getattr(impl, cls)(c, momentum=1, eps=0, track_running_stats=True)
    layer(x)
    mean = x.transpose(1, 0).reshape(c, -1).mean(1)
    var = x.transpose(1, 0).reshape(c, b, -1).var(2, unbiased=True)
    torch.testing.assert_close((mean - layer.running_mean).abs().mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close((var.mean(1) - layer.running_var).abs().mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    # in eval mode, adding X * std to a channel makes that output channel's mean X
    layer.eval()
    delta = (layer.running_var.sqrt() * torch.arange(c)).view(-1, *[1] * (x.dim() - 2))
    out = layer(x + delta)
    torch.testing.assert_close(out.transpose(0, 1).reshape(c, -1).mean(1), torch.arange(c, dtype=torch.float))


@IMPLS
def test_LayerNorm_general(impl):
    rng = random.Random(0)
    torch.manual_seed(0)
    for i in range(2, 6):
        shape = torch.randint(3, 6, (i,), dtype=torch.long).tolist()
        x = torch.empty(*shape).uniform_(0, 10)
        normalized_ndim = rng.randint(1, i - 1)
        normalized_shape, unnormalized_shape = shape[-normalized_ndim:], shape[:-normalized_ndim]
        ln = impl.LayerNorm(normalized_shape, eps=0)
        out = ln(x).view(*(unnormalized_shape + [-1]))
        torch.testing.assert_close(out.mean(-1).abs().mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.var(-1, unbiased=False).abs().mean(), torch.tensor(1.0), atol=1e-5, rtol=0)
        scale, bias = torch.empty(2).uniform_(0.2, 2).tolist()
        with torch.no_grad():
            ln.weight.fill_(scale)
            ln.bias.fill_(bias)
        out = ln(x).view(*(unnormalized_shape + [-1]))
        torch.testing.assert_close(out.mean(-1).abs().mean().item(), bias, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.var(-1, unbiased=False).abs().mean().item(), scale**2, atol=1e-5, rtol=0)
    for norm_shape, input_shape in {(): (), (2, 3): (3,), (2,): (1, 2, 3), (10,): (2, 3), 10: (2, 3)}.items():
        ln = impl.LayerNorm(norm_shape)
        with pytest.raises(RuntimeError):
            ln(torch.empty(input_shape).uniform_(0, 10))


@IMPLS
def test_GroupNorm_general(impl):
    torch.manual_seed(0)
    good = {(1, 2, 3, 4): 2, (2, 3, 10): 3, (3, 1, 1, 1, 2): 1, (2, 6, 4, 2, 2): 3, (1, 256, 1, 1): 32}
    for (shape, g), requires_grad in product(good.items(), [True, False]):
        x = torch.empty(*shape).uniform_(0, 10).requires_grad_(requires_grad)
        b, c = shape[:2]
        gn = impl.GroupNorm(g, c, eps=0)
        out = gn(x)
        grouped = out.view(b, g, -1)
        torch.testing.assert_close(grouped.mean(-1).abs().mean(), torch.tensor(0.0), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(grouped.var(-1, unbiased=False).abs().mean(), torch.tensor(1.0),
                                   atol=1e-3, rtol=1e-3)
        if requires_grad:
            out.backward(torch.randn_like(out))
        scale, bias = torch.empty(c).uniform_(0.2, 2), torch.empty(c).uniform_(0.2, 2)
        with torch.no_grad():
            gn.weight.copy_(scale)
            gn.bias.copy_(bias)
        normed = ((gn(x).view(b, c, -1) - bias.view(c, 1)) / scale.view(c, 1)).view(b, g, -1)
        torch.testing.assert_close(normed.mean(-1).abs().mean(), torch.tensor(0.0), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(normed.var(-1, unbiased=False).abs().mean(), torch.tensor(1.0), atol=1e-3, rtol=1e-3)
    for shape, g in {(1, 2, 3, 4): 3, (2, 3, 10): 2, (3, 1, 1, 1, 2): 10, (2, 6, 4, 2, 2): 4}.items():
        with pytest.raises((RuntimeError, ValueError)):  # torch 2.x raises ValueError in the constructor
            impl.GroupNorm(g, shape[1])(torch.empty(*shape).uniform_(0, 10))


@IMPLS
def test_GroupNorm_raises_error_if_one_value_per_group(impl):
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError):
        impl.GroupNorm(10, 10)(x)


@IMPLS
@pytest.mark.parametrize("cls,shape", [("InstanceNorm1d", (2, 3, 1)), ("InstanceNorm2d", (2, 3, 1, 1)),
                                       ("InstanceNorm3d", (2, 3, 1, 1, 1))])
def test_instancenorm_raises_error_for_single_spatial_element_during_training(impl, cls, shape):
    x = torch.rand(shape)
    for track_running_stats in (True, False):
        layer = getattr(impl, cls)(shape[1], track_running_stats=track_running_stats)
        with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
            layer(x)
        if track_running_stats:  # eval with running statistics takes it
            layer.eval()(x)


@IMPLS
def test_instancenorm_raises_error_if_less_than_one_value_per_channel(impl):
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError):
        impl.InstanceNorm1d(10)(x)


@IMPLS
@pytest.mark.parametrize("ndim", [2, 3])
def test_batchnorm_eval(impl, ndim):
    torch.manual_seed(0)
    # eval mode: two passes give the same output and input gradient
    module = impl.BatchNorm1d(3).eval()
    data = torch.rand([3] * ndim, requires_grad=True)
    grad = torch.rand([3] * ndim)
    res1 = module(data)
    grad1 = torch.autograd.grad(res1, data, grad)[0]
    res2 = module(data)
    grad2 = torch.autograd.grad(res2, data, grad)[0]
    assert torch.equal(res1, res2) and torch.equal(grad1, grad2)
    # without running statistics, eval mode is train mode
    module = impl.BatchNorm1d(3, track_running_stats=False)
    data = torch.rand(4, 3, requires_grad=True)
    grad = torch.rand(4, 3)
    res1 = module(data)
    grad1 = torch.autograd.grad(res1, data, grad)[0]
    module.eval()
    res2 = module(data)
    grad2 = torch.autograd.grad(res2, data, grad)[0]
    assert torch.equal(res1, res2) and torch.equal(grad1, grad2)


@IMPLS
@pytest.mark.parametrize("ndim", [2, 3])
def test_batchnorm_affine(impl, ndim):
    # affine with weight 1 and bias 0 is no affine
    module = impl.BatchNorm1d(3, affine=False)
    module_affine = impl.BatchNorm1d(3, affine=True)
    with torch.no_grad():
        module_affine.weight.fill_(1.0)
        module_affine.bias.zero_()
    data = torch.rand([3] * ndim, requires_grad=True)
    grad = torch.ones_like(data)
    res1 = module_affine(data)
    grad1 = torch.autograd.grad(res1, data, grad)[0]
    res2 = module(data)
    grad2 = torch.autograd.grad(res2, data, grad)[0]
    torch.testing.assert_close(res1, res2)
    torch.testing.assert_close(grad1, grad2)


def _module_empty_input(module, x, check_size=True):
    x.requires_grad_(True)
    out = module(x)
    out.backward(torch.rand_like(out))
    if check_size:
        assert out.size() == x.size()
    for p in module.parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, torch.zeros_like(p.grad))
    assert torch.equal(x.grad, torch.zeros_like(x))


@IMPLS
def test_BatchNorm_empty(impl):
    module = impl.BatchNorm2d(3)
    _module_empty_input(module, torch.randn(0, 3, 2, 2))
    assert torch.equal(module.running_mean, torch.zeros(3)) and torch.equal(module.running_var, torch.ones(3))


@IMPLS
@pytest.mark.parametrize("make,shape", [(lambda m: m.GroupNorm(2, 4), (0, 4, 2, 2)),
                                        (lambda m: m.LayerNorm(4), (0, 4))],
                         ids=["GroupNorm", "LayerNorm"])  # InstanceNorm: torch raises (test_torch_dropin.py)
def test_norm_empty(impl, make, shape):
    _module_empty_input(make(impl), torch.randn(shape))


@IMPLS
@pytest.mark.parametrize("dtype", [torch.float, torch.double])
@pytest.mark.parametrize("shape,groups", [((4, 8, 10, 10), 4), ((2, 6, 3, 5), 3), ((2, 4, 1, 1), 2)])
def test_groupnorm_nhwc(impl, dtype, shape, groups):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gn = impl.GroupNorm(groups, shape[1]).to(dtype)
    with torch.no_grad():
        gn.weight.uniform_()
        gn.bias.uniform_()
    ref_x = x.detach().clone().contiguous().requires_grad_(True)
    ref_gn = impl.GroupNorm(groups, shape[1]).to(dtype)
    ref_gn.load_state_dict(gn.state_dict())
    out, ref_out = gn(x), ref_gn(ref_x)
    out.backward(grad)
    ref_out.backward(grad.contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last) and ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gn.weight.grad, ref_gn.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gn.bias.grad, ref_gn.bias.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-4, rtol=1e-4)


@IMPLS
def test_batchnorm_load_state_dict(impl):
    bn = impl.BatchNorm2d(1)
    assert bn.state_dict()["num_batches_tracked"].item() == 0
    bn.num_batches_tracked = torch.tensor(10)
    assert bn.state_dict()["num_batches_tracked"].item() == 10
    bn.load_state_dict({}, strict=False)
    assert bn.state_dict()["num_batches_tracked"].item() == 10
    # a meta counter missing from the state dict becomes a real 0
    with torch.device("meta"):
        meta_bn = impl.BatchNorm2d(1)
    assert meta_bn.num_batches_tracked.is_meta
    meta_bn.load_state_dict({}, assign=True, strict=False)
    assert meta_bn.state_dict()["num_batches_tracked"].device.type == "cpu"
    assert meta_bn.state_dict()["num_batches_tracked"].item() == 0


# -- test/nn/test_load_state_dict.py ------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["swap", "no-swap"])
def swap(request):
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param)
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(before)


@IMPLS
def test_load_state_dict(impl, swap):
    linear = nn.Linear(5, 5)
    block = nn.Module()
    block.conv1 = nn.Conv2d(3, 3, 3, bias=True)
    block.conv2 = nn.Conv2d(3, 3, 3, bias=False)
    net = nn.Module()
    net.linear1 = linear
    net.linear2 = linear
    net.bn = impl.BatchNorm2d(2)
    net.block = block
    net.add_module("empty", None)
    state_dict = net.state_dict()
    state_dict.update({"linear1.weight": torch.ones(5, 5), "bn.running_mean": torch.randn(2)})
    incompatible = net.load_state_dict(state_dict)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert torch.equal(net.bn.running_mean, state_dict["bn.running_mean"])

    state_dict = net.state_dict()
    state_dict.update({"bn.running_mean": torch.rand(14, 4)})  # wrong size
    with pytest.raises(RuntimeError):
        net.load_state_dict(state_dict)
    with pytest.raises(RuntimeError):
        net.load_state_dict(state_dict, strict=False)

    state_dict = net.state_dict()
    del state_dict["bn.running_var"]
    with pytest.raises(RuntimeError):
        net.load_state_dict(state_dict)
    assert net.load_state_dict(state_dict, strict=False).missing_keys == ["bn.running_var"]

    old = deepcopy(net.state_dict())
    new_values = {"bn.running_mean": torch.randn(2), "nonexistent_key": torch.rand(3)}
    net.load_state_dict(new_values, strict=False)
    assert torch.equal(net.bn.running_mean, new_values["bn.running_mean"])
    for key, value in net.state_dict().items():
        if key != "bn.running_mean":
            assert torch.equal(value, old[key]), key


@IMPLS
def test_load_state_dict_BC(impl, swap):
    # num_batches_tracked came with version 2: earlier or unversioned state dicts load with 0
    bn = impl.BatchNorm2d(3)
    state_dict = bn.state_dict()
    del state_dict["num_batches_tracked"]
    state_dict._metadata[""]["version"] = 1
    bn.load_state_dict(state_dict)
    assert bn.num_batches_tracked.dtype == torch.long and bn.num_batches_tracked.item() == 0
    del state_dict._metadata[""]["version"]
    bn.load_state_dict(state_dict)
    assert bn.num_batches_tracked.dtype == torch.long and bn.num_batches_tracked.item() == 0


def _fc_bn(impl, with_x=False):
    class MyModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 5)
            self.bn = impl.BatchNorm1d(5)
            if with_x:
                self.x = nn.Parameter(torch.rand(5), requires_grad=False)

        def forward(self, input):
            y = self.bn(self.fc1(input))
            return y + self.x if with_x else y

    return MyModule


@IMPLS
@pytest.mark.parametrize("keep_vars", [True, False])
def test_load_state_dict_assign_meta(impl, swap, keep_vars):
    MyModule = _fc_bn(impl, with_x=True)
    net = MyModule()
    state_dict = net.state_dict(keep_vars=keep_vars)
    for v in state_dict.values():
        v.requires_grad_(False)
    with torch.device("meta"):
        net_meta = MyModule()
    old = net_meta.state_dict(keep_vars=True)
    net_meta.load_state_dict(state_dict, assign=True)
    new = net_meta.state_dict(keep_vars=True)
    for key in state_dict:
        if key in net_meta._parameters:
            if keep_vars and not swap:
                assert state_dict[key] is new[key]
            elif swap:
                assert new[key] is old[key]
            else:
                assert new[key] is not old[key]
            assert old[key].requires_grad == new[key].requires_grad
            assert torch.equal(state_dict[key], new[key])
    for key, value in net_meta.bn.state_dict().items():
        assert torch.equal(value, state_dict["bn." + key]) and not value.is_meta
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in net_meta.named_parameters()]
    assert [n for n, _ in net.named_buffers()] == [n for n, _ in net_meta.named_buffers()]
    x = torch.randn(4, 3)
    torch.testing.assert_close(net(x), net_meta(x.clone()))


@IMPLS
def test_load_state_dict_assign_with_optimizer(impl, swap):
    MyModule = _fc_bn(impl)
    torch.manual_seed(0)
    net = MyModule()
    opt = torch.optim.Adam(net.parameters(), lr=1000)
    x = torch.randn(4, 3)
    for _ in range(3):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    opt_state, net_state = deepcopy(opt.state_dict()), deepcopy(net.state_dict())
    with torch.device("meta"):
        net_meta = MyModule()
    net_meta.load_state_dict(net_state, assign=True)
    opt2 = torch.optim.Adam(net_meta.parameters(), lr=1000)  # created after loading, as assign requires
    opt2.load_state_dict(opt_state)
    y = x.clone()
    for _ in range(3):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
        opt2.zero_grad()
        net_meta(y).sum().backward()
        opt2.step()
    torch.testing.assert_close(opt.state_dict(), opt2.state_dict())
    torch.testing.assert_close(net.state_dict(), net_meta.state_dict())


@IMPLS
def test_load_state_dict_assign_shape_stride(impl, swap):
    MyModule = _fc_bn(impl)
    state_dict = MyModule().state_dict()
    state_dict["fc1.weight"] = torch.randn(3, 5).transpose(0, 1)  # another stride is fine
    net2 = MyModule()
    net2.load_state_dict(state_dict, strict=False, assign=True)
    state_dict["fc1.weight"] = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="size mismatch for fc1.weight: copying a param with shape"):
        net2.load_state_dict(state_dict, strict=False, assign=True)
