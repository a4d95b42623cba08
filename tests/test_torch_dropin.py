"""bnlab.nn as a drop-in for torch.nn at the edges deployment tools use (issue 12), torch.nn as the oracle.

TorchScript (script and trace), FX leaves, eager quantization fusion, torch's input checks, meta-device
loading, positional factory arguments and what ``__torch_function__`` modes see: each test runs the
same thing on a torch.nn layer and on its bnlab twin and compares the results bit for bit.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.ao.quantization import fuse_modules, fuse_modules_qat
from torch.overrides import TorchFunctionMode

import bnlab.nn as bnn

# (name, bnlab factory, torch factory, input shape); each pair is built with the same arguments
TWINS = [
    ("BatchNorm1d", lambda m: m.BatchNorm1d(3), (6, 3)),
    ("BatchNorm1d-seq", lambda m: m.BatchNorm1d(3, momentum=None), (4, 3, 5)),
    ("BatchNorm2d", lambda m: m.BatchNorm2d(3), (4, 3, 5, 5)),
    ("BatchNorm2d-no-stats", lambda m: m.BatchNorm2d(3, track_running_stats=False), (4, 3, 2, 2)),
    ("BatchNorm3d", lambda m: m.BatchNorm3d(3, affine=False), (2, 3, 2, 3, 3)),
    ("LayerNorm", lambda m: m.LayerNorm([5, 5]), (4, 3, 5, 5)),
    ("GroupNorm", lambda m: m.GroupNorm(3, 6), (4, 6, 5)),
    ("InstanceNorm1d", lambda m: m.InstanceNorm1d(3, affine=True, track_running_stats=True), (4, 3, 7)),
    ("InstanceNorm2d", lambda m: m.InstanceNorm2d(3), (4, 3, 5, 5)),
    ("InstanceNorm3d", lambda m: m.InstanceNorm3d(3, track_running_stats=True), (2, 3, 2, 3, 3)),
]
IDS = [t[0] for t in TWINS]


def _twins(make):
    """A torch.nn layer with non-trivial parameters, and its bnlab twin with the same state."""
    theirs = make(nn)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    ours = make(bnn)
    ours.load_state_dict(theirs.state_dict())
    assert type(ours).__mro__[1:].count(type(theirs)) == 1 or isinstance(ours, type(theirs))
    return ours, theirs


def _steps(layer, shape, steps=2, seed=1):
    """Outputs and input gradients of a few training steps and one eval step, and the final state."""
    g = torch.Generator().manual_seed(seed)
    results = []
    for training in [True] * steps + [False]:
        layer.train(training)
        x = (torch.randn(shape, generator=g) * 2 + 1).requires_grad_(True)
        y = layer(x)
        y.backward(torch.randn(shape, generator=g))
        results += [y.detach(), x.grad]
    return results + [t.detach().clone() for t in layer.state_dict().values()]


def _assert_identical(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a, b)


# -- TorchScript ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,make,shape", TWINS, ids=IDS)
def test_torchscript_script_matches_torch(name, make, shape):
    ours, theirs = _twins(make)
    scripted = torch.jit.script(ours)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)  # no Python left in the compiled module
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    _assert_identical(_steps(loaded, shape), _steps(theirs, shape))


@pytest.mark.parametrize("name,make,shape", TWINS, ids=IDS)
def test_torchscript_trace_matches_torch(name, make, shape):
    ours, theirs = _twins(make)
    x = torch.randn(shape)  # tracing runs the layer (twice, with its check), so the same input for both
    try:
        traced_theirs = torch.jit.trace(theirs, x)
    except torch.jit.TracingCheckError:  # momentum=None: the factor 1/count is baked in, and torch's check sees it
        with pytest.raises(torch.jit.TracingCheckError):
            torch.jit.trace(ours, x)
        return
    traced_ours = torch.jit.trace(ours, x)
    _assert_identical(_steps(traced_ours, shape), _steps(traced_theirs, shape))


@pytest.mark.parametrize("options", [dict(convention="keras"), dict(skip_nonfinite_update=True),
                                     dict(convention="keras", momentum=None)])
def test_torchscript_keeps_bnlab_features(options):
    eager = bnn.BatchNorm2d(3, **options)
    scripted = torch.jit.script(bnn.BatchNorm2d(3, **options))
    _assert_identical(_steps(scripted, (4, 3, 3, 3), steps=3), _steps(eager, (4, 3, 3, 3), steps=3))
    if options.get("skip_nonfinite_update"):
        before = scripted.running_var.clone()
        scripted.train()(torch.full((4, 3, 3, 3), float("inf")))
        assert torch.equal(scripted.running_var, before)


@pytest.mark.parametrize("make", [lambda: bnn.BatchRenorm2d(3), lambda: bnn.GhostBatchNorm2d(3, virtual_batch_size=2)])
def test_torchscript_variants_run_in_eval_and_refuse_training(make):
    layer = make()
    layer(torch.randn(4, 3, 2, 2) * 3)  # move the running statistics
    layer.eval()
    scripted = torch.jit.script(layer)
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(scripted(x), layer(x))
    scripted.train()
    with pytest.raises(Exception, match="trains only in Python"):
        scripted(x)


def test_torchscript_frozen_batchnorm():
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2) * 3)
    frozen = bnn.freeze_batchnorm(bnn.BatchNorm2d(3))
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(torch.jit.script(frozen)(x), bn.eval()(x))


# -- FX ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,make,shape", TWINS, ids=IDS)
def test_fx_symbolic_trace_keeps_the_layer_as_a_module(name, make, shape):
    ours, theirs = _twins(make)
    graphs = [torch.fx.symbolic_trace(nn.Sequential(nn.Identity(), layer, nn.ReLU())) for layer in (ours, theirs)]
    for graph_module in graphs:
        ops = [(node.op, node.target) for node in graph_module.graph.nodes]
        assert ops == [("placeholder", "input"), ("call_module", "0"), ("call_module", "1"),
                       ("call_module", "2"), ("output", "output")]
    assert graphs[0].get_submodule("1") is ours
    _assert_identical(_steps(graphs[0], shape), _steps(graphs[1], shape))


def test_fx_leaf_marker_does_not_change_the_class():
    layer = bnn.BatchNorm2d(3)
    assert type(layer).__module__ == "bnlab.nn.batchnorm"
    assert layer.__module__.startswith("torch.nn") and "bnlab.nn.batchnorm" in layer.__module__
    import pickle

    copy = pickle.loads(pickle.dumps(layer))
    assert type(copy) is bnn.BatchNorm2d and copy.__module__ == layer.__module__


# -- eager quantization fusion ----------------------------------------------------------------------

FUSIONS = [
    ("conv1d-bn", lambda m: [nn.Conv1d(2, 3, 3), m.BatchNorm1d(3)], (4, 2, 9)),
    ("conv1d-bn-relu", lambda m: [nn.Conv1d(2, 3, 3), m.BatchNorm1d(3), nn.ReLU()], (4, 2, 9)),
    ("conv2d-bn", lambda m: [nn.Conv2d(2, 3, 3), m.BatchNorm2d(3)], (4, 2, 6, 6)),
    ("conv2d-bn-relu", lambda m: [nn.Conv2d(2, 3, 3), m.BatchNorm2d(3), nn.ReLU()], (4, 2, 6, 6)),
    ("conv3d-bn", lambda m: [nn.Conv3d(2, 3, 2), m.BatchNorm3d(3)], (2, 2, 4, 4, 4)),
    ("conv3d-bn-relu", lambda m: [nn.Conv3d(2, 3, 2), m.BatchNorm3d(3), nn.ReLU()], (2, 2, 4, 4, 4)),
    ("linear-bn1d", lambda m: [nn.Linear(4, 3), m.BatchNorm1d(3)], (8, 4)),
    ("bn2d-relu", lambda m: [m.BatchNorm2d(3), nn.ReLU()], (4, 3, 4, 4)),
    ("bn3d-relu", lambda m: [m.BatchNorm3d(3), nn.ReLU()], (2, 3, 2, 3, 3)),
]


def _fusion_twins(make, shape):
    """The same trained Sequential built from torch.nn and from bnlab batch norms."""
    torch.manual_seed(3)
    theirs = nn.Sequential(*make(nn))
    for _ in range(3):
        theirs(torch.randn(shape) * 2 + 1)
    ours = nn.Sequential(*make(bnn))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("name,make,shape", FUSIONS, ids=[f[0] for f in FUSIONS])
def test_fuse_modules_equals_torchs_fusion(name, make, shape):
    ours, theirs = _fusion_twins(make, shape)
    names = [str(i) for i in range(len(ours))]
    fused = [fuse_modules(m.eval(), [names]) for m in (ours, theirs)]
    assert [type(m) for m in fused[0]] == [type(m) for m in fused[1]]
    x = torch.randn(shape)
    assert torch.equal(fused[0](x), fused[1](x))
    assert torch.equal(fused[0](x), ours(x)) or torch.allclose(fused[0](x), ours(x), atol=1e-5)


@pytest.mark.parametrize("name,make,shape", FUSIONS, ids=[f[0] for f in FUSIONS])
def test_fuse_modules_qat_equals_torchs_fusion(name, make, shape):
    ours, theirs = _fusion_twins(make, shape)
    names = [str(i) for i in range(len(ours))]
    fused = [fuse_modules_qat(m.train(), [names]) for m in (ours, theirs)]
    assert [type(m) for m in fused[0]] == [type(m) for m in fused[1]]
    # the bnlab layer itself in torch's container, until prepare_qat rebuilds conv/linear + bn as torch's
    assert any(isinstance(module, bnn.BatchNorm1d | bnn.BatchNorm2d | bnn.BatchNorm3d) for module in fused[0].modules())
    qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    for model in fused:
        model.qconfig = qconfig
        torch.ao.quantization.prepare_qat(model, inplace=True)
    x = torch.randn(shape)
    _assert_identical([fused[0](x), *fused[0].state_dict().values()], [fused[1](x), *fused[1].state_dict().values()])


def test_qat_fusion_refuses_what_torchs_qat_batch_norm_cannot_train():
    for layer in (bnn.BatchNorm2d(3, convention="keras"), bnn.BatchNorm2d(3, skip_nonfinite_update=True),
                  bnn.BatchRenorm2d(3)):
        model = nn.Sequential(nn.Conv2d(2, 3, 3), layer)
        with pytest.raises(ValueError, match="quantization-aware training"):
            fuse_modules_qat(model, [["0", "1"]])
        fuse_modules(model.eval(), [["0", "1"]])  # folding for inference needs only the running statistics


def test_eval_fusion_of_a_keras_convention_layer_folds_its_running_statistics():
    ours = nn.Sequential(nn.Conv2d(2, 3, 3), bnn.BatchNorm2d(3, convention="keras"))
    for _ in range(3):
        ours(torch.randn(4, 2, 5, 5) * 2 + 1)
    theirs = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, eps=1e-3))
    theirs.load_state_dict(ours.state_dict())
    fused = [fuse_modules(m.eval(), [["0", "1"]]) for m in (ours, theirs)]
    x = torch.randn(4, 2, 5, 5)
    assert torch.equal(fused[0](x), fused[1](x))


# -- torch's input checks ---------------------------------------------------------------------------

CHECKS = [
    ("bn-eps-0-training", lambda m: m.BatchNorm2d(3, eps=0.0), (4, 3, 2, 2), True),
    ("bn-eps-negative-eval", lambda m: m.BatchNorm2d(3, eps=-1e-5), (4, 3, 2, 2), False),
    ("bn-one-value", lambda m: m.BatchNorm1d(3), (1, 3), True),
    ("bn-wrong-dims", lambda m: m.BatchNorm2d(3), (4, 3, 2), True),
    ("instance-one-spatial-element", lambda m: m.InstanceNorm1d(3, track_running_stats=True), (4, 3, 1), True),
    ("instance-one-spatial-element-2d", lambda m: m.InstanceNorm2d(3), (4, 3, 1, 1), True),
    ("instance-wrong-dims", lambda m: m.InstanceNorm2d(3), (4, 3), True),
    ("instance-empty-batch", lambda m: m.InstanceNorm2d(3, affine=True), (0, 3, 2, 2), True),
    ("group-one-value-per-group", lambda m: m.GroupNorm(3, 3), (1, 3), True),
    ("group-1d-input", lambda m: m.GroupNorm(1, 3), (3,), True),
    ("group-indivisible", lambda m: m.GroupNorm(2, 3), (4, 3, 2), True),
    ("layer-wrong-shape", lambda m: m.LayerNorm(4), (4, 3), True),
]


@pytest.mark.parametrize("name,make,shape,training", CHECKS, ids=[c[0] for c in CHECKS])
def test_input_checks_raise_what_torch_raises(name, make, shape, training):
    errors = []
    for module in (nn, bnn):
        with pytest.raises(Exception) as error:
            layer = make(module).train(training)
            layer(torch.randn(shape))
        errors.append(error)
    assert type(errors[1].value) is type(errors[0].value)
    assert str(errors[1].value).startswith(str(errors[0].value)), (errors[1].value, errors[0].value)


@pytest.mark.parametrize("name,make,shape", TWINS, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
def test_a_single_value_is_refused_or_accepted_as_torch_does(name, make, shape, training):
    ours, theirs = _twins(make)
    x = torch.randn(1, *shape[1:2], *([1] * (len(shape) - 2))) if name != "LayerNorm" else torch.randn(1, 5, 5)
    try:
        want = theirs.train(training)(x)
    except ValueError as error:
        with pytest.raises(ValueError, match=str(error).split(",")[0]):
            ours.train(training)(x)
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    else:
        _assert_identical([ours.train(training)(x)], [want])


# -- construction and loading ---------------------------------------------------------------------

POSITIONAL = [
    (lambda m: m.BatchNorm2d(3, 1e-4, 0.2, True, True, "cpu", torch.float64)),
    (lambda m: m.BatchNorm1d(3, 1e-4, None, False, True, None, torch.float64)),
    (lambda m: m.InstanceNorm2d(3, 1e-4, 0.2, True, True, "cpu", torch.float64)),
    (lambda m: m.LayerNorm(3, 1e-4, True, False, "cpu", torch.float64)),
    (lambda m: m.GroupNorm(1, 3, 1e-4, True, "cpu", torch.float64)),
]


@pytest.mark.parametrize("make", POSITIONAL)
def test_positional_arguments_as_torch(make):
    ours, theirs = make(bnn), make(nn)
    assert repr(ours) == repr(theirs)
    assert {k: (v.dtype, v.device) for k, v in ours.state_dict().items()} == {
        k: (v.dtype, v.device) for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("cls", [bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d, bnn.BatchRenorm2d,
                                 bnn.GhostBatchNorm2d, bnn.FrozenBatchNorm2d])
def test_meta_init_then_assign_load_without_counter(cls):
    source = nn.BatchNorm2d(3)
    source(torch.randn(4, 3, 2, 2) * 2)
    state = source.state_dict()
    del state["num_batches_tracked"]
    with torch.device("meta"):
        layer = cls(3)
    layer.load_state_dict(state, assign=True)
    layer.to("cpu")
    assert not any(t.is_meta for t in layer.state_dict().values())
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.running_var, source.running_var)


def test_torch_meta_init_with_an_old_checkpoint_as_oracle():
    # torch's own behaviour for a pre-1.2 (version-less) checkpoint: the counter becomes tensor(0)
    state = dict(nn.BatchNorm2d(3).state_dict())
    del state["num_batches_tracked"]
    for module in (nn, bnn):
        with torch.device("meta"):
            layer = module.BatchNorm2d(3)
        layer.load_state_dict(state, assign=True)
        assert layer.num_batches_tracked.device.type == "cpu" and layer.num_batches_tracked.item() == 0


def test_strict_false_still_reports_the_missing_counter():
    state = nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    theirs = nn.BatchNorm2d(3).load_state_dict(state, strict=False)
    ours = bnn.BatchNorm2d(3).load_state_dict(state, strict=False)
    assert ours.missing_keys == theirs.missing_keys == ["num_batches_tracked"]
    bnn.BatchNorm2d(3).load_state_dict(state)  # the deliberate difference: strict loading accepts it
    nested = nn.Sequential(bnn.BatchNorm2d(3)).state_dict()
    del nested["0.num_batches_tracked"]
    assert nn.Sequential(bnn.BatchNorm2d(3)).load_state_dict(nested, strict=False).missing_keys == [
        "0.num_batches_tracked"]


# -- __torch_function__ --------------------------------------------------------------------------------


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,make,shape", TWINS, ids=IDS)
def test_torch_function_modes_see_the_calls_torchs_modules_make(name, make, shape):
    ours, theirs = _twins(make)
    recorded = []
    for layer in (ours, theirs):
        calls = []
        for training in (True, False):
            with _Recorder() as recorder:
                layer.train(training)(torch.randn(shape))
            calls.append(recorder.calls)
        recorded.append(calls)
    assert recorded[0] == recorded[1]
    functional = [f for f in recorded[1][0] if getattr(f, "__module__", "") == "torch.nn.functional"]
    assert functional, recorded[1][0]  # torch's modules do call torch.nn.functional


def test_a_tensor_subclass_overriding_batch_norm_is_honoured():
    class Marked(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.batch_norm:
                return torch.full(args[0].shape, 7.0)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(4, 3).as_subclass(Marked)
    for module in (nn, bnn):
        assert torch.equal(module.BatchNorm1d(3)(x).as_subclass(torch.Tensor), torch.full((4, 3), 7.0))


@pytest.mark.parametrize("kernel", [None, "native", "composite"])
def test_functional_eps_checks_hold_for_every_kernel(kernel):
    import bnlab.functional as BF

    x, rm, rv = torch.randn(4, 3), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        BF.batch_norm(x, rm, rv, training=True, eps=0.0, kernel=kernel)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        BF.batch_norm(x, rm, rv, training=False, eps=-1.0, kernel=kernel)


@pytest.mark.parametrize("name", sorted(bnn.CONVENTIONS))
def test_the_scriptable_convention_rules_are_the_conventions_table(name):
    layer, rules = bnn.BatchNorm1d(3, convention=name), bnn.CONVENTIONS[name]
    assert layer._running_var_correction() == rules.running_var_correction
    assert layer._new_batch_weight(0.3) == (0.3 if rules.momentum_weights_new_batch else 1.0 - 0.3)


def test_fx_optimization_fuse_folds_bnlab_batch_norms_as_torchs():
    from torch.fx.experimental.optimization import fuse

    models = []
    for module in (nn, bnn):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), module.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(3 * 16, 4), module.BatchNorm1d(4))
        for _ in range(2):
            model(torch.randn(8, 2, 6, 6))
        models.append(model.eval())
    models[1].load_state_dict(models[0].state_dict())
    fused = [fuse(m) for m in models]
    assert [type(m) for m in fused[0].children()] == [type(m) for m in fused[1].children()]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused[1].modules())
    x = torch.randn(4, 2, 6, 6)
    assert torch.equal(fused[0](x), fused[1](x))
