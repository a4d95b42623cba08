"""Claim 10: BN regularizes, and can replace Dropout. The train–test gap, at the end and over training."""

from __future__ import annotations

from bnlab.experiments.claims import protocols
from bnlab.experiments.claims.base import Arm, Claim, ClaimContext, ClaimResult, Criterion, Rule
from bnlab.experiments.claims.common import per_step, preset, series, values
from bnlab.probes import eval_accuracy
from bnlab.stats import mean_ci, welch_diff
from bnlab.train import prepare_data
from bnlab.train.engine import stratified_subset

REGULARIZATION = Rule((Criterion("train–test accuracy gap without BN − with BN", 0.001, unit="points", scale=100),),
                      evidence=lambda n: [n["gap_neither_minus_bn"]])


def _regularization(ctx: ClaimContext) -> ClaimResult:
    epochs = protocols.REGULARIZATION_EPOCHS[ctx.protocol_name]
    spec, cfg = preset("torch-mlp", epochs)
    cfg = cfg.with_(eval_train_subset=0, eval_bf16=False)  # the final gap on the full sets, in float32
    data = prepare_data(ctx.dataset(cfg.dataset), cfg, spec)
    subset = stratified_subset(data.train_y, protocols.TRAIN_CURVE_EXAMPLES)
    probe = eval_accuracy(data.train_x[subset], data.train_y[subset], name="train_acc")
    arms = {
        "neither": spec.with_(norm="none"),
        "BN": spec.with_(norm="batch"),
        "Dropout 0.3": spec.with_(norm="none", dropout=0.3),
        "BN then Dropout": spec.with_(norm="batch", dropout=0.3, dropout_position="after_norm"),
        "Dropout then BN": spec.with_(norm="batch", dropout=0.3, dropout_position="before_norm"),
    }
    summaries = ctx.train_all("regularization", {label: Arm(label, arm_spec, cfg) for label, arm_spec in arms.items()},
                              probes=dict.fromkeys(arms, (probe,)))
    runs = {label: [r["run_id"] for r in s["per_seed"]] for label, s in summaries.items()}
    gaps = {label: values(s, "train_test_gap") for label, s in summaries.items()}
    accs = {label: values(s, "final_test_acc") for label, s in summaries.items()}
    curves = {label: _gap_by_step(s) for label, s in summaries.items()}
    steps_per_epoch = summaries["BN"]["per_seed"][0]["total_steps"] / epochs
    numbers = {
        "train_test_gap": {label: mean_ci(v).to_dict() for label, v in gaps.items()},
        "final_test_acc": {label: mean_ci(v).to_dict() for label, v in accs.items()},
        "gap_neither_minus_bn": welch_diff(gaps["neither"], gaps["BN"]).to_dict(),
        "acc_bn_dropout_minus_bn": welch_diff(accs["BN then Dropout"], accs["BN"]).to_dict(),
        "gap_neither_minus_bn_by_epoch": {
            f"{step / steps_per_epoch:.3g}": welch_diff(curves["neither"][step], curves["BN"][step]).to_dict()
            for step in sorted(set(curves["neither"]) & set(curves["BN"]))},
    }
    bars = ctx.figure("regularization", "bars_with_ci", groups=["train–test gap", "test accuracy"],
                      series={label: [numbers["train_test_gap"][label], numbers["final_test_acc"][label]]
                              for label in arms},
                      title="Regularization: train–test accuracy gap and test accuracy", ylabel="percent", scale=100.0)
    lines = ctx.figure("regularization-curves", "lines_with_ci",
                       series={label: [(step / steps_per_epoch, mean_ci(v).to_dict()) for step, v in c.items()]
                               for label, c in curves.items()},
                       title="Train − test accuracy over training (mean, 95% CI over seeds)", xlabel="epochs",
                       ylabel="train − test accuracy (points)", scale=100.0, markers=False, hline=("no gap", 0.0))
    protocol = (f"torch-mlp recipe, {epochs} epochs; arms: neither, BN, Dropout 0.3, BN then Dropout, Dropout then BN; "
                "gap = final train accuracy − test accuracy, both in eval mode on the full sets in float32; the gap "
                f"over training: eval-mode accuracy on a fixed stratified {protocols.TRAIN_CURVE_EXAMPLES} training "
                "images at every evaluation point, minus the test accuracy there (the engine's evaluation subset in "
                "between, the full test set at each epoch's milestone)")
    return ctx.result("regularization", protocol, "train–test accuracy gap (and test accuracy)", numbers, runs,
                      [bars, lines])


def _gap_by_step(summary: dict) -> dict[int, list[float]]:
    train = per_step(series(summary, "train_acc"))
    test = per_step(series(summary, "test_acc"))
    return {s: [a - b for a, b in zip(train[s], test[s])] for s in sorted(set(train) & set(test))}


REGULARIZATION_CLAIM = Claim(
    "regularization", 10, "BN regularizes (and can replace Dropout)",
    "seed 000: 'The noise from batch statistics provides a mild regularization effect'; 'When using Dropout: "
    "Place BatchNorm before Dropout'; seed 001: BN 'often reduces or entirely eliminates the need for Dropout'",
    REGULARIZATION,
    "no MNIST number found; Ioffe & Szegedy removed Dropout from BN-Inception without losing accuracy",
    _regularization)
