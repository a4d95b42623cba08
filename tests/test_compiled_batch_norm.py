"""Plain batch norm on bnlab's compiled kernel (``set_backend("compiled")``) against torch.nn and the
NumPy float64 reference: outputs, gradients and running statistics, every layout, both conventions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.functional as BF
import bnlab.nn as bnn
from bnlab import reference
from bnlab.functional import backend
from bnlab.functional.compiled import load_kernels
from helpers import TORCH_OF, twin


OURS = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}
SHAPES = {  # name: (shape, memory format)
    "NC": ((32, 12), None),
    "NCL": ((8, 6, 11), None),
    "NCHW": ((8, 6, 7, 5), None),
    "NCHW-channels-last": ((8, 6, 7, 5), torch.channels_last),
    "NCDHW": ((4, 5, 3, 4, 6), None),
    "NCDHW-channels-last": ((4, 5, 3, 4, 6), torch.channels_last_3d),
    "C=1": ((16, 1, 4, 4), None),
    "two-values-per-channel": ((2, 9), None),
    "spatial-1x1": ((8, 6, 1, 1), None),
    "many-channels": ((64, 2048), None),
    "large-plane": ((2, 3, 96, 96), None),
    "partial-run": ((2, 3, 50, 50), None),  # 2,500 values a plane: four runs of 512 and one of 452
}


@pytest.fixture
def compiled_backend():
    before = BF.get_backend()
    BF.set_backend("compiled")
    yield
    BF.set_backend(before)


def _input(shape, fmt, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)
    return x.to(memory_format=fmt) if fmt is not None else x


def _train_step(layer, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(upstream)
    grads = [p.grad for p in (layer.weight, layer.bias) if p is not None]
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("options", [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}],
                         ids=["affine", "no-affine", "untracked", "cumulative"])
def test_matches_torch_nn_to_float32_round_off(name, options, compiled_backend):
    shape, fmt = SHAPES[name]
    ours, theirs = twin(OURS[len(shape)], TORCH_OF[OURS[len(shape)]], shape[1], **options)
    for step in range(3):
        x, up = _input(shape, fmt, seed=step), _input(shape, fmt, seed=10 + step)
        (y1, dx1, g1), (y2, dx2, g2) = _train_step(ours, x, up), _train_step(theirs, x, up)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=2e-5)
        if name == "two-values-per-channel":  # x̂ = ±1: dx is 0 in exact arithmetic; both return
            torch.testing.assert_close(dx1, dx2, rtol=1e-2, atol=1e-4)  # round-off scaled by w/σ (σ can be tiny)
        else:
            torch.testing.assert_close(dx1, dx2, rtol=1e-4, atol=2e-5)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert y1.is_contiguous(memory_format=fmt or torch.contiguous_format)  # the layout is kept
    for a, b in zip(ours.buffers(), theirs.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    x = _input(shape, fmt, seed=99)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "channels-last"])
def test_outputs_above_the_streaming_threshold(fmt, compiled_backend):
    # The kernel writes y and dx with non-temporal stores from 16 MiB (kStreamBytes in the C++):
    # an odd plane size puts every plane at a different alignment, so the unaligned head, the
    # streamed 64-byte lines and the tail are all exercised. Channels-last takes the rows layout,
    # which does not stream. The oracle is torch.nn in float64 on the same values: torch's own
    # float32 channels-last kernel is 3.6e-4 off at this size (ours 5e-7).
    shape = (3, 5, 541, 541)
    assert torch.Size(shape).numel() * 4 >= 16 << 20
    ours, oracle = twin(bnn.BatchNorm2d, nn.BatchNorm2d, shape[1])
    oracle.double()
    x, up = _input(shape, fmt), _input(shape, fmt, seed=1)
    (y1, dx1, g1), (y2, dx2, g2) = _train_step(ours, x, up), _train_step(oracle, x.double(), up.double())
    torch.testing.assert_close(y1.double(), y2, rtol=0, atol=2e-6)
    torch.testing.assert_close(dx1.double(), dx2, rtol=0, atol=2e-6)
    for a, b in zip(g1, g2):  # sums over 880k values (|dβ| ~ 1.3e6); torch's float32 is 0.03-15 off here
        torch.testing.assert_close(a.double(), b, rtol=0, atol=0.1)
    for a, b in zip(ours.buffers(), oracle.buffers()):
        torch.testing.assert_close(a.double() if a.is_floating_point() else a, b, rtol=1e-6, atol=1e-7)


def test_the_kernels_build_here():
    """The Makefile installs a compiler and ninja: a failed build must fail the suite, not quietly turn every
    test below into a test of ATen against itself."""
    assert load_kernels()


@pytest.mark.parametrize("name", SHAPES)
def test_the_cpp_autograd_node_records_every_layout(name, compiled_backend):
    shape, fmt = SHAPES[name]
    y = OURS[len(shape)](shape[1])(_input(shape, fmt).requires_grad_(True))
    assert "BatchNormTrain" in y.grad_fn.name()  # the C++ autograd Function, not ATen's NativeBatchNormBackward


def test_the_compiled_op_is_what_runs(compiled_backend, monkeypatch):
    """The backend really routes training calls to the C++ op (a spy on the kernel), and inference to ATen."""
    from bnlab.functional import kernels

    seen = []  # one True per call of the compiled training kernel
    real = kernels.compiled_train
    monkeypatch.setattr("bnlab.functional.norms.compiled_train", lambda *a, **k: seen.append(True) or real(*a, **k))
    layer = bnn.BatchNorm2d(4)
    layer(torch.randn(8, 4, 3, 3))
    layer.eval()(torch.randn(8, 4, 3, 3))
    assert seen == [True]


@pytest.mark.parametrize("convention", ["torch", "keras"])
@pytest.mark.parametrize("name", ["NC", "NCHW", "NCHW-channels-last", "NCDHW-channels-last"])
def test_float64_against_the_numpy_reference(name, convention, compiled_backend):
    shape, fmt = SHAPES[name]
    layer = OURS[len(shape)](shape[1], convention=convention, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, shape[1], dtype=torch.float64))
        layer.bias.copy_(torch.linspace(-1, 1, shape[1], dtype=torch.float64))
    state = reference.RunningStats.initial(shape[1])
    momentum = 0.1 if convention == "torch" else 0.99
    for step in range(2):
        x, up = _input(shape, fmt, torch.float64, step), _input(shape, fmt, torch.float64, 20 + step)
        y, dx, (dw, db) = _train_step(layer, x, up)
        want_y, cache, state = reference.batch_norm_forward(x.numpy(), layer.weight.detach().numpy(),
                                                            layer.bias.detach().numpy(), state, training=True,
                                                            momentum=momentum, eps=layer.eps, convention=convention)
        want_dx, want_dw, want_db = reference.batch_norm_backward(up.numpy(), cache)
        for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw), (db, want_db)):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
        layer.weight.grad = layer.bias.grad = None
    np.testing.assert_allclose(layer.running_mean.numpy(), state.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), state.var, rtol=1e-12, atol=1e-12)


def test_a_non_contiguous_input(compiled_backend):
    x = _input((6, 16, 10), None).transpose(1, 2)[:, ::2]  # (6, 5, 16) with odd strides
    ours, theirs = twin(bnn.BatchNorm1d, nn.BatchNorm1d, 5)
    up = torch.randn(x.shape)
    (y1, dx1, g1), (y2, dx2, g2) = _train_step(ours, x, up), _train_step(theirs, x, up)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(dx1, dx2, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("shape, fmt", [((256, 4), None), ((32, 4, 56, 56), None), ((8, 4, 50, 50), None),
                                        ((32, 4, 56, 56), torch.channels_last)],
                         ids=["rows", "planes", "planes-partial-run", "channels-last"])
@pytest.mark.parametrize("offset", [30.0, 100.0])
def test_a_far_offset_with_an_unusual_first_value_keeps_float32_accuracy(shape, fmt, offset, compiled_backend):
    """The statistics are one pass around a shift K taken from the first values; data far from zero whose
    first value is unlike the rest (a padded corner, a masked value) must not cost digits (it cost 1.5e-2
    with K = the first value alone)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + offset
    if len(shape) == 2:
        x[0, :] = 0.0
    else:
        x[0, :, 0, 0] = 0.0
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    want = nn.functional.batch_norm(x, None, None, training=True)
    layer = OURS[len(shape)](shape[1], affine=False)
    got = layer(x.float())
    assert (got.double() - want).abs().max() < 5e-5
    dims = [0, *range(2, x.dim())]
    torch.testing.assert_close(layer.running_var.double(), 0.9 + 0.1 * x.var(dim=dims), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["NCHW", "large-plane", "NCDHW", "partial-run"])
def test_half_precision_planes_are_the_float32_kernel_rounded_to_nearest_even(name, dtype, compiled_backend):
    """On planes the kernel widens half-precision values to float32 in blocks, runs the float32 arithmetic
    and rounds the results back: so y and dx are exactly the float32 kernel's on the widened values, cast by
    torch (round to nearest even). Odd plane sizes and planes longer than a block cover the tails."""
    assert load_kernels()
    shape, fmt = SHAPES[name]
    x, up = _input(shape, fmt, dtype), _input(shape, fmt, dtype, seed=7)
    weight, bias = torch.linspace(0.5, 1.5, shape[1]), torch.linspace(-1, 1, shape[1])

    def step(x, up):
        x = x.detach().clone().requires_grad_(True)
        y = torch.ops.bnlab.batch_norm_train(x, weight, bias, None, None, 1e-5, 0.1, 1.0)
        y.backward(up)
        return y.detach(), x.grad

    (y_half, dx_half), (y_float, dx_float) = step(x, up), step(x.float(), up.float())
    assert torch.equal(y_half, y_float.to(dtype)) and torch.equal(dx_half, dx_float.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["NC", "NCHW", "NCHW-channels-last"])
def test_half_precision_inputs_with_float32_statistics_are_as_accurate_as_aten(name, dtype, compiled_backend):
    """A bfloat16/float16 input with float32 parameters and buffers (what autocast gives a batch norm): the
    kernel sums in float32; against the float64 oracle its error is no larger than ATen's (plus one
    rounding step of the output dtype), and the running statistics agree with ATen's to float32 round-off."""
    shape, fmt = SHAPES[name]
    x0, up = _input(shape, fmt, dtype), _input(shape, fmt, dtype, seed=7)
    results = {}
    for backend in ("compiled", "aten"):
        BF.set_backend(backend)
        layer = OURS[len(shape)](shape[1])
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            layer.bias.copy_(torch.linspace(-1, 1, shape[1]))
        y, dx, (dw, db) = _train_step(layer, x0, up)
        assert y.dtype == dtype and y.is_contiguous(memory_format=fmt or torch.contiguous_format)
        results[backend] = (y, dx, dw, db, layer.running_mean, layer.running_var)
    x = x0.double().requires_grad_(True)
    w = torch.linspace(0.5, 1.5, shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.linspace(-1, 1, shape[1], dtype=torch.float64, requires_grad=True)
    want = nn.functional.batch_norm(x, None, None, w, b, True)
    want.backward(up.double())
    step = torch.finfo(dtype).eps
    for k, truth in enumerate((want.detach(), x.grad, w.grad, b.grad)):
        ours = (results["compiled"][k].double() - truth).abs().max()
        aten = (results["aten"][k].double() - truth).abs().max()
        assert ours <= aten * 1.5 + step * truth.abs().max(), (k, float(ours), float(aten))
    for k in (4, 5):
        torch.testing.assert_close(results["compiled"][k], results["aten"][k], rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_it_cannot_serve_stay_on_aten_bit_for_bit(compiled_backend):
    x = _input((8, 4, 5, 5), None, torch.bfloat16)
    ours, theirs = bnn.BatchNorm2d(4, dtype=torch.bfloat16), nn.BatchNorm2d(4, dtype=torch.bfloat16)
    assert not backend.compiled_serves(x, ours.weight, ours.bias, ours.running_mean, ours.running_var)
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours.running_var, theirs.running_var)


def test_aten_backend_is_torch_bit_for_bit():
    before = BF.get_backend()
    BF.set_backend("aten")
    try:
        ours, theirs = twin(bnn.BatchNorm2d, nn.BatchNorm2d, 6)
        x, up = _input((8, 6, 7, 5), torch.channels_last), _input((8, 6, 7, 5), torch.channels_last, seed=3)
        (y1, dx1, g1), (y2, dx2, g2) = _train_step(ours, x, up), _train_step(theirs, x, up)
        assert torch.equal(y1, y2) and torch.equal(dx1, dx2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    finally:
        BF.set_backend(before)


def test_auto_follows_the_dispatch_table(monkeypatch):
    from bnlab.functional import dispatch_table

    before = BF.get_backend()
    BF.set_backend("auto")
    try:
        monkeypatch.setattr(dispatch_table, "FASTER", {})
        assert not backend.compiled_serves(torch.randn(8, 4, 5, 5), None, None, None, None)  # empty: ATen
        monkeypatch.setattr(dispatch_table, "FASTER", {("planes_4d", "float32"): ((100, 10**9, 1),)})
        assert backend.compiled_serves(torch.randn(8, 4, 5, 5), None, None, None, None)  # 200 values/channel
        assert not backend.compiled_serves(torch.randn(2, 4, 5, 5), None, None, None, None)  # 50: below
        assert not backend.compiled_serves(torch.randn(8, 4, 5, 5).to(memory_format=torch.channels_last),
                                           None, None, None, None)  # another layout
        assert not backend.compiled_serves(torch.randn(8, 4, 5, 5, dtype=torch.float64), None, None, None, None)
    finally:
        BF.set_backend(before)


def test_without_a_compiler_the_aten_path_is_taken_and_correct(compiled_backend, monkeypatch):
    from bnlab.functional import compiled

    monkeypatch.setitem(compiled._state, "bnlab_kernels", False)  # what a failed build leaves
    ours, theirs = twin(bnn.BatchNorm2d, nn.BatchNorm2d, 3)
    x = _input((4, 3, 5, 5), None)
    assert torch.equal(ours(x), theirs(x))
    assert not backend.compiled_serves(x, None, None, None, None)


def test_bad_backend_names_and_the_environment_switch():
    with pytest.raises(ValueError, match="backend must be one of"):
        BF.set_backend("fast")
    code = "import bnlab.functional as BF; print(BF.get_backend())"
    env = {"BNLAB_COMPILED_KERNELS": "0", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "aten"


def test_functional_call_and_vmap(compiled_backend):
    from torch.func import functional_call, vmap

    layer = bnn.BatchNorm1d(5)
    params = {k: v.clone() for k, v in layer.named_parameters()}
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    x = _input((16, 5), None)
    y = functional_call(layer, {**params, **buffers}, (x,))
    torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, params["weight"], params["bias"], True),
                               rtol=1e-5, atol=2e-5)
    assert not torch.equal(buffers["running_mean"], torch.zeros(5))  # the given buffers were updated
    stacked = _input((3, 16, 5), None)
    out = vmap(lambda t: BF.batch_norm(t, None, None, None, None, True, 0.1, 1e-5))(stacked)
    torch.testing.assert_close(out, torch.stack([nn.functional.batch_norm(t, None, None, training=True)
                                                 for t in stacked]))


@pytest.mark.slow
def test_torch_compile_fullgraph_captures_the_op_in_a_fresh_process():
    """In a fresh process (the kernels not loaded yet when tracing starts): the graph holds bnlab's op,
    and the compiled model's numbers and buffers are eager torch's."""
    code = """
import torch, copy
import bnlab.nn as bnn, bnlab.functional as BF
from torch import nn
BF.set_backend("compiled")
graphs = []
def capture(gm, inputs):
    graphs.append(gm.code)
    return gm
model = nn.Sequential(nn.Conv2d(3, 8, 3), bnn.BatchNorm2d(8), nn.ReLU())
twin = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
twin.load_state_dict(model.state_dict())
x = torch.randn(8, 3, 10, 10)
y = torch.compile(model, backend=capture, fullgraph=True)(x)
assert any("torch.ops.bnlab.batch_norm_train" in g for g in graphs), graphs
torch.testing.assert_close(y, twin(x), rtol=1e-5, atol=2e-5)
torch.testing.assert_close(model[1].running_var, twin[1].running_var)
BF.set_backend("compiled")
m2 = nn.Sequential(nn.Conv2d(3, 8, 3), bnn.BatchNorm2d(8))
t2 = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)); t2.load_state_dict(m2.state_dict())
out = torch.compile(m2, fullgraph=True)(x)
out.sum().backward(); t2(x).sum().backward()
torch.testing.assert_close(m2[0].weight.grad, t2[0].weight.grad, rtol=1e-4, atol=1e-4)
torch.testing.assert_close(m2[1].running_mean, t2[1].running_mean)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_kernels_command_builds_and_reports(capsys, compiled_backend):
    from bnlab.cli.main import main

    assert main(["kernels", "build"]) == 0
    assert "built and loaded" in capsys.readouterr().out
    assert main(["kernels", "status"]) == 0
    out = capsys.readouterr().out
    assert "compiled kernels: built" in out and "backend 'compiled'" in out
    assert "planes_4d      float32  compiled" in out


def test_double_backward_is_a_clear_error_not_a_silent_zero(compiled_backend):
    layer = bnn.BatchNorm1d(4)
    x = _input((16, 4), None).requires_grad_(True)
    y = layer(x).pow(2).sum()
    with pytest.raises(RuntimeError, match="no double backward.*set_backend\\('aten'\\)"):
        torch.autograd.grad(y, x, create_graph=True)  # asked for a differentiable gradient: refused at once
    (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x)  # a plain backward works
    assert torch.isfinite(g).all()


def test_torch_func_grad_over_the_parameters_takes_aten(compiled_backend):
    from torch.func import functional_call, grad

    layer = bnn.BatchNorm1d(4, track_running_stats=False)  # no buffer for the transform to see mutated
    params = {k: v.detach().clone() for k, v in layer.named_parameters()}
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    x = _input((16, 4), None)

    def loss(p):
        return functional_call(layer, {**p, **buffers}, (x,)).pow(2).sum()

    grads = grad(loss)(params)
    w = params["weight"].clone().requires_grad_(True)
    b = params["bias"].clone().requires_grad_(True)
    nn.functional.batch_norm(x, None, None, w, b, True).pow(2).sum().backward()
    torch.testing.assert_close(grads["weight"], w.grad)
    torch.testing.assert_close(grads["bias"], b.grad)
