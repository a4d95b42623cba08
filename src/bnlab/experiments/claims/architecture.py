"""Claims 7 and 14: where BN goes. Before or after the activation; on the logits or not."""

from __future__ import annotations

from bnlab.experiments.claims import protocols
from bnlab.experiments.claims.base import Arm, Claim, ClaimContext, ClaimResult, Criterion, Rule
from bnlab.experiments.claims.common import preset, values
from bnlab.stats import mean_ci, welch_diff

# -- 7. Placement before vs after the activation -------------------------------------------------------------

PLACEMENT = Rule((Criterion("final test accuracy with BN before − after the activation", 0.005, unit="points",
                            scale=100),),
                 each="activation (ReLU, sigmoid)",
                 evidence=lambda n: {act: [n[act]["before_minus_after"]] for act in ("relu", "sigmoid")})


def _placement(ctx: ClaimContext) -> ClaimResult:
    steps = protocols.STEPS["placement"][ctx.protocol_name]
    arms = {(act, placement): Arm(f"{act}/{placement}",
                                  protocols.PAPER_MLP.with_(activation=act, norm="batch", placement=placement),
                                  protocols.PAPER_SGD.with_(lr=0.1, steps=steps, eval_every=max(100, steps // 10)))
            for act in ("relu", "sigmoid") for placement in ("before", "after")}
    summaries = ctx.train_all("placement", arms)
    numbers, runs, intervals = {}, {}, {"before": [], "after": []}
    for act in ("relu", "sigmoid"):
        accs = {}
        for placement in ("before", "after"):
            arm, summary = arms[(act, placement)], summaries[(act, placement)]
            runs[arm.label] = [r["run_id"] for r in summary["per_seed"]]
            accs[placement] = values(summary, "final_test_acc")
            intervals[placement].append(mean_ci(accs[placement]).to_dict())
        numbers[act] = {"before": intervals["before"][-1], "after": intervals["after"][-1],
                        "before_minus_after": welch_diff(accs["before"], accs["after"]).to_dict()}
    plot = ctx.figure("placement", "bars_with_ci", groups=["relu", "sigmoid"], series=intervals,
                      title="Final test accuracy by BN placement", ylabel="test accuracy (%)", scale=100.0)
    protocol = (f"784-100-100-100-10 with BN before (linear→BN→act) or after (linear→act→BN) the activation, "
                f"ReLU and sigmoid, N(0, 0.05²) init, plain SGD lr 0.1, batch 60, {steps} steps")
    return ctx.result("placement", protocol, "final test accuracy, before − after", numbers, runs, [plot])


def _ours_placement(numbers: dict) -> str:
    return "; ".join(f"{act}: before − after {100 * numbers[act]['before_minus_after']['mean']:+.2f} points"
                     for act in ("relu", "sigmoid")) + " (Mishkin: after ReLU +2.5 points on CaffeNet, before +1 on GoogLeNet)"


# -- 14. BN on the output layer ------------------------------------------------------------------------------

OUTPUT_LAYER = Rule((Criterion("final test accuracy with BN on the hidden layers only − also on the logits", 0.002,
                               unit="points", scale=100),),
                    evidence=lambda n: [n["hidden_only_minus_with_output"]])


def _output_layer(ctx: ClaimContext) -> ClaimResult:
    epochs = protocols.QUICK_EPOCHS if ctx.quick else None
    spec, cfg = preset("torch-mlp", epochs)
    summaries = {  # the hidden-only arm is claim 1's, trained once
        "BN on hidden layers": ctx.train("trains-faster", Arm("torch-mlp/BN", spec.with_(norm="batch"), cfg)),
        "BN also on the logits": ctx.train("output-layer", Arm("torch-mlp/BN+output",
                                                               spec.with_(norm="batch", norm_output=True), cfg)),
    }
    runs = {label: [r["run_id"] for r in s["per_seed"]] for label, s in summaries.items()}
    accs = {label: values(s, "final_test_acc") for label, s in summaries.items()}
    numbers = {"final_test_acc": {label: mean_ci(v).to_dict() for label, v in accs.items()},
               "hidden_only_minus_with_output": welch_diff(accs["BN on hidden layers"],
                                                           accs["BN also on the logits"]).to_dict()}
    plot = ctx.figure("output-layer", "bars_with_ci", groups=["torch-mlp"],
                      series={label: [iv] for label, iv in numbers["final_test_acc"].items()},
                      title="Final test accuracy with and without BN on the logits", ylabel="test accuracy (%)",
                      scale=100.0)
    protocol = (f"torch-mlp recipe ({f'{epochs} epoch' if epochs else '5 epochs'}), BN on the hidden layers, with and "
                "without a BatchNorm1d(10) on the logits")
    return ctx.result("output-layer", protocol, "final test accuracy", numbers, runs, [plot])


PLACEMENT_CLAIM = Claim(
    "placement", 7, "BN belongs before the activation",
    "seed 000, 'Pitfall 2: Wrong Placement': 'BatchNorm after activation might reduce effectiveness'; seed 004: "
    "BN 'is usually applied after the linear transformation and before the activation function'",
    PLACEMENT,
    "no controlled ablation in the BN paper; Mishkin's CaffeNet: after ReLU better by ~2.5 points, GoogLeNet: "
    "before better by ~1 point (single runs)",
    _placement, ours_vs_anchor=_ours_placement)

OUTPUT_LAYER_CLAIM = Claim(
    "output-layer", 14, "BN on the output layer hurts",
    "seed 000: 'Don't use on output layers (usually)'",
    OUTPUT_LAYER,
    "no published number found",
    _output_layer)
