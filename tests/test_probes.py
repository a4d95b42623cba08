"""Probes measure without changing training: no running-statistics update, no RNG consumption."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.models import ModelSpec, build_model
from bnlab.probes import layer_input, preactivation_percentiles, probe_forward
from bnlab.train import StackedTrainer, TrainConfig, prepare_data
from fakes import fake_dataset

SPEC = ModelSpec(hidden=(16, 8), activation="sigmoid", norm="batch", dropout=0.2)
CFG = TrainConfig(lr=0.1, batch_size=32, epochs=2, eval_every=3)


def test_probe_forward_changes_nothing():
    model = build_model(SPEC, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(20, 784)
    rng = torch.get_rng_state()
    model.eval()
    (captured,) = probe_forward(model, x, capture=[layer_input(model, nn.Sigmoid)])
    assert captured.shape == (20, 8)
    assert not model.training  # mode restored
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_probing_does_not_change_a_training_run():
    data = prepare_data(fake_dataset(n_train=160), CFG, SPEC)
    probe = preactivation_percentiles(data.test_x[:50])
    runs = []
    for probes in ((), (probe,)):
        trainer = StackedTrainer(SPEC, CFG, [0, 1], data, probes=probes)
        log = []
        trainer.run(on_eval=lambda step, m: log.append({k: v.clone() for k, v in m.items()}))
        runs.append((log, trainer.model.state_dict()))
    (plain_log, plain_state), (probed_log, probed_state) = runs
    assert "preact_p50" in probed_log[-1] and "preact_p50" not in plain_log[-1]
    for a, b in zip(plain_log, probed_log):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    for name in plain_state:
        assert torch.equal(plain_state[name], probed_state[name]), name


def test_percentiles_on_a_known_case():
    # one hidden sigmoid layer whose unit 0 computes x[:, 0] exactly: percentiles are those of x[:, 0]
    spec = ModelSpec(hidden=(3,), activation="sigmoid")
    data = prepare_data(fake_dataset(n_train=64), CFG, spec)
    trainer = StackedTrainer(spec, CFG, [0], data)
    linear = trainer.model.layers[1]
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[0, 0] = 1.0
    x = torch.randn(200, 784)
    out = preactivation_percentiles(x, unit=0)(trainer)
    want = torch.quantile(x[:, 0], torch.tensor([0.15, 0.5, 0.85]))
    got = torch.stack([out["preact_p15"][0], out["preact_p50"][0], out["preact_p85"][0]])
    torch.testing.assert_close(got, want)


def _ics_trainer(spec, seeds=(0, 1)):
    cfg = TrainConfig(lr=0.5, batch_size=32, epochs=1, eval_every=2)
    data = prepare_data(fake_dataset(n_train=96), cfg, spec)
    return StackedTrainer(spec, cfg, list(seeds), data), data


def test_ics_is_zero_when_earlier_layers_do_not_move():
    from bnlab.probes import gradient_ics

    spec = ModelSpec(hidden=(8, 6), activation="sigmoid", norm="batch")
    trainer, data = _ics_trainer(spec)
    # lr 0: the earlier layers' step is zero, so G' = G exactly
    out = gradient_ics(data.test_x[:40], data.test_y[:40], lr=0.0)(trainer)
    assert torch.all(out["ics_l2"] == 0) and torch.allclose(out["ics_cos"], torch.ones(2))
    moved = gradient_ics(data.test_x[:40], data.test_y[:40], lr=0.5)(trainer)
    assert torch.all(moved["ics_l2"] > 0) and torch.all(moved["ics_cos"] < 1)


def test_ics_per_model_matches_single_model_runs():
    from bnlab.probes import gradient_ics

    spec = ModelSpec(hidden=(8, 6), activation="sigmoid")
    stacked, data = _ics_trainer(spec, seeds=(0, 1))
    single, _ = _ics_trainer(spec, seeds=(1,))
    probe = gradient_ics(data.test_x[:40], data.test_y[:40], lr=0.5)
    a, b = probe(stacked), probe(single)
    torch.testing.assert_close(a["ics_l2"][1], b["ics_l2"][0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a["ics_cos"][1], b["ics_cos"][0], rtol=1e-4, atol=1e-6)


def test_ics_probe_does_not_change_training():
    from bnlab.probes import gradient_ics

    spec = ModelSpec(hidden=(8, 6), activation="sigmoid", norm="batch")
    results = []
    for with_probe in (False, True):
        trainer, data = _ics_trainer(spec)
        if with_probe:
            trainer.probes = (gradient_ics(data.test_x[:40], data.test_y[:40], lr=0.5),)
        trainer.run()
        results.append(trainer.model.state_dict())
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_landscape_probe_beta_matches_hand_computation_and_changes_nothing():
    from bnlab.probes import landscape

    spec = ModelSpec(hidden=(6,), activation="tanh", norm="batch")
    trainer, data = _ics_trainer(spec, seeds=(0,))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    x, y = data.test_x[:30], data.test_y[:30]
    out = landscape(x, y, lr=0.1, multipliers=(1.0,))(trainer)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # by hand, with an independent autograd pass in train mode on a copy
    import copy
    model = copy.deepcopy(trainer.write_back()[0]).train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, gi in zip(model.parameters(), g):
            p -= 0.1 * gi
    model2 = copy.deepcopy(trainer.write_back()[0]).train()
    with torch.no_grad():
        for p, q in zip(model2.parameters(), model.parameters()):
            p.copy_(q)
    loss2 = torch.nn.functional.cross_entropy(model2(x), y)
    g2 = torch.autograd.grad(loss2, list(model2.parameters()))
    change = torch.linalg.vector_norm(torch.cat([(b - a_).flatten() for a_, b in zip(g, g2)]))
    beta = change / (0.1 * torch.linalg.vector_norm(torch.cat([a_.flatten() for a_ in g])))
    torch.testing.assert_close(out["beta_eff"][0], beta, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss_range"][0], (loss2 - loss).abs().detach(), rtol=1e-4, atol=1e-6)


def test_loss_surface_center_is_the_models_loss():
    from bnlab.probes import loss_surface

    model = build_model(ModelSpec(hidden=(6,), norm="batch"), seed=0).eval()
    x, y = torch.randn(20, 784), torch.randint(10, (20,))
    coords, losses = loss_surface(model, x, y, points=5)
    assert losses.shape == (5, 5) and coords[2] == 0
    torch.testing.assert_close(losses[2, 2], torch.nn.functional.cross_entropy(model(x), y))


def test_landscape_at_matched_length_is_the_same_point_as_the_lr_step_of_that_length():
    from bnlab.probes import landscape

    spec = ModelSpec(hidden=(6,), activation="tanh", norm="batch")
    trainer, data = _ics_trainer(spec, seeds=(0,))
    x, y = data.test_x[:30], data.test_y[:30]
    step = float(landscape(x, y, lr=0.1, multipliers=(1.0,))(trainer)["step_length"][0])
    # the step length by hand: ‖lr·g‖ of the train-mode gradient
    import copy
    model = copy.deepcopy(trainer.write_back()[0]).train()
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    assert step == pytest.approx(0.1 * float(torch.linalg.vector_norm(torch.cat([t.flatten() for t in g]))), rel=1e-4)
    out = landscape(x, y, lr=0.1, multipliers=(1.0,), lengths=(step, 3 * step))(trainer)
    one = landscape(x, y, lr=0.1, multipliers=(1.0,))(trainer)
    three = landscape(x, y, lr=0.3, multipliers=(1.0,))(trainer)
    # distance d along -g/‖g‖ is lr = d/‖g‖: the two lengths are the lr 0.1 and 0.3 steps
    expected_range = max(float(one["loss_range"][0]), float(three["loss_range"][0]))
    assert float(out["loss_range_at_length"][0]) == pytest.approx(expected_range, rel=1e-3, abs=1e-6)
    expected_change = max(float(one["grad_change"][0]), float(three["grad_change"][0]))
    assert float(out["grad_change_at_length"][0]) == pytest.approx(expected_change, rel=1e-3)


def test_accuracy_by_statistics_against_hand_computed_evaluations():
    import copy

    from bnlab.probes import accuracy_by_statistics, eval_accuracy

    spec = ModelSpec(hidden=(12, 8), activation="relu", norm="batch", norm_convention="keras")
    trainer, data = _ics_trainer(spec)
    trainer.run()
    x, y = data.test_x[:60], data.test_y[:60]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    # precise statistics from one batch that is the whole evaluation set equal that batch's statistics
    # (Keras' convention stores the biased variance, as batch statistics use): the two must agree exactly
    out = accuracy_by_statistics(x, y, batch_size=60, reestimate_x=x, reestimate_batches=1)(trainer)
    assert torch.equal(out["acc_precise"], out["acc_batch_stats"])
    running = eval_accuracy(x, y, name="acc")(trainer)["acc"]
    torch.testing.assert_close(out["acc_running"], running)
    for k, model in enumerate(trainer.write_back()):
        hand = copy.deepcopy(model).eval()
        assert float(running[k]) == pytest.approx(float((hand(x).argmax(1) == y).double().mean()))
        hand.train()  # no dropout in this net: train mode is batch statistics only
        batch_acc = sum(int((hand(x[i:i + 20]).argmax(1) == y[i:i + 20]).sum()) for i in range(0, 60, 20)) / 60
        small = accuracy_by_statistics(x, y, batch_size=20, reestimate_x=x, reestimate_batches=3)(trainer)
        assert float(small["acc_batch_stats"][k]) == pytest.approx(batch_acc)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="fewer than 5 batches"):
        accuracy_by_statistics(x, y, batch_size=20, reestimate_x=x, reestimate_batches=5)
