"""Model builders, K-model stacking, and the engine: equivalence, determinism, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.models import PRESETS, ModelSpec, StackedModel, build_model
from bnlab.train import StackedTrainer, StopRequested, TrainConfig, prepare_data
from fakes import fake_dataset

TINY_MLP = ModelSpec(hidden=(32, 16), norm="batch")
TINY_CNN = ModelSpec(arch="cnn", conv_channels=(4, 6), hidden=(12,), norm="batch")
CFG = TrainConfig(lr=0.05, momentum=0.9, batch_size=32, epochs=2, eval_every=10, checkpoint_every=7)


def _layer_types(model):
    return [type(m).__name__ for m in model]


def test_placement_dropout_and_bias_options():
    before = build_model(ModelSpec(hidden=(8,), norm="batch", dropout=0.2, bias_before_norm=False))
    assert _layer_types(before) == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert before[1].bias is None and before[-1].bias is not None
    after = build_model(ModelSpec(hidden=(8,), norm="batch", placement="after", dropout=0.2,
                                  dropout_position="before_norm"))
    assert _layer_types(after) == ["Flatten", "Linear", "ReLU", "Dropout", "BatchNorm1d", "Linear"]
    assert after[1].bias is not None  # a bias before an activation is not redundant
    plain = build_model(ModelSpec(hidden=(8,), activation="tanh"))
    assert _layer_types(plain) == ["Flatten", "Linear", "Tanh", "Linear"]
    out = build_model(ModelSpec(hidden=(8,), norm="batch", norm_output=True))
    assert isinstance(out[-1], bnn.BatchNorm1d) and out[-1].num_features == 10


def test_keras_convention_and_glorot_init():
    model = build_model(ModelSpec(hidden=(64,), norm="batch", norm_convention="keras", init="glorot"), seed=0)
    bn = model[2]
    assert bn.convention == "keras" and bn.momentum == 0.99 and bn.eps == 1e-3
    limit = (6 / (784 + 64)) ** 0.5
    assert model[1].weight.abs().max() <= limit and model[1].bias.abs().max() == 0


def test_normal_init_scale():
    model = build_model(ModelSpec(hidden=(256,), init="normal", init_scale=0.5), seed=0)
    assert abs(model[1].weight.std().item() - 0.5) < 0.01


@pytest.mark.parametrize("bad", [{"activation": "gelu"}, {"norm": "weird"}, {"placement": "middle"},
                                 {"dropout": 1.0}, {"arch": "cnn"}, {"hidden": (0,)}])
def test_spec_validation(bad):
    with pytest.raises(ValueError):
        ModelSpec(**bad)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_runs(name):
    preset = PRESETS[name]
    for norm in ("none", "batch"):
        spec = ModelSpec.from_dict(preset["model"]).with_(norm=norm)
        model = build_model(spec, seed=0)
        shape = (4, 784) if spec.arch == "mlp" else (4, 1, 28, 28)
        assert model(torch.randn(shape)).shape == (4, 10)
    TrainConfig.from_dict(preset["train"])  # the recipe is valid


def test_spec_roundtrips_through_dict():
    spec = TINY_CNN.with_(dropout=0.1)
    assert ModelSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("spec", [TINY_MLP, TINY_CNN, TINY_MLP.with_(placement="after", norm_output=True),
                                  TINY_MLP.with_(norm="none", activation="sigmoid")])
def test_stacked_forward_equals_separate_models(spec):
    models = [build_model(spec, seed=s) for s in (3, 4, 5)]
    separate = [build_model(spec, seed=s) for s in (3, 4, 5)]
    stacked = StackedModel(models)
    x = torch.randn(8, 1, 28, 28)
    out = stacked(x)
    for k, model in enumerate(separate):
        torch.testing.assert_close(out[:, k], model(x), rtol=1e-5, atol=1e-5)
    stacked.write_back()
    for a, b in zip(models, separate):  # running statistics updated exactly as separately
        for (name, t1), t2 in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-6, msg=name)


def test_stacking_refuses_different_architectures():
    with pytest.raises(TypeError, match="differ in architecture"):
        StackedModel([build_model(TINY_MLP), build_model(TINY_MLP.with_(norm="none"))])


@pytest.mark.parametrize("spec,optimizer", [(TINY_MLP, "sgd"), (TINY_CNN, "adam"), (TINY_MLP.with_(norm_convention="keras"), "adam")])
def test_model_k_of_a_stacked_run_matches_a_single_run_of_seed_k(spec, optimizer):
    data = prepare_data(fake_dataset(), CFG, spec)
    cfg = CFG.with_(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3, epochs=1)
    stacked = StackedTrainer(spec, cfg, [0, 1, 2], data)
    single = StackedTrainer(spec, cfg, [1], data)
    for _ in range(stacked.total_steps):
        stacked.train_step(), single.train_step()
    fused_models = stacked.write_back()
    (alone,) = single.write_back()
    # A bias feeding a batch norm has an exactly zero gradient (the mean subtraction cancels
    # it); in float32 that gradient is round-off (~1e-8), and Adam's m/sqrt(v) turns round-off
    # into lr-sized steps, so such biases random-walk differently in any two runs whose
    # summation order differs; the norm's running mean follows them. Neither changes the
    # function, which is checked below.
    feeds_norm = [i for i in range(len(alone) - 1) if isinstance(alone[i + 1], nn.modules.batchnorm._BatchNorm)]
    noise_only = {f"{i}.bias" for i in feeds_norm} | {f"{i + 1}.running_mean" for i in feeds_norm}
    for (name, a), b in zip(fused_models[1].state_dict().items(), alone.state_dict().values()):
        if optimizer == "adam" and name in noise_only:
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    loss_k, acc_k = stacked.evaluate(data.test_x, data.test_y)
    loss_1, acc_1 = single.evaluate(data.test_x, data.test_y)
    # In eval mode the drift leaks in slightly: the running mean averages past bias values.
    rtol = 2e-3 if optimizer == "adam" else 1e-4
    torch.testing.assert_close(loss_k[1], loss_1[0], rtol=rtol, atol=1e-5)


def test_batches_cover_each_epoch_once_and_are_deterministic():
    data = prepare_data(fake_dataset(n_train=100), CFG, TINY_MLP)
    trainer = StackedTrainer(TINY_MLP, CFG.with_(batch_size=32), [0], data)
    epoch = torch.cat([trainer.batch_indices(s) for s in range(trainer.steps_per_epoch)])
    assert sorted(epoch.tolist()) == list(range(100))  # last batch has 4: covered exactly once
    other = StackedTrainer(TINY_MLP, CFG.with_(batch_size=32), [5], data)
    assert torch.equal(other.batch_indices(3), trainer.batch_indices(3))  # all models see the same batches
    assert not torch.equal(trainer.batch_indices(0), trainer.batch_indices(trainer.steps_per_epoch))


def test_a_last_batch_of_one_is_never_used():
    data = prepare_data(fake_dataset(n_train=65), CFG, TINY_MLP)
    trainer = StackedTrainer(TINY_MLP, CFG.with_(batch_size=32), [0], data)
    assert len(trainer.batch_indices(2)) == 2  # 65 = 32 + 32 + 1


def test_training_learns_and_is_reproducible():
    spec = TINY_MLP.with_(dropout=0.1)
    data = prepare_data(fake_dataset(), CFG, spec)
    runs = []
    for _ in range(2):
        trainer = StackedTrainer(spec, CFG, [0, 1], data)
        log = []
        trainer.run(on_eval=lambda step, m: log.append((step, m["test_acc"].clone())))
        runs.append(log)
    assert [s for s, _ in runs[0]] == [s for s, _ in runs[1]]
    for (_, a), (_, b) in zip(*runs):
        assert torch.equal(a, b)
    assert runs[0][-1][1].min() > 0.9  # the fake task is learnable


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    spec = TINY_MLP.with_(dropout=0.1)
    data = prepare_data(fake_dataset(), CFG, spec)
    straight = StackedTrainer(spec, CFG, [0, 1], data)
    straight_log = []
    straight.run(on_eval=lambda s, m: straight_log.append((s, m["test_loss"].clone())))

    class StopAt13:
        @property
        def requested(self):
            return first.step == 13

    first = StackedTrainer(spec, CFG, [0, 1], data)
    log = []
    with pytest.raises(StopRequested, match="step 13"):
        first.run(on_eval=lambda s, m: log.append((s, m["test_loss"].clone())),
                  on_checkpoint=lambda s: first.save_checkpoint(tmp_path / "ckpt.pt"), stop_flag=StopAt13())
    torch.manual_seed(1234)  # a resumed process starts with another global RNG state
    second = StackedTrainer(spec, CFG, [0, 1], data)
    second.load_checkpoint(tmp_path / "ckpt.pt")
    assert second.step == 13
    second.run(on_eval=lambda s, m: log.append((s, m["test_loss"].clone())))
    assert [s for s, _ in log] == [s for s, _ in straight_log]
    for (_, a), (_, b) in zip(log, straight_log):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_autocast_runs_and_learns():
    data = prepare_data(fake_dataset(), CFG, TINY_MLP)
    trainer = StackedTrainer(TINY_MLP, CFG.with_(bf16=True), [0], data)
    trainer.run()
    _, acc = trainer.evaluate(data.test_x, data.test_y)
    assert acc.item() > 0.9


@pytest.mark.parametrize("bad", [dict(epochs=None), dict(epochs=1, steps=5), dict(batch_size=1), dict(lr=0),
                                 dict(optimizer="lbfgs"), dict(dataset="cifar")])
def test_train_config_validation(bad):
    with pytest.raises(ValueError):
        TrainConfig(**{"epochs": 1, **bad})


@pytest.mark.parametrize("kind", ["layer", "group", "renorm", "ghost", "frozen", "instance"])
def test_every_norm_kind_builds_stacks_and_trains(kind):
    arch = "cnn" if kind == "instance" else "mlp"
    spec = ModelSpec(arch=arch, hidden=(16,), conv_channels=(4,) if arch == "cnn" else (), norm=kind,
                     virtual_batch_size=8, norm_groups=2)
    separate = [build_model(spec, seed=s) for s in (0, 1)]
    stacked = StackedModel([build_model(spec, seed=s) for s in (0, 1)])
    x = torch.randn(16, 1, 28, 28)
    out = stacked(x)
    for k, model in enumerate(separate):
        torch.testing.assert_close(out[:, k], model(x), rtol=1e-5, atol=1e-5)
    data = prepare_data(fake_dataset(n_train=256), CFG, spec)
    trainer = StackedTrainer(spec, CFG.with_(epochs=2), [0, 1], data)
    trainer.run()
    _, acc = trainer.evaluate(data.test_x, data.test_y)
    assert acc.min() > 0.5 or kind == "frozen"  # frozen BN has nothing to learn in the norm itself


def test_bias_before_a_mean_subtracting_norm_is_dropped_only_when_asked():
    for kind in ("batch", "layer", "group", "renorm", "ghost"):
        model = build_model(ModelSpec(hidden=(8,), norm=kind, bias_before_norm=False, virtual_batch_size=4))
        assert model[1].bias is None, kind
    frozen = build_model(ModelSpec(hidden=(8,), norm="frozen", bias_before_norm=False))
    assert frozen[1].bias is not None  # frozen BN subtracts a constant, not the batch mean


def test_gradient_accumulation_without_norm_equals_the_full_batch():
    spec = TINY_MLP.with_(norm="none")
    data = prepare_data(fake_dataset(n_train=128), CFG, spec)
    full = StackedTrainer(spec, CFG.with_(epochs=1), [0], data)
    accumulated = StackedTrainer(spec, CFG.with_(epochs=1, accumulate=4), [0], data)
    for _ in range(full.total_steps):
        torch.testing.assert_close(full.train_step(), accumulated.train_step(), rtol=1e-5, atol=1e-6)
    for a, b in zip(full.model.state_dict().values(), accumulated.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_with_batch_norm_sees_micro_batches():
    data = prepare_data(fake_dataset(n_train=128), CFG, TINY_MLP)
    full = StackedTrainer(TINY_MLP, CFG.with_(epochs=1), [0], data)
    accumulated = StackedTrainer(TINY_MLP, CFG.with_(epochs=1, accumulate=4), [0], data)
    full.train_step(), accumulated.train_step()
    bn_full, bn_acc = full.model.layers[2], accumulated.model.layers[2]
    assert bn_full.num_batches_tracked.item() == 1 and bn_acc.num_batches_tracked.item() == 4
    assert not torch.allclose(full.model.layers[1].weight, accumulated.model.layers[1].weight)
    with pytest.raises(ValueError, match="divide batch_size"):
        CFG.with_(accumulate=5)


def test_drop_last_skips_the_incomplete_batch():
    data = prepare_data(fake_dataset(n_train=100), CFG, TINY_MLP)
    trainer = StackedTrainer(TINY_MLP, CFG.with_(batch_size=32, drop_last=True), [0], data)
    assert trainer.steps_per_epoch == 3
    assert all(len(trainer.batch_indices(s)) == 32 for s in range(3))
    ghost = ModelSpec(hidden=(8,), norm="ghost", virtual_batch_size=16)
    StackedTrainer(ghost, CFG.with_(batch_size=32, drop_last=True), [0], data).run()  # 100 % 32 != 0 is fine now
