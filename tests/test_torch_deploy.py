"""Deployment tools on a small CNN built with bnlab layers, against the same CNN built with torch.nn (issue 12).

torch.export, torch.compile(fullgraph=True), FX graph-mode quantization (prepare_fx / prepare_qat_fx /
convert_fx), eager quantization (prepare / convert) and ONNX export (both exporters, run with ONNX's
reference evaluator): each must give the bnlab model exactly what it gives the torch.nn twin.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, fuse_fx, prepare_fx, prepare_qat_fx

import bnlab.nn as bnn

X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _cnn(m):
    """Every bnlab norm with a torch twin, after a conv or linear (fusable) and on its own."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), m.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3), m.GroupNorm(2, 6), m.InstanceNorm2d(6, affine=True), m.BatchNorm2d(6),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 8), m.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), m.LayerNorm(3),
    )


@pytest.fixture
def twins():
    """The bnlab CNN and its torch.nn twin, with the same trained state."""
    theirs = _cnn(nn)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        theirs(torch.randn(16, 1, 8, 8, generator=g) * 2 + 1)
    ours = _cnn(bnn)
    ours.load_state_dict(theirs.state_dict())
    assert all(type(a).__module__.startswith("bnlab") for a in ours if "Norm" in type(a).__name__)
    return ours, theirs


def _batches(n=3, seed=5, size=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 1, 8, 8, generator=g) for _ in range(n)]


def _same(a, b):
    assert type(a) is type(b) or a is None
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_export(twins, training):
    programs = [torch.export.export(m.train(training), (X,)) for m in twins]
    ops = [[str(n.target) for n in p.graph.nodes if n.op == "call_function"] for p in programs]
    assert ops[0] == ops[1]
    assert "aten.batch_norm.default" in ops[0] or "aten._native_batch_norm_legit_no_training.default" in ops[0]
    modules = [p.module() for p in programs]
    for x in [X, *_batches(2, size=len(X))]:  # exported for this batch size
        _same(modules[0](x), modules[1](x))
    for a, b in zip(modules[0].state_dict().values(), modules[1].state_dict().values(), strict=True):
        _same(a, b)


def test_torch_compile_fullgraph_captures_the_same_graph(twins):
    # dynamo's graph is what every backend compiles: the same graph, the same code. aot_eager runs
    # it with torch's eager kernels, so the results must be identical; inductor (the default) is
    # exercised in test_batchnorm_torch_parity.py::test_under_torch_compile.
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append([(n.op, str(n.target)) for n in graph_module.graph.nodes])
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=torch._dynamo.backends.debugging.boxed_nop)(
            graph_module, example_inputs)

    torch._dynamo.reset()
    compiled = [torch.compile(copy.deepcopy(m), fullgraph=True, backend=recording_backend) for m in twins]
    for training in (True, True, False):
        results = []
        for m in compiled:
            m.train(training)
            x = X.clone().requires_grad_(True)
            y = m(x)
            y.sum().backward()
            results.append([y.detach(), x.grad, *[p.grad for p in m.parameters()], *m.buffers()])
            m.zero_grad()
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(graphs) == 4  # one graph per model and mode, no graph breaks (fullgraph)
    assert graphs[0] == graphs[1] and graphs[2] == graphs[3]


def test_fx_post_training_quantization(twins):
    quantized = []
    for m in twins:
        prepared = prepare_fx(copy.deepcopy(m).eval(), get_default_qconfig_mapping("fbgemm"), (X,))
        for x in _batches():
            prepared(x)
        quantized.append(convert_fx(prepared))
    assert [m._get_name() for m in quantized[0].children()] == [m._get_name() for m in quantized[1].children()]
    assert "QuantizedConvReLU2d" in [m._get_name() for m in quantized[0].children()]  # conv+bn+relu fused
    assert "QuantizedBatchNorm2d" in [m._get_name() for m in quantized[0].children()]  # a lone bn quantized
    _same(quantized[0](X), quantized[1](X))


def test_fx_quantization_aware_training(twins):
    quantized = []
    for m in twins:
        prepared = prepare_qat_fx(copy.deepcopy(m).train(), get_default_qat_qconfig_mapping("fbgemm"), (X,))
        optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
        for x in _batches():
            optimizer.zero_grad()
            prepared(x).square().mean().backward()
            optimizer.step()
        quantized.append(convert_fx(prepared.eval()))
    assert [m._get_name() for m in quantized[0].children()] == [m._get_name() for m in quantized[1].children()]
    _same(quantized[0](X), quantized[1](X))


def test_fx_fuse_keeps_bnlab_semantics_where_torch_keeps_the_batch_norm(twins):
    fused = [fuse_fx(copy.deepcopy(m).eval()) for m in twins]
    assert [type(m).__name__ for m in fused[0].children()] == [type(m).__name__ for m in fused[1].children()]
    _same(fused[0](X), fused[1](X))
    keras = nn.Sequential(nn.Conv2d(1, 4, 3), bnn.BatchNorm2d(4, convention="keras"), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="quantization-aware training"):
        prepare_qat_fx(copy.deepcopy(keras).train(), get_default_qat_qconfig_mapping("fbgemm"), (X,))
    # fusing for inference folds the running statistics, whatever the convention: the same map, rounded
    torch.testing.assert_close(fuse_fx(copy.deepcopy(keras))(X), keras(X), rtol=1e-5, atol=1e-6)


def test_eager_post_training_quantization_of_a_lone_norm():
    quantized = []
    for m in (nn, bnn):
        torch.manual_seed(0)
        model = nn.Sequential(torch.ao.quantization.QuantStub(), m.BatchNorm2d(3), m.LayerNorm([4, 4]),
                              m.InstanceNorm2d(3), m.GroupNorm(3, 3), torch.ao.quantization.DeQuantStub()).eval()
        model.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
        prepared = torch.ao.quantization.prepare(model)
        for x in _batches(2):
            prepared(x.view(32, 2, 4, 4)[:, :1].expand(32, 3, 4, 4).contiguous())
        quantized.append(torch.ao.quantization.convert(prepared))
    assert [type(m) for m in quantized[0]] == [type(m) for m in quantized[1]]
    x = X.expand(5, 3, 8, 8)[:, :, :4, :4].contiguous()
    _same(quantized[0](x), quantized[1](x))


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-exporter", "torchscript-exporter"])
def test_onnx_export(twins, dynamo):
    import onnx  # test dependencies: onnx and onnxscript (the dynamo exporter)
    from onnx.reference import ReferenceEvaluator

    results = []
    for m in twins:
        m = copy.deepcopy(m).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                proto = torch.onnx.export(m, (X,), dynamo=True, verbose=False).model_proto
            else:
                buffer = io.BytesIO()
                torch.onnx.export(m, (X,), buffer, dynamo=False)
                proto = onnx.load_from_string(buffer.getvalue())
        out = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: X.numpy()})[0]
        results.append(([node.op_type for node in proto.graph.node], out))
    assert results[0][0] == results[1][0]
    assert (results[0][1] == results[1][1]).all()
    torch.testing.assert_close(torch.from_numpy(results[0][1]), twins[1].eval()(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [dict(convention="keras"), dict(skip_nonfinite_update=True)],
                         ids=["keras", "skip_nonfinite_update"])
def test_torch_compile_fullgraph_keeps_bnlab_features(options):
    # no torch twin here: the compiled layer must do what the eager one does, in one graph
    torch._dynamo.reset()
    eager = bnn.BatchNorm2d(3, **options)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True, backend="aot_eager")
    batches = _batches(3, size=4)
    batches[1] = torch.full_like(batches[1], float("inf"))  # a poisoned batch in the middle
    for x in batches:
        torch.testing.assert_close(compiled(x.expand(4, 3, 8, 8)), eager(x.expand(4, 3, 8, 8)), rtol=0, atol=0,
                                   equal_nan=True)
    for a, b in zip(compiled.state_dict().values(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(eager.running_var).all() == bool(options.get("skip_nonfinite_update"))
