"""One contract, every bnlab.nn layer class (as Keras' ``run_layer_test``): what any layer must do,
whatever its statistics. Each check is parametrized over ``CASES``; a new layer class joins by one line."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import bnlab.nn as bnn

# (layer class, constructor args, constructor kwargs, an input shape, torch's layer for the same shapes)
CASES = [
    (bnn.BatchNorm1d, (6,), {}, (8, 6), nn.BatchNorm1d),
    (bnn.BatchNorm1d, (6,), {"convention": "keras"}, (8, 6, 5), nn.BatchNorm1d),
    (bnn.BatchNorm2d, (6,), {}, (8, 6, 4, 4), nn.BatchNorm2d),
    (bnn.BatchNorm3d, (6,), {}, (4, 6, 3, 3, 3), nn.BatchNorm3d),
    (bnn.BatchRenorm1d, (6,), {}, (8, 6), nn.BatchNorm1d),
    (bnn.BatchRenorm2d, (6,), {}, (8, 6, 4, 4), nn.BatchNorm2d),
    (bnn.BatchRenorm3d, (6,), {}, (4, 6, 3, 3, 3), nn.BatchNorm3d),
    (bnn.GhostBatchNorm1d, (6,), {"virtual_batch_size": 4}, (8, 6), nn.BatchNorm1d),
    (bnn.GhostBatchNorm2d, (6,), {"virtual_batch_size": 4}, (8, 6, 4, 4), nn.BatchNorm2d),
    (bnn.FrozenBatchNorm1d, (6,), {}, (8, 6), nn.BatchNorm1d),
    (bnn.FrozenBatchNorm2d, (6,), {}, (8, 6, 4, 4), nn.BatchNorm2d),
    (bnn.FrozenBatchNorm3d, (6,), {}, (4, 6, 3, 3, 3), nn.BatchNorm3d),
    (bnn.LayerNorm, ((6,),), {}, (8, 6), nn.LayerNorm),
    (bnn.GroupNorm, (3, 6), {}, (8, 6, 4, 4), nn.GroupNorm),
    (bnn.InstanceNorm1d, (6,), {"affine": True, "track_running_stats": True}, (8, 6, 5), nn.InstanceNorm1d),
    (bnn.InstanceNorm2d, (6,), {"affine": True}, (8, 6, 4, 4), nn.InstanceNorm2d),
    (bnn.InstanceNorm3d, (6,), {}, (4, 6, 3, 3, 3), nn.InstanceNorm3d),
    (bnn.SyncBatchNorm, (6,), {}, (8, 6, 4, 4), nn.BatchNorm2d),  # outside a process group: batch norm
]
IDS = [f"{c[0].__name__}-{len(c[3])}d" + ("-keras" if c[2].get("convention") == "keras" else "") for c in CASES]
BATCH_STATISTICS = (bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d, bnn.BatchRenorm1d, bnn.BatchRenorm2d,
                    bnn.BatchRenorm3d, bnn.GhostBatchNorm1d, bnn.GhostBatchNorm2d, bnn.SyncBatchNorm)


@pytest.fixture(params=["auto", "compiled"], autouse=True)
def backend(request):
    """Every check on both backends of plain batch norm: the default, and bnlab's compiled kernel."""
    import bnlab.functional as BF

    before = BF.get_backend()
    BF.set_backend(request.param)
    yield request.param
    BF.set_backend(before)


def test_every_public_layer_class_has_a_case():
    public = {getattr(bnn, name) for name in bnn.__all__
              if isinstance(getattr(bnn, name), type) and issubclass(getattr(bnn, name), nn.Module)}
    assert public == {c[0] for c in CASES}


def _built(case, seed=0):
    cls, args, kwargs, shape, _ = case
    torch.manual_seed(seed)
    layer = cls(*args, **kwargs)
    with torch.no_grad():  # non-trivial parameters and statistics, so a dropped one shows
        for name, p in layer.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name == "weight" else torch.randn_like(p) * 0.5)
        for name, b in layer.named_buffers():
            if name == "running_mean" or name.endswith("bias") and b.is_floating_point():
                b.copy_(torch.randn_like(b))
            elif name == "running_var" or name.endswith("weight") and b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)
    return layer


def _input(case, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(case[3], generator=g) * 2 + 0.7).to(dtype)


def _tracks_statistics(layer) -> bool:
    return isinstance(layer, BATCH_STATISTICS) or getattr(layer, "track_running_stats", False) and isinstance(
        layer, (bnn.InstanceNorm1d, bnn.InstanceNorm2d, bnn.InstanceNorm3d))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_round_trip(case):
    trained = _built(case)
    trained.train()
    for seed in range(3):
        trained(_input(case, seed))
    fresh = case[0](*case[1], **case[2])
    fresh.load_state_dict(trained.state_dict())  # strict
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    x = _input(case, 9)
    for mode in (False, True):
        trained.train(mode), fresh.train(mode)
        torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_and_eval(case):
    layer = _built(case)
    x = _input(case)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    layer.eval()
    batched = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-5)  # eval: no sample depends on another
    for name, b in layer.named_buffers():
        assert torch.equal(b, before[name]), f"{name} moved in eval mode"
    layer.train()
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    moved = any(not torch.equal(b, before[n]) for n, b in layer.named_buffers() if n != "num_batches_tracked")
    assert moved == _tracks_statistics(layer), "running statistics move in training mode exactly when tracked"
    if isinstance(layer, BATCH_STATISTICS):  # training mode: a sample's output depends on its batch
        # (x[2:6] puts sample 2 among other samples, in a different ghost batch too)
        assert not torch.allclose(layer(x[2:6])[0], y[2], atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_matches_float32_and_keeps_its_dtype(case):
    for mode in (True, False):
        single, double = _built(case).train(mode), _built(case).double().train(mode)
        x = _input(case)
        out = double(x.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out.float(), single(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [c for c in CASES if len(c[3]) in (4, 5)], ids=[i for c, i in zip(CASES, IDS)
                                                                               if len(c[3]) in (4, 5)])
def test_channels_last_input_gives_the_same_values(case):
    fmt = torch.channels_last if len(case[3]) == 4 else torch.channels_last_3d
    x = _input(case)
    for mode in (True, False):
        contiguous, strided = _built(case).train(mode), _built(case).train(mode)
        torch.testing.assert_close(strided(x.to(memory_format=fmt)), contiguous(x), rtol=1e-5, atol=1e-5)
        for (name, a), (_, b) in zip(contiguous.named_buffers(), strided.named_buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_empty_batch_behaves_as_torchs_layer(case, training):
    ours = _built(case).train(training)
    theirs = case[4](*case[1], **{k: v for k, v in case[2].items() if k not in ("convention", "virtual_batch_size")})
    theirs.train(training and not isinstance(ours, (bnn.FrozenBatchNorm1d, bnn.FrozenBatchNorm2d,
                                                     bnn.FrozenBatchNorm3d)))
    empty = torch.empty((0, *case[3][1:]))
    outcomes = []
    for layer in (ours, theirs):
        try:
            outcomes.append(("output", tuple(layer(empty).shape)))
        except (RuntimeError, ValueError, IndexError) as exc:
            outcomes.append(("raises", type(exc).__name__))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pickle_and_deepcopy(case):
    layer = _built(case)
    layer.train()
    layer(_input(case, 3))
    snapshot = copy.deepcopy(layer.state_dict())

    def reference():  # the same state, rebuilt through the constructor (a training step moves renorm's output)
        fresh = case[0](*case[1], **case[2])
        fresh.load_state_dict(snapshot)
        return fresh

    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    x = _input(case, 4)
    for mode in (False, True):
        for other in (torch.load(io.BytesIO(buffer.getvalue()), weights_only=False), copy.deepcopy(layer)):
            expected = reference().train(mode)
            torch.testing.assert_close(other.train(mode)(x), expected(x), rtol=0, atol=0)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded) is type(layer) and repr(loaded) == repr(layer)
    clone = copy.deepcopy(layer)
    with torch.no_grad():  # a deep copy owns its tensors
        for t in list(clone.parameters()) + [b for b in clone.buffers() if b.is_floating_point()]:
            t.add_(1.0)
    for (name, a), (_, b) in zip(layer.state_dict().items(), clone.state_dict().items()):
        if a.is_floating_point():
            assert not torch.equal(a, b), f"{name} is shared with the copy"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_repr_names_the_class_and_its_size(case):
    text = repr(_built(case))
    assert text.startswith(case[0].__name__ + "(") and "6" in text


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_compile_gives_eager_numbers(case):
    torch._dynamo.reset()
    eager, compiled_layer = _built(case), _built(case)
    compiled = torch.compile(compiled_layer)
    x = _input(case)
    for mode in (True, False):
        eager.train(mode), compiled_layer.train(mode)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled_layer.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
