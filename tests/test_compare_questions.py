"""`bnlab compare` for the user's own question: N variants, --set, Welch differences, the cheap
evaluation plan and its measured error, strict JSON, and the marking of legacy shared-batch runs."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from torch import nn

import bnlab.experiments.compare as compare_module
from bnlab.cli.main import main
from bnlab.experiments.compare import CompareRequest, run_compare
from bnlab.experiments.settings import apply_settings, parse_settings
from bnlab.models import ModelSpec
from bnlab.report.compare_report import format_table, write_report
from bnlab.stats import welch_diff
from bnlab.store import SCHEMA_VERSION, RunStore, config_key
from bnlab.train import StackedTrainer, TrainConfig, prepare_data
from bnlab.train.engine import stratified_subset
from bnlab.train.runner import group_config
from fakes import fake_dataset


def _strict_load(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_parse_settings_types_and_errors():
    s = parse_settings(["lr=0.5", "hidden=256,128", "bias_before_norm=false", "norm_momentum=none",
                        "activation=sigmoid", "batch_size=4"])
    assert s == {"lr": 0.5, "hidden": (256, 128), "bias_before_norm": False, "norm_momentum": None,
                 "activation": "sigmoid", "batch_size": 4}
    with pytest.raises(ValueError, match="unknown key 'lrr'; valid keys are model: .*hidden.*train: .*lr"):
        parse_settings(["lrr=1"])
    with pytest.raises(ValueError, match="expected an integer"):
        parse_settings(["batch_size=big"])
    with pytest.raises(ValueError, match="use --variants"):
        parse_settings(["norm=batch"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_settings(["lr"])
    spec, cfg = apply_settings(ModelSpec(), TrainConfig(epochs=1), parse_settings(["steps=7", "activation=tanh"]))
    assert cfg.steps == 7 and cfg.epochs is None and spec.activation == "tanh"
    with pytest.raises(ValueError, match="--set: activation must be one of"):
        apply_settings(ModelSpec(), TrainConfig(epochs=1), {"activation": "gelu"})


def test_norm_momentum_and_eps_reach_the_layers():
    from bnlab.models import build_model

    model = build_model(ModelSpec(hidden=(8,), norm="batch", norm_momentum=0.3, norm_eps=1e-2))
    assert model[2].momentum == 0.3 and model[2].eps == 1e-2
    group = build_model(ModelSpec(hidden=(8,), norm="group", norm_momentum=0.3, norm_eps=1e-2, norm_groups=2))
    assert group[2].eps == 1e-2  # group norm has no running statistics: momentum does not apply


def test_n_variants_with_settings_and_welch_differences(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    request = CompareRequest(seeds=3, epochs=1, variants=("none", "batch", "group"),
                             settings={"lr": 0.05, "hidden": (32, 16)})
    summary = run_compare(request, store, progress=False, dataset=fake_dataset(n_train=320, n_test=100))
    assert list(summary["variants"]) == ["no norm", "BN", "GroupNorm"]
    assert summary["train_config"]["lr"] == 0.05
    assert all(m["hidden"] == [32, 16] for m in summary["models"].values())
    assert [m["norm"] for m in summary["models"].values()] == ["none", "batch", "group"]
    base = [r["final_test_acc"] for r in summary["variants"]["no norm"]["per_seed"]]
    for label in ("BN", "GroupNorm"):
        mine = [r["final_test_acc"] for r in summary["variants"][label]["per_seed"]]
        expected = welch_diff(mine, base)
        got = summary["differences"][label]["final_test_acc"]
        assert got["mean"] == pytest.approx(sum(mine) / 3 - sum(base) / 3)
        assert (got["low"], got["high"]) == pytest.approx((expected.low, expected.high))
    table = format_table(summary)
    assert "GroupNorm" in table and "Δ final test accuracy" in table and "Welch" in table
    paths = write_report(summary, tmp_path / "out")
    loaded = _strict_load(paths["summary"].read_text())
    assert set(loaded["phases_seconds"]) >= {"data", "setup", "training", "evaluation", "report"}
    assert "GroupNorm" in paths["html"].read_text()


def test_summary_json_is_strict_json_when_thresholds_are_not_reached(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    summary = run_compare(CompareRequest(seeds=1, epochs=0.05), store, progress=False,
                          dataset=fake_dataset(n_train=320, n_test=100))
    assert summary["variants"]["BN"]["aggregate"]["steps_to_97"]["n"] == 0  # never reached: NaN inside
    text = write_report(summary, tmp_path / "out")["summary"].read_text()
    assert "NaN" not in text
    _strict_load(text)


def test_cli_variants_and_set_errors_are_one_line(tmp_path, capsys):
    store = str(tmp_path / "runs.sqlite")
    for argv, reason in ((["--set", "lrr=1"], "unknown key 'lrr'"), (["--variants", "none,bogus"], "bogus"),
                         (["--variants", "instance"], "instance norm needs spatial dims"),
                         (["--set", "batch_size=1"], "batch_size must be at least 2")):
        assert main(["compare", "--store", store, "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and reason in err, err
    assert not (tmp_path / "runs.sqlite").exists() or not RunStore(store).runs()  # nothing was trained


def test_cli_prints_phases(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_module, "load_dataset", lambda name, **_: fake_dataset(n_train=256, n_test=64))
    out = tmp_path / "report"
    assert main(["compare", "--seeds", "2", "--epochs", "1", "--variants", "none,batch,layer", "--set", "lr=0.05",
                 "--store", str(tmp_path / "s.sqlite"), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "LayerNorm" in text and "time: " in text and "startup" in text and "report" in text
    assert _strict_load((out / "summary.json").read_text())["phases_seconds"]["startup"] > 0


def test_presets_lists_the_set_keys(capsys):
    assert main(["presets", "torch-mlp"]) == 0
    out = capsys.readouterr().out
    assert "--set KEY=VALUE" in out and "norm_momentum" in out and "data_order" in out


def test_stratified_subset_keeps_class_proportions_and_is_fixed():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)[torch.randperm(1000, generator=torch.Generator().manual_seed(3))]
    subset = stratified_subset(labels, 100)
    assert len(subset) == 100 and len(set(subset.tolist())) == 100
    assert torch.bincount(labels[subset]).tolist() == [50, 30, 20]
    assert torch.equal(subset, stratified_subset(labels, 100))
    odd = stratified_subset(labels, 7)  # largest remainder: 3.5, 2.1, 1.4 -> 4, 2, 1
    assert torch.bincount(labels[odd], minlength=3).tolist() == [4, 2, 1]


def _hand_folded(model: nn.Sequential) -> nn.Sequential:
    """Each Linear -> BatchNorm1d pair as one Linear: W * s, (b - mean) * s + beta, s = gamma / sqrt(var + eps)."""
    layers, out = list(model), []
    while layers:
        layer = layers.pop(0)
        if isinstance(layer, nn.Linear) and layers and isinstance(layers[0], nn.BatchNorm1d):
            bn = layers.pop(0)
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            folded = nn.Linear(layer.in_features, layer.out_features)
            folded.weight.copy_(layer.weight * s[:, None])
            folded.bias.copy_((layer.bias - bn.running_mean) * s + bn.bias)
            layer = folded
        out.append(layer)
    return nn.Sequential(*out)


def test_milestones_are_exact_and_intermediate_points_follow_the_plan():
    spec = ModelSpec(hidden=(32, 16), norm="batch")
    cfg = TrainConfig(lr=0.05, batch_size=32, epochs=1, eval_every=4, eval_subset=50, eval_train_subset=100,
                      eval_bf16=True)
    data = prepare_data(fake_dataset(n_train=320, n_test=200), cfg, spec)
    trainer = StackedTrainer(spec, cfg, [0, 1], data)
    logged = {}
    trainer.run(on_eval=lambda step, m: logged.update({step: {k: v.clone() for k, v in m.items()}}))
    final = trainer.total_steps
    assert set(logged[final]) >= {"test_acc", "test_acc_approx"} and "test_acc_approx" not in logged[4]
    # Oracle: the written-back single models, evaluated by hand: as they are for the exact numbers,
    # with each batch norm folded by hand into the linear layer before it, in bf16, for the cheap ones.
    models = [m.eval() for m in trainer.write_back()]
    with torch.no_grad():
        exact = torch.stack([(m(data.test_x).argmax(1) == data.test_y).double().mean() for m in models])
        sub = stratified_subset(data.test_y, 50)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            approx = torch.stack([(_hand_folded(m).to(torch.bfloat16)(data.test_x[sub]).float().argmax(1)
                                   == data.test_y[sub]).double().mean() for m in models])
    torch.testing.assert_close(logged[final]["test_acc"], exact)
    torch.testing.assert_close(logged[final]["test_acc_approx"], approx)


def test_legacy_runs_are_marked_as_shared_batches_and_keep_their_group(tmp_path):
    path = tmp_path / "old.sqlite"
    store = RunStore(path)
    spec, cfg = ModelSpec(hidden=(8,)), TrainConfig(epochs=1)
    legacy_train = {k: v for k, v in cfg.to_dict().items()
                    if k not in ("data_order", "eval_subset", "eval_train_subset", "eval_bf16")}
    legacy_model = {k: v for k, v in spec.to_dict().items() if k not in ("norm_momentum", "norm_eps")}
    config = {"label": "old", "model": legacy_model, "train": legacy_train, "seeds": [0]}
    store.create_group(config_key(config), [("old", 0, {**config, "seed": 0})], 10, "bnlab 0.0.9")
    store._db.execute("PRAGMA user_version = 0")
    store.close()
    migrated = RunStore(path).runs()[0]
    train = migrated.config["train"]
    assert train["data_order"] == "shared" and train["eval_subset"] == 0 and train["eval_bf16"] is False
    redone = TrainConfig.from_dict(train)
    assert migrated.group_key == config_key(group_config("old", spec, redone, [0]))  # resume finds it
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_milestones_are_the_first_evaluation_of_each_epoch_and_the_last_step():
    cfg = TrainConfig(epochs=3, eval_every=100)
    spe, total = 938, 3 * 938
    evals = [s for s in range(1, total + 1) if cfg.is_eval_step(s, total)]
    milestones = [s for s in evals if cfg.is_milestone(s, total, spe)]
    assert milestones == [1000, 1900, total]  # first points past 938 and 1876, then the end
    aligned = TrainConfig(steps=40, eval_every=10)  # epoch ends on the grid are milestones themselves
    assert [s for s in range(1, 41) if aligned.is_eval_step(s, 40) and aligned.is_milestone(s, 40, 20)] == [20, 40]


def test_an_epoch_end_off_the_evaluation_grid_is_measured_exactly():
    spec = ModelSpec(hidden=(16,), norm="batch")
    cfg = TrainConfig(lr=0.05, batch_size=32, epochs=2, eval_every=4, eval_subset=50, eval_train_subset=100)
    data = prepare_data(fake_dataset(n_train=320, n_test=200), cfg, spec)  # 10 steps per epoch
    trainer = StackedTrainer(spec, cfg, [0, 1], data)
    logged = {}
    trainer.run(on_eval=lambda step, m: logged.update({step: set(m)}))
    assert "test_acc_approx" in logged[12] and "test_acc_approx" in logged[20]  # 12: first point after 10
    assert "test_acc_approx" not in logged[8] and "test_acc_approx" not in logged[16]


def test_steps_to_x_differences_say_over_how_many_seeds():
    """A steps-to-X difference is over the seeds that reached X; the table says so when some did not."""
    from bnlab.report.compare_report import _difference_rows
    from bnlab.stats import mean_ci

    per_variant = {"no norm": [600.0, 700.0], "BN": [200.0, 250.0, 300.0]}  # of 3 seeds each
    variants = {}
    for label, steps in per_variant.items():
        full = {**mean_ci([0.97, 0.98, 0.975]).to_dict()}
        variants[label] = {"aggregate": {
            "final_test_acc": full, "final_train_loss": full, "train_test_gap": full,
            "steps_to_95": {**mean_ci(steps).to_dict(), "reached": len(steps), "of": 3},
            "steps_to_97": {**mean_ci(steps).to_dict(), "reached": len(steps), "of": 3}}}
    diff = {key: welch_diff(per_variant["BN"], per_variant["no norm"]).to_dict()
            for key in ("steps_to_95", "steps_to_97")}
    diff.update({key: welch_diff([0.97, 0.98, 0.975], [0.97, 0.98, 0.975]).to_dict()
                 for key in ("final_test_acc", "final_train_loss", "train_test_gap")})
    rows = dict(_difference_rows({"variants": variants, "differences": {"BN": diff}}))
    assert rows["Δ steps to 95% test acc"][1].endswith("(over 3/3 and 2/3 seeds)")
    assert "seeds)" not in rows["Δ final test accuracy"][1]
