"""Claims 2 and 3: with BN, training survives learning rates and initializations that break it without."""

from __future__ import annotations

from bnlab.experiments.claims import protocols
from bnlab.experiments.claims.base import Arm, Claim, ClaimContext, ClaimResult, Criterion, Rule
from bnlab.experiments.claims.common import one, values
from bnlab.stats import mean_ci, welch_diff


def _sweep_figure(ctx, name, results, title, xlabel):
    return ctx.figure(name, "lines_with_ci", series={f"{act}, {label}": points for (act, label), points in results.items()},
                      title=title, xlabel=xlabel, ylabel="final test accuracy (%)", logx=True, scale=100.0)


# -- 2. BN tolerates higher learning rates ------------------------------------------------------------------

HIGHER_LR = Rule((Criterion("final test accuracy of the ReLU net at the largest learning rate, BN − no BN", 0.05,
                            unit="points", scale=100),),
                 evidence=lambda n: [one(n, prefix="relu_bn_minus_no_bn_at_lr_")])


def _higher_lr(ctx: ClaimContext) -> ClaimResult:
    lrs = (0.01, 0.1, 1.0, 2.0) if ctx.quick else (0.01, 0.1, 0.5, 1.0, 2.0)
    steps = protocols.STEPS["higher-lr"][ctx.protocol_name]
    arms = {(act, label, lr): Arm(f"{act}/{label}/lr{lr}", protocols.PAPER_MLP.with_(activation=act, norm=norm),
                                  protocols.PAPER_SGD.with_(lr=lr, steps=steps, eval_every=max(100, steps // 10)))
            for act in ("relu", "sigmoid") for label, norm in (("no BN", "none"), ("BN", "batch")) for lr in lrs}
    summaries = ctx.train_all("higher-lr", arms)
    results, runs, finals = {}, {}, {}
    for (act, label, lr), arm in arms.items():
        runs[arm.label] = [r["run_id"] for r in summaries[(act, label, lr)]["per_seed"]]
        finals[(act, label, lr)] = values(summaries[(act, label, lr)], "final_test_acc")
        results.setdefault((act, label), []).append((lr, mean_ci(finals[(act, label, lr)]).to_dict()))
    top = max(lrs)
    numbers = {
        "final_test_acc": {f"{act}, {label}": {str(lr): iv for lr, iv in pts} for (act, label), pts in results.items()},
        f"relu_bn_minus_no_bn_at_lr_{top}": welch_diff(finals[("relu", "BN", top)],
                                                       finals[("relu", "no BN", top)]).to_dict(),
        f"sigmoid_bn_minus_no_bn_at_lr_{top}": welch_diff(finals[("sigmoid", "BN", top)],
                                                          finals[("sigmoid", "no BN", top)]).to_dict(),
    }
    plot = _sweep_figure(ctx, "higher-lr", results, "Final test accuracy vs learning rate (784-100x3-10)",
                         "learning rate (SGD)")
    protocol = (f"784-100-100-100-10, ReLU and sigmoid, BN before the activation (no bias), N(0, 0.05²) init, "
                f"plain SGD, batch 60, {steps} steps, learning rates {list(lrs)}, MNIST pixels in [0, 1]")
    return ctx.result("higher-lr", protocol, "final test accuracy", numbers, runs, [plot])


def _ours_higher_lr(numbers: dict) -> str:
    acc = numbers["final_test_acc"]
    parts = []
    for act, lr in (("relu", "1.0"), ("relu", "2.0"), ("sigmoid", "1.0")):
        without, with_ = acc.get(f"{act}, no BN", {}).get(lr), acc.get(f"{act}, BN", {}).get(lr)
        if without and with_:
            parts.append(f"{act} lr {lr}: {100 * without['mean']:.1f}% without BN vs {100 * with_['mean']:.1f}% with")
    return "; ".join(parts) + " (ours, at the protocol's steps)"


# -- 3. BN makes training less sensitive to initialization -------------------------------------------------

INIT_SENSITIVITY = Rule((Criterion("final test accuracy at each network's worst initialization, BN − no BN", 0.05,
                                   unit="points", scale=100),),
                        evidence=lambda n: [n["bn_worst_minus_no_bn_worst"]])


def _init_sensitivity(ctx: ClaimContext) -> ClaimResult:
    scales = (0.01, 0.1, 1.0, 5.0) if ctx.quick else (0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0)
    steps = protocols.STEPS["init-sensitivity"][ctx.protocol_name]
    arms = {(label, scale): Arm(f"{label}/std{scale}", protocols.PAPER_MLP.with_(norm=norm, init_scale=scale),
                                protocols.PAPER_SGD.with_(lr=0.1, steps=steps, eval_every=max(100, steps // 10)))
            for label, norm in (("no BN", "none"), ("BN", "batch")) for scale in scales}
    summaries = ctx.train_all("init-sensitivity", arms)
    results, runs, finals = {}, {}, {}
    for (label, scale), arm in arms.items():
        runs[arm.label] = [r["run_id"] for r in summaries[(label, scale)]["per_seed"]]
        finals[(label, scale)] = values(summaries[(label, scale)], "final_test_acc")
        results.setdefault(("relu", label), []).append((scale, mean_ci(finals[(label, scale)]).to_dict()))

    def worst(label):
        return min(scales, key=lambda s: mean_ci(finals[(label, s)]).mean)

    means = {label: [mean_ci(finals[(label, s)]).mean for s in scales] for label in ("no BN", "BN")}
    numbers = {
        "final_test_acc": {label: {str(s): iv for s, iv in pts} for (_, label), pts in results.items()},
        "worst_init": {label: worst(label) for label in ("no BN", "BN")},
        "bn_worst_minus_no_bn_worst": welch_diff(finals[("BN", worst("BN"))], finals[("no BN", worst("no BN"))]).to_dict(),
        "spread_best_minus_worst": {label: max(m) - min(m) for label, m in means.items()},
    }
    plot = _sweep_figure(ctx, "init-sensitivity", results, "Final test accuracy vs initial weight std (ReLU)",
                         "std of the initial weights")
    protocol = (f"784-100-100-100-10 ReLU, N(0, std²) init with std in {list(scales)}, plain SGD lr 0.1, "
                f"batch 60, {steps} steps, with and without BN")
    return ctx.result("init-sensitivity", protocol, "final test accuracy at the worst initialization", numbers, runs,
                      [plot])


def _ours_init(numbers: dict) -> str:
    acc = numbers["final_test_acc"]
    if "5.0" not in acc.get("no BN", {}):
        return "std 5 not in this protocol"
    return (f"std 5, lr 0.1: {100 * acc['no BN']['5.0']['mean']:.1f}% without BN vs "
            f"{100 * acc['BN']['5.0']['mean']:.1f}% with (ours)")


HIGHER_LR_CLAIM = Claim(
    "higher-lr", 2, "BN tolerates higher learning rates",
    "seed 000: 'You can often use higher learning rates'; seed 001: BN 'allows gradient descent to use much "
    "larger learning rates'; seed 004: 'Higher learning rates'",
    HIGHER_LR,
    "Udacity lesson (50k steps): ReLU lr 1: 19.6% without BN vs 98.3% with; lr 2: 10.1% vs 98.2%; "
    "sigmoid lr 1: 97.8% vs 98.0% (sigmoid does not collapse)",
    _higher_lr, ours_vs_anchor=_ours_higher_lr)

INIT_SENSITIVITY_CLAIM = Claim(
    "init-sensitivity", 3, "BN makes training less sensitive to initialization",
    "seed 000: with BN, 'Random weight initialization becomes less critical'; without it, 'Small changes in how "
    "you initialize weights can make the difference between a model that learns and one that doesn't'",
    INIT_SENSITIVITY,
    "Udacity lesson, init N(0, 5²): ReLU without BN stays at 9.8% for every lr; with BN 81–91%",
    _init_sensitivity, ours_vs_anchor=_ours_init)
