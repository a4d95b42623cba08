"""torch LR schedulers drive MasterWeightOptimizer exactly as they drive the torch optimizer it wraps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim import lr_scheduler

from bnlab.models import ModelSpec
from bnlab.train import StackedTrainer, TrainConfig, prepare_data
from bnlab.train.mixed_precision import MasterWeightOptimizer
from fakes import fake_dataset

TINY_MLP = ModelSpec(hidden=(32, 16), norm="batch")
# no bias in front of the norms, for the reason given at test_master_weight_bf16_equals_autocast
TINY_CNN = ModelSpec(arch="cnn", conv_channels=(4, 6), hidden=(12,), norm="batch", bias_before_norm=False)
CFG = TrainConfig(lr=0.05, momentum=0.9, batch_size=32, epochs=1, eval_every=10, checkpoint_every=7, bf16=True,
                  weight_decay=1e-3)
STEPS = 25

SCHEDULERS = {
    "step": lambda opt: lr_scheduler.StepLR(opt, step_size=6, gamma=0.3),
    # cycles momentum (SGD) or beta1 (Adam) too, so those must reach the compiled step as well
    "onecycle": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"] * 2, total_steps=STEPS),
    "lambda": lambda opt: lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    "cosine": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    "sequential": lambda opt: lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=5),
              lr_scheduler.ExponentialLR(opt, gamma=0.9)], milestones=[5]),
}


def _autocast_trainer(spec, cfg, data, monkeypatch):
    """The same trainer on plain autocast with torch's fused optimizer: the oracle for master weights."""
    import bnlab.train.engine as engine

    with monkeypatch.context() as m:
        m.setattr(engine, "master_weight_kernels_available", lambda: False)
        return StackedTrainer(spec, cfg, [0, 1], data)


def _scheduler_warnings(caught):
    return [str(w.message) for w in caught
            if "optimizer.step()" in str(w.message) or "lr_scheduler" in str(w.message)]


@pytest.mark.parametrize("spec,optimizer,schedule", [
    (TINY_MLP, "sgd", "step"), (TINY_MLP, "sgd", "onecycle"), (TINY_CNN, "adam", "onecycle"),
    (TINY_MLP, "adam", "step"), (TINY_MLP, "sgd", "lambda"), (TINY_MLP, "sgd", "cosine"),
    (TINY_MLP, "sgd", "sequential"),
])
@pytest.mark.slow
def test_scheduled_master_weights_equal_scheduled_autocast(spec, optimizer, schedule, monkeypatch):
    # Oracle: the same stacked run under plain autocast, its torch optimizer driven by the same
    # scheduler. Both lr (and momentum/betas) paths must see every change the scheduler makes.
    cfg = CFG.with_(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3)
    data = prepare_data(fake_dataset(), cfg, spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = StackedTrainer(spec, cfg, [0, 1], data)
        assert isinstance(fast.optimizer, MasterWeightOptimizer)
        reference = _autocast_trainer(spec, cfg, data, monkeypatch)
        assert not isinstance(reference.optimizer, MasterWeightOptimizer)
        fast_sched, ref_sched = SCHEDULERS[schedule](fast.optimizer), SCHEDULERS[schedule](reference.optimizer)
        lrs = set()
        for step in range(STEPS):
            loss_fast, loss_ref = fast.train_step(), reference.train_step()
            torch.testing.assert_close(loss_fast, loss_ref, rtol=2e-3, atol=2e-3)
            fast_sched.step()
            ref_sched.step()
            assert fast_sched.get_last_lr() == ref_sched.get_last_lr()
            assert fast.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]
            lrs.add(fast.optimizer.param_groups[0]["lr"])
            if step == 2:
                for (name, a), b in zip(fast.model.state_dict().items(), reference.model.state_dict().values()):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert len(lrs) > 2  # the schedule did change the learning rate
    assert _scheduler_warnings(caught) == []
    for (name, a), b in zip(fast.model.state_dict().items(), reference.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=5e-3, msg=name)
    for master, shadow in fast.optimizer.pairs:
        assert torch.equal(shadow, master.detach().to(torch.bfloat16))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_scheduled_zero_lr_reaches_the_compiled_step(optimizer):
    # If the master-weight step cached lr (or read it from anywhere but the param group the
    # scheduler writes), the shadowed weights would keep moving after the schedule hits zero.
    cfg = CFG.with_(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3)
    data = prepare_data(fake_dataset(), cfg, TINY_MLP)
    trainer = StackedTrainer(TINY_MLP, cfg, [0, 1], data)
    opt = trainer.optimizer
    assert isinstance(opt, MasterWeightOptimizer) and opt.pairs
    scheduler = lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 3 else 0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # full lr: momentum buffers / Adam moments fill up
            before = [master.detach().clone() for master, _ in opt.pairs]
            trainer.train_step()
            scheduler.step()
            assert all(not torch.equal(b, master) for b, (master, _) in zip(before, opt.pairs))
        assert opt.param_groups[0]["lr"] == 0.0 and opt.inner.param_groups[0]["lr"] == 0.0
        params_before = [p.detach().clone() for p in trainer.model.parameters()]
        for _ in range(3):
            trainer.train_step()
            scheduler.step()
    assert _scheduler_warnings(caught) == []
    for before, p in zip(params_before, trainer.model.parameters()):
        assert torch.equal(before, p)  # the shadowed weights (compiled step) and the rest (torch's)
    for master, shadow in opt.pairs:
        assert torch.equal(shadow, master.detach().to(torch.bfloat16))


def test_master_weight_optimizer_is_a_torch_optimizer_sharing_the_inner_groups():
    data = prepare_data(fake_dataset(), CFG, TINY_MLP)
    trainer = StackedTrainer(TINY_MLP, CFG, [0, 1], data)
    opt = trainer.optimizer
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state
    assert opt.defaults is opt.inner.defaults and "momentum" in opt.defaults
    with pytest.raises(ValueError, match="single parameter group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert "MasterWeightOptimizer" in repr(opt)

    # step hooks fire around the whole step (newer schedulers may track optimizer.step() this way)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    scheduler = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    assert hasattr(opt.step, "_wrapped_by_lr_sched")
    trainer.train_step()
    assert calls == [("pre", opt), ("post", opt)] and opt._opt_called
    scheduler.step()

    # load_state_dict replaces the inner optimizer's groups: the wrapper (and so the scheduler) follows
    state = opt.state_dict()
    assert state["param_groups"][0]["initial_lr"] == CFG.lr
    opt.param_groups[0]["lr"] = 123.0
    opt.load_state_dict(state)
    assert opt.param_groups is opt.inner.param_groups
    assert opt.param_groups[0]["lr"] == CFG.lr
    for _ in range(2):
        trainer.train_step()
        scheduler.step()
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(CFG.lr * 0.5)

    # state-dict hooks registered on the wrapper run with the wrapper
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(o))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o))
    opt.load_state_dict(opt.state_dict())
    assert seen == [opt, opt]


def test_reduce_lr_on_plateau_drives_master_weights():
    data = prepare_data(fake_dataset(), CFG, TINY_MLP)
    trainer = StackedTrainer(TINY_MLP, CFG, [0, 1], data)
    scheduler = lr_scheduler.ReduceLROnPlateau(trainer.optimizer, patience=0, factor=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            trainer.train_step()
            scheduler.step(1.0)  # never improves
    assert _scheduler_warnings(caught) == []
    assert trainer.optimizer.inner.param_groups[0]["lr"] == pytest.approx(CFG.lr / 4)
