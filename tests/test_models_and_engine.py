"""Model builders, K-model stacking, and the engine: equivalence, determinism, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.models import PRESETS, ModelSpec, StackedModel, build_model
from bnlab.models.fused import StackedConv2d, StackedLinear, StackedNorm
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


@pytest.mark.parametrize("spec,optimizer,order", [(TINY_MLP, "sgd", "per_seed"), (TINY_CNN, "adam", "per_seed"),
                                                  (TINY_MLP.with_(norm_convention="keras"), "adam", "per_seed"),
                                                  (TINY_MLP, "sgd", "shared"), (TINY_CNN, "sgd", "shared")])
def test_model_k_of_a_stacked_run_matches_a_single_run_of_seed_k(spec, optimizer, order):
    """Initialization and, with per-seed data order, the batches: model k is the run of seed k."""
    data = prepare_data(fake_dataset(), CFG, spec)
    cfg = CFG.with_(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3, epochs=1, data_order=order)
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


def test_batches_cover_each_epoch_once_and_each_seed_has_its_own_order():
    data = prepare_data(fake_dataset(n_train=100), CFG, TINY_MLP)
    cfg = CFG.with_(batch_size=32)
    trainer = StackedTrainer(TINY_MLP, cfg, [0], data)
    epoch = torch.cat([trainer.batch_indices(s) for s in range(trainer.steps_per_epoch)], dim=1)
    assert sorted(epoch[0].tolist()) == list(range(100))  # last batch has 4: covered exactly once
    assert not torch.equal(trainer.batch_indices(0), trainer.batch_indices(trainer.steps_per_epoch))
    other = StackedTrainer(TINY_MLP, cfg, [5], data)
    assert not torch.equal(other.batch_indices(3), trainer.batch_indices(3))  # a seed is a whole seed
    stacked = StackedTrainer(TINY_MLP, cfg, [0, 5], data)
    for step in (0, 3, 4):  # model k's batches are those of seed k alone, whatever it is stacked with
        assert torch.equal(stacked.batch_indices(step), torch.cat([trainer.batch_indices(step),
                                                                   other.batch_indices(step)]))
    # the legacy order: one permutation for every model
    shared = [StackedTrainer(TINY_MLP, cfg.with_(data_order="shared"), seeds, data) for seeds in ([0], [5], [0, 5])]
    assert shared[2].batch_indices(2).shape == (1, 32)
    assert torch.equal(shared[0].batch_indices(3), shared[1].batch_indices(3))


def test_a_last_batch_of_one_is_never_used():
    data = prepare_data(fake_dataset(n_train=65), CFG, TINY_MLP)
    trainer = StackedTrainer(TINY_MLP, CFG.with_(batch_size=32), [0, 1], data)
    assert trainer.batch_indices(2).shape == (2, 2)  # 65 = 32 + 32 + 1


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
    assert all(trainer.batch_indices(s).shape[1] == 32 for s in range(3))
    ghost = ModelSpec(hidden=(8,), norm="ghost", virtual_batch_size=16)
    StackedTrainer(ghost, CFG.with_(batch_size=32, drop_last=True), [0], data).run()  # 100 % 32 != 0 is fine now


# -- bf16 with float32 master weights -----------------------------------------------------------


def _trained(spec, cfg, seeds, data, steps):
    trainer = StackedTrainer(spec, cfg, seeds, data)
    for _ in range(steps):
        trainer.train_step()
    return trainer


def _autocast_trainer(spec, cfg, seeds, data, monkeypatch):
    """The same trainer on plain autocast with torch's fused optimizer: the oracle for master weights."""
    import bnlab.train.engine as engine

    with monkeypatch.context() as m:
        m.setattr(engine, "master_weight_kernels_available", lambda: False)
        return StackedTrainer(spec, cfg, seeds, data)


# No bias in front of the CNN's norms: with Adam such a bias random-walks on float32 round-off (see
# the stacked-vs-single test), and in bf16 its walk moves the roundings of the conv output, so the
# two runs drift apart for a reason that has nothing to do with the master weights.
@pytest.mark.parametrize("spec,optimizer", [(TINY_MLP, "sgd"), (TINY_CNN.with_(bias_before_norm=False), "adam"),
                                            (TINY_MLP.with_(norm="none"), "sgd")])
def test_master_weight_bf16_equals_autocast(spec, optimizer, monkeypatch):
    # Oracle: the same stacked run under plain autocast with torch's fused optimizer. The
    # master-weight path computes the same numbers with fewer passes, so the float32 weights
    # agree to round-off of the optimizer arithmetic.
    from bnlab.train.mixed_precision import MasterWeightOptimizer

    data = prepare_data(fake_dataset(), CFG, spec)
    cfg = CFG.with_(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3, epochs=1, bf16=True,
                    weight_decay=1e-3)
    fast = StackedTrainer(spec, cfg, [0, 1], data)
    assert isinstance(fast.optimizer, MasterWeightOptimizer)
    reference = _autocast_trainer(spec, cfg, [0, 1], data, monkeypatch)
    assert isinstance(reference.optimizer, torch.optim.Optimizer)
    for step in range(25):
        loss_fast, loss_ref = fast.train_step(), reference.train_step()
        torch.testing.assert_close(loss_fast, loss_ref, rtol=2e-3, atol=2e-3)
        if step == 2:
            # Early on the two agree to float32 round-off. (On this machine SGD agrees bit for bit
            # throughout; a one-ulp difference, e.g. from another CPU's torch kernel, later flips bf16
            # roundings of the shadows and grows, which the looser check below allows.)
            for (name, a), b in zip(fast.model.state_dict().items(), reference.model.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(fast.model.state_dict().items(), reference.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=5e-3, msg=name)
    # the shadows are the float32 weights rounded to bf16, as autocast would cast them
    for master, shadow in fast.optimizer.pairs:
        assert torch.equal(shadow, master.detach().to(torch.bfloat16))
    # and the optimizer state has torch's own layout, so checkpoints mix freely
    assert fast.optimizer.state_dict()["state"].keys() == reference.optimizer.state_dict()["state"].keys()


def test_master_weight_sgd_step_matches_torch_on_one_tensor():
    # Hand-made oracle for the kernel alone: torch's fused SGD on the float32 weight with the
    # widened bf16 gradient; then the shadow must be that weight's bf16 rounding.
    from bnlab.train.mixed_precision import master_weight_kernels_available

    assert master_weight_kernels_available()
    torch.manual_seed(0)
    master = torch.randn(1000)
    grad16 = torch.randn(1000).to(torch.bfloat16)
    ref = master.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01, fused=True)
    buf = torch.empty(1000)
    shadow = torch.empty(1000, dtype=torch.bfloat16)
    for step in range(3):
        ref.grad = grad16.float()
        opt.step()
        torch.ops.bnlab_train.sgd_master_step(master, buf, grad16, shadow, 0.1, 0.9, 0.01, step == 0)
        torch.testing.assert_close(master, ref.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(buf, opt.state[ref]["momentum_buffer"], rtol=1e-6, atol=1e-7)
        assert torch.equal(shadow, master.to(torch.bfloat16))  # torch's own rounding
    special = torch.tensor([float("nan"), float("inf"), -0.0, 1.00390625, 3.3895e38])
    torch.ops.bnlab_train.sgd_master_step(special, None, torch.zeros(5, dtype=torch.bfloat16), shadow[:5], 0.0, 0.0,
                                          0.0, True)
    torch.testing.assert_close(shadow[:5], special.to(torch.bfloat16), equal_nan=True, rtol=0, atol=0)


def test_master_weight_resume_equals_an_uninterrupted_run(tmp_path):
    data = prepare_data(fake_dataset(), CFG, TINY_MLP)
    cfg = CFG.with_(bf16=True, epochs=1)
    straight = _trained(TINY_MLP, cfg, [0, 1], data, 12)
    first = _trained(TINY_MLP, cfg, [0, 1], data, 6)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    second = StackedTrainer(TINY_MLP, cfg, [0, 1], data)
    second.load_checkpoint(tmp_path / "ckpt.pt")  # the shadows must follow the loaded weights
    for _ in range(6):
        second.train_step()
    for a, b in zip(second.model.state_dict().values(), straight.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_probes_and_accumulation_keep_plain_autocast():
    from bnlab.train.mixed_precision import MasterWeightOptimizer

    data = prepare_data(fake_dataset(), CFG, TINY_MLP)
    trainer = StackedTrainer(TINY_MLP, CFG.with_(bf16=True), [0, 1], data, probes=(lambda trainer: {},))
    assert not isinstance(trainer.optimizer, MasterWeightOptimizer)
    trainer = StackedTrainer(TINY_MLP, CFG.with_(bf16=True, accumulate=2), [0, 1], data)
    assert not isinstance(trainer.optimizer, MasterWeightOptimizer)
    assert isinstance(StackedTrainer(TINY_MLP, CFG.with_(bf16=True), [0, 1], data).optimizer, MasterWeightOptimizer)


def test_master_weight_adam_step_matches_torch_on_one_tensor():
    from bnlab.train.mixed_precision import master_weight_kernels_available

    assert master_weight_kernels_available()
    torch.manual_seed(1)
    master = torch.randn(5003)
    ref = master.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=3e-3, weight_decay=0.01, fused=True)
    m, v = torch.zeros_like(master), torch.zeros_like(master)
    shadow = torch.empty(5003, dtype=torch.bfloat16)
    for step in range(1, 6):
        grad16 = torch.randn(5003).to(torch.bfloat16)
        ref.grad = grad16.float()
        opt.step()
        torch.ops.bnlab_train.adam_master_step(master, m, v, grad16, shadow, 3e-3, 0.9, 0.999, 1e-8, 0.01, step)
        torch.testing.assert_close(master, ref.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m, opt.state[ref]["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=1e-9)
        assert torch.equal(shadow, master.to(torch.bfloat16))


def test_master_weight_shadows_follow_weights_loaded_behind_the_optimizers_back(monkeypatch):
    # model.load_state_dict bypasses the optimizer; the next step must compute with the loaded
    # weights, exactly as plain autocast would.
    data = prepare_data(fake_dataset(), CFG, TINY_MLP)
    cfg = CFG.with_(bf16=True, epochs=1)
    donor = _trained(TINY_MLP, cfg, [5, 6], data, 4)
    state = {k: v.clone() for k, v in donor.model.state_dict().items()}
    fast = _trained(TINY_MLP, cfg, [0, 1], data, 1)
    reference = _autocast_trainer(TINY_MLP, cfg, [0, 1], data, monkeypatch)
    reference.train_step()
    for trainer in (fast, reference):
        trainer.model.load_state_dict(state)
        trainer.train_step()
    for a, b in zip(fast.model.state_dict().values(), reference.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_master_weight_reset_optimizer_and_plain_training_forwards():
    from bnlab.nn import freeze_batchnorm
    from bnlab.train.mixed_precision import MasterWeightOptimizer

    data = prepare_data(fake_dataset(), CFG, TINY_MLP)
    trainer = StackedTrainer(TINY_MLP, CFG.with_(bf16=True, epochs=1), [0, 1], data)
    trainer.train_step()
    trainer.model.train()
    trainer.model(data.train_x[:8])  # a training-mode forward outside autocast uses the float32 weights
    freeze_batchnorm(trainer.model)
    trainer.reset_optimizer()
    assert isinstance(trainer.optimizer, MasterWeightOptimizer)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step()
    moved = [not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters())]
    assert all(moved)  # the stacked weights (through their shadows) and the biases all train


def test_master_weights_refuse_optimizers_they_do_not_implement():
    from bnlab.train.mixed_precision import MasterWeightOptimizer

    layer = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="AdamW"):
        MasterWeightOptimizer(torch.optim.AdamW(layer.parameters()), [])
    with pytest.raises(ValueError, match="nesterov"):
        MasterWeightOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, nesterov=True), [])


def test_evaluation_reuses_the_first_layer_copy_only_inside_one_evaluation():
    """A per-model first layer evaluated on a shared batch makes its wide weight copy once per
    evaluation; after the block, a weight change (an optimizer step) or a swapped-in weight
    (functional_call) must not meet a stale copy."""
    spec = TINY_MLP
    stacked = StackedModel([build_model(spec, seed=s) for s in (0, 1)], shared_input=False).eval()
    separate = [build_model(spec, seed=s).eval() for s in (0, 1)]
    x = torch.randn(6, 784)
    with torch.no_grad():
        with stacked.reusing_weights():
            first = stacked(x[:3]).clone()
            assert stacked.layers[1]._wide_cache  # made once for the block
            first = torch.cat([first, stacked(x[3:])])
        assert stacked.layers[1]._wide_cache is None
        for k, model in enumerate(separate):
            torch.testing.assert_close(first[:, k], model(x), rtol=1e-5, atol=1e-5)
        stacked.layers[1].weight.mul_(2.0)
        separate[0][1].weight.mul_(2.0)
        with stacked.reusing_weights():
            second = stacked(x)
        torch.testing.assert_close(second[:, 0], separate[0](x), rtol=1e-5, atol=1e-5)
        swapped = {n: p * 0.5 for n, p in stacked.named_parameters()}
        third = torch.func.functional_call(stacked, {**swapped, **dict(stacked.named_buffers())}, (x,))
    assert not torch.allclose(second, third)


# -- the inference copy: batch norm folded, weights cast once ------------------------------------

def _randomize_norm_state(model: nn.Module, seed: int) -> None:
    """Running statistics and affine far from their initial values, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.2)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, bnn.FrozenBatchNorm1d,
                              bnn.FrozenBatchNorm2d)) and m.weight is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


FOLDABLE = {"batch", "renorm", "ghost", "frozen"}


def _norm_layers(model: StackedModel) -> int:
    norm_types = (StackedNorm, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, bnn.FrozenBatchNorm1d,
                  bnn.FrozenBatchNorm2d)
    return sum(isinstance(layer, norm_types) for layer in model.layers)


@pytest.mark.parametrize("spec", [
    TINY_MLP, TINY_MLP.with_(norm_convention="keras"), TINY_MLP.with_(norm="renorm"),
    TINY_MLP.with_(norm="ghost"), TINY_MLP.with_(norm="frozen"), TINY_MLP.with_(bias_before_norm=False),
    TINY_MLP.with_(placement="after"), TINY_MLP.with_(norm="layer"), TINY_MLP.with_(norm="group"),
    TINY_MLP.with_(norm="none"), TINY_CNN, TINY_CNN.with_(norm="instance", bias_before_norm=False),
], ids=lambda s: f"{s.arch}-{s.norm}-{s.norm_convention}-{s.placement}-bias{int(s.bias_before_norm)}")
@pytest.mark.parametrize("k, shared", [(1, True), (3, True), (3, False)])
def test_inference_copy_folds_norms_and_computes_what_eval_mode_does(spec, k, shared):
    models = [build_model(spec, seed=s) for s in range(k)]
    for s, model in enumerate(models):
        _randomize_norm_state(model, s)
    separate = [m.eval() for m in models]  # oracle: the plain torch models in eval mode
    stacked = StackedModel(models, shared_input=shared).eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in separate], dim=1)
        before = {n: p.clone() for n, p in stacked.state_dict().items()}
        copy32, copy16 = stacked.inference_copy(), stacked.inference_copy(torch.bfloat16)
        got = copy32(x if spec.arch == "cnn" else x.flatten(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got16 = copy16(x if spec.arch == "cnn" else x.flatten(1)).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got16, expected, rtol=0.1, atol=0.1 * expected.abs().max().item())
    # the folded norms are gone (those right after a weighted layer), nothing else is
    folded = _norm_layers(stacked) - _norm_layers(copy32)
    assert folded == (len(spec.hidden) + len(spec.conv_channels)
                      if spec.norm in FOLDABLE and spec.placement == "before" else 0)
    weighted = [m for m in copy16.modules() if isinstance(m, (nn.Linear, nn.Conv2d, StackedLinear, StackedConv2d))]
    assert weighted and all(m.weight.dtype == torch.bfloat16 for m in weighted)
    # the copy's weights are its own: making it changed nothing, and changing them changes nothing
    for n, p in stacked.state_dict().items():
        assert torch.equal(p, before[n]), n
    with torch.no_grad():
        for m in copy32.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, StackedLinear, StackedConv2d)):
                m.weight.mul_(0)
        torch.testing.assert_close(stacked(x if spec.arch == "cnn" else x.flatten(1)), expected, rtol=1e-5, atol=2e-5)


def test_seeded_build_leaves_the_global_random_state_and_evaluate_restores_the_mode():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(TINY_MLP, seed=7)
    assert torch.equal(torch.rand(3), expected)  # the global stream did not move
    torch.testing.assert_close(build_model(TINY_MLP, seed=7)[1].weight, first[1].weight, rtol=0, atol=0)
    data = prepare_data(fake_dataset(n_train=64, n_test=32), CFG, TINY_MLP)
    trainer = StackedTrainer(TINY_MLP, CFG, [0, 1], data)
    trainer.model.eval()
    trainer.evaluate(data.test_x, data.test_y)
    assert not trainer.model.training
    trainer.model.train()
    trainer.evaluate(data.test_x, data.test_y, folded=True)
    assert trainer.model.training


def test_training_leaves_the_global_generator_alone_and_does_not_depend_on_it():
    """Dropout draws from the global generator; a run swaps its own state in and out, so the caller's
    random numbers are unchanged and the run is a function of its config alone."""
    spec = ModelSpec(hidden=(16,), norm="batch", dropout=0.5)
    cfg = TrainConfig(lr=0.1, batch_size=32, epochs=1, eval_every=2)
    data = prepare_data(fake_dataset(n_train=128), cfg, spec)
    states = []
    for outside_seed in (1, 2):
        torch.manual_seed(outside_seed)
        before = torch.get_rng_state()
        trainer = StackedTrainer(spec, cfg, [0, 1], data)
        trainer.run()
        trainer.train_step()  # one more step outside run(): the same swap
        assert torch.equal(torch.get_rng_state(), before)
        states.append(trainer.model.state_dict())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
