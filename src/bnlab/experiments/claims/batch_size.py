"""Claims 8, 12 and 13: BN and the batch size. Small batches, gradient accumulation, large batches and Ghost BN."""

from __future__ import annotations

from bnlab.experiments.claims import protocols
from bnlab.experiments.claims.base import Arm, Claim, ClaimContext, ClaimResult, Criterion, Rule
from bnlab.experiments.claims.common import curve_with_ci, one, per_step, series, values
from bnlab.stats import mean_ci, welch_diff
from bnlab.train import TrainConfig

# -- 8. Small batches ------------------------------------------------------------------------------------

SMALL_BATCHES_RULE = Rule(
    (Criterion(f"BN's final test accuracy at batch {protocols.SMALL_BATCHES[-1]} − at batch "
               f"{protocols.SMALL_BATCHES[0]}", 0.01, unit="points", scale=100),
     Criterion(f"final test accuracy at batch {protocols.SMALL_BATCHES[0]}, the better of GroupNorm and LayerNorm − BN",
               0.01, unit="points", scale=100)),
    evidence=lambda n: [n[f"bn_batch{protocols.SMALL_BATCHES[-1]}_minus_batch{protocols.SMALL_BATCHES[0]}"],
                        one(n, suffix=f"_minus_bn_at_batch{protocols.SMALL_BATCHES[0]}")])
NORMS = {"BatchNorm": "batch", "GroupNorm": "group", "LayerNorm": "layer", "Batch Renorm": "renorm"}


def _small_batches(ctx: ClaimContext) -> ClaimResult:
    samples = protocols.SMALL_BATCH_SAMPLES[ctx.protocol_name]
    arms = {(label, b): Arm(f"{label}/batch{b}", protocols.PAPER_MLP.with_(norm=norm),
                            protocols.PAPER_SGD.with_(batch_size=b, lr=0.1 * b / 32, steps=max(1, samples // b),
                                                      eval_every=max(1, samples // b // 5)))
            for label, norm in NORMS.items() for b in protocols.SMALL_BATCHES}
    summaries = ctx.train_all("small-batches", arms)
    finals, runs, lines = {}, {}, {}
    for (label, b), arm in arms.items():
        runs[arm.label] = [r["run_id"] for r in summaries[(label, b)]["per_seed"]]
        finals[(label, b)] = values(summaries[(label, b)], "final_test_acc")
        lines.setdefault(label, []).append((b, mean_ci(finals[(label, b)]).to_dict()))
    smallest, largest = protocols.SMALL_BATCHES[0], protocols.SMALL_BATCHES[-1]
    best_alt = max(("GroupNorm", "LayerNorm"), key=lambda n: mean_ci(finals[(n, smallest)]).mean)
    numbers = {
        "final_test_acc": {label: {str(b): iv for b, iv in pts} for label, pts in lines.items()},
        f"bn_batch{largest}_minus_batch{smallest}": welch_diff(finals[("BatchNorm", largest)],
                                                               finals[("BatchNorm", smallest)]).to_dict(),
        f"{best_alt}_minus_bn_at_batch{smallest}": welch_diff(finals[(best_alt, smallest)],
                                                             finals[("BatchNorm", smallest)]).to_dict(),
    }
    plot = ctx.figure("small-batches", "lines_with_ci", series=lines, title="Final test accuracy vs batch size (LR ∝ batch)",
                      xlabel="batch size", ylabel="final test accuracy (%)", logx=True, scale=100.0)
    protocol = (f"784-100-100-100-10 ReLU with each norm before the activation, plain SGD with lr = 0.1·B/32 "
                f"(linear scaling as Wu & He), {samples} training samples seen at every batch size B in "
                f"{list(protocols.SMALL_BATCHES)}; GroupNorm with 25 groups of 4 features; Batch Renorm with fixed "
                "r_max=3, d_max=5 (no warm-up schedule); models evaluated in eval mode")
    return ctx.result("small-batches", protocol, "final test accuracy", numbers, runs, [plot])


def _ours_small_batches(numbers: dict) -> str:
    acc = numbers["final_test_acc"]
    small, large = str(protocols.SMALL_BATCHES[0]), str(protocols.SMALL_BATCHES[-1])
    return (f"test error by batch {large} → {small}: BN {100 - 100 * acc['BatchNorm'][large]['mean']:.1f} → "
            f"{100 - 100 * acc['BatchNorm'][small]['mean']:.1f}%, GN {100 - 100 * acc['GroupNorm'][large]['mean']:.1f} → "
            f"{100 - 100 * acc['GroupNorm'][small]['mean']:.1f}% (Wu & He, ImageNet error, 32 → 2 per GPU: BN 23.6 → "
            "34.7%, GN 24.1 → 24.1%)")


# -- 12. Gradient accumulation as a small-batch remedy --------------------------------------------------------

ACCUMULATION = Rule((Criterion("final test accuracy with a real batch of 32 − with 8 accumulated micro-batches of 4",
                               0.005, "within", unit="points", scale=100),),
                    evidence=lambda n: [n["real_batch_minus_accumulated"]])


def _accumulation(ctx: ClaimContext) -> ClaimResult:
    steps = protocols.ACCUMULATION_STEPS[ctx.protocol_name]
    cfg = protocols.PAPER_SGD.with_(batch_size=32, steps=steps, eval_every=max(1, steps // 5))
    mlp = protocols.PAPER_MLP
    arms = {
        "BN, real batch 32": Arm("BN/batch32", mlp.with_(norm="batch"), cfg),
        "BN, 8 micro-batches of 4 accumulated": Arm("BN/accumulate8x4", mlp.with_(norm="batch"), cfg.with_(accumulate=8)),
        "GroupNorm, 8 × 4 accumulated": Arm("GN/accumulate8x4", mlp.with_(norm="group"), cfg.with_(accumulate=8)),
    }
    accs, runs = {}, {}
    for label, summary in ctx.train_all("accumulation", arms).items():
        arm = arms[label]
        runs[arm.label] = [r["run_id"] for r in summary["per_seed"]]
        accs[label] = values(summary, "final_test_acc")
    labels = list(arms)
    numbers = {"final_test_acc": {label: mean_ci(v).to_dict() for label, v in accs.items()},
               "real_batch_minus_accumulated": welch_diff(accs[labels[0]], accs[labels[1]]).to_dict()}
    plot = ctx.figure("accumulation", "bars_with_ci", groups=["final test accuracy"],
                      series={label: [iv] for label, iv in numbers["final_test_acc"].items()},
                      title="Gradient accumulation vs a real batch (BN sees only the micro-batch)",
                      ylabel="test accuracy (%)", scale=100.0)
    protocol = (f"784-100-100-100-10 ReLU, plain SGD lr 0.1, {steps} optimizer steps of 32 samples each: one real "
                "batch of 32, or 8 micro-batches of 4 with their gradients summed (batch norm normalizes, and updates "
                "its running statistics, per micro-batch); GroupNorm with the same accumulation as a control that "
                "does not depend on the batch")
    return ctx.result("accumulation", protocol, "final test accuracy", numbers, runs, [plot])


# -- 13. Large batches and Ghost BN -------------------------------------------------------------------------

GHOST_RULE = Rule((Criterion("final test accuracy at the large batch, Ghost BN − plain BN", 0.005, unit="points",
                             scale=100),),
                  evidence=lambda n: [n["ghost_minus_large_bn"]])


def _ghost(ctx: ClaimContext) -> ClaimResult:
    p = protocols.GHOST[ctx.protocol_name]
    ratio = p["large"] // p["small"]
    every = protocols.GHOST_EVAL_EVERY_LARGE  # evaluations at the same numbers of samples seen in every arm
    base = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, batch_size=p["small"], epochs=p["epochs"],
                       scaling="unit", eval_every=every * ratio, drop_last=True)  # ghost batches must tile every batch
    large_lr = 0.1 * ratio ** 0.5  # Hoffer et al.'s square-root scaling
    large = base.with_(batch_size=p["large"], lr=large_lr, eval_every=every)
    small_label, large_label = f"small batch {p['small']}, BN", f"large batch {p['large']}, BN"
    ghost_label = f"large batch {p['large']}, Ghost BN {p['virtual']}"
    arms = {
        small_label: Arm("small/BN", protocols.PAPER_MLP.with_(norm="batch"), base),
        large_label: Arm("large/BN", protocols.PAPER_MLP.with_(norm="batch"), large),
        ghost_label: Arm("large/ghost", protocols.PAPER_MLP.with_(norm="ghost", virtual_batch_size=p["virtual"]), large),
    }
    summaries = ctx.train_all("ghost", arms)
    runs = {arm.label: [r["run_id"] for r in summaries[label]["per_seed"]] for label, arm in arms.items()}
    accs = {label: values(s, "final_test_acc") for label, s in summaries.items()}
    # curves over epochs: each arm's evaluation steps converted to samples seen, then to epochs
    n_train = summaries[small_label]["per_seed"][0]["total_steps"] * p["small"] / p["epochs"]
    samples = {label: [[(step * arm.cfg.batch_size, v) for step, v in c] for c in series(summaries[label], "test_acc")]
               for label, arm in arms.items()}
    small_at, large_at, ghost_at = (per_step(samples[k]) for k in (small_label, large_label, ghost_label))
    common = sorted(set(small_at) & set(large_at) & set(ghost_at))
    gap_curve = [(s / n_train, welch_diff(small_at[s], large_at[s]).to_dict()) for s in common]
    ghost_curve = [(s / n_train, welch_diff(ghost_at[s], large_at[s]).to_dict()) for s in common]
    numbers = {"final_test_acc": {label: mean_ci(v).to_dict() for label, v in accs.items()},
               "ghost_minus_large_bn": welch_diff(accs[ghost_label], accs[large_label]).to_dict(),
               "small_minus_large_bn": welch_diff(accs[small_label], accs[large_label]).to_dict(),
               "small_minus_large_bn_by_epoch": {f"{e:.3g}": iv for e, iv in gap_curve},
               "ghost_minus_large_bn_by_epoch": {f"{e:.3g}": iv for e, iv in ghost_curve}}
    bars = ctx.figure("ghost", "bars_with_ci", groups=["final test accuracy"],
                      series={label: [iv] for label, iv in numbers["final_test_acc"].items()},
                      title="Large batches: plain BN vs Ghost BN", ylabel="test accuracy (%)", scale=100.0)
    curves = ctx.figure("ghost-curves", "lines_with_ci",
                        series={f"{small_label} − {large_label}": gap_curve, f"Ghost BN − plain BN at {p['large']}": ghost_curve},
                        title="The large-batch gap over training (test accuracy difference, 95% CI over seeds)",
                        xlabel="epochs", ylabel="difference in test accuracy (points)", scale=100.0, markers=False,
                        hline=("no difference", 0.0))
    protocol = (f"784-100-100-100-10 ReLU with BN, SGD momentum 0.9, {p['epochs']} epochs for every arm (so the large "
                f"batch takes {ratio}× fewer steps), lr 0.1 at batch {p['small']} and {large_lr:.3g} (√ scaling) at "
                f"batch {p['large']}; Ghost BN with virtual batches of {p['virtual']}; test accuracy every "
                f"{every * p['large']} samples in every arm, so the gaps are also drawn over training (intermediate "
                "points on the engine's evaluation subset, the last on the full test set)")
    return ctx.result("ghost", protocol, "final test accuracy", numbers, runs, [bars, curves])


def _ours_ghost(numbers: dict) -> str:
    acc = list(numbers["final_test_acc"].values())
    return (f"small {100 * acc[0]['mean']:.2f}%, large {100 * acc[1]['mean']:.2f}%, large + Ghost BN "
            f"{100 * acc[2]['mean']:.2f}% (Hoffer et al., MNIST F1, with LR scaling: 98.27 / 97.55 / 97.60%)")


SMALL_BATCHES_CLAIM = Claim(
    "small-batches", 8, "BN degrades at small batches; GroupNorm/LayerNorm do not",
    "seed 000: 'Very small batch sizes (< 8): BatchNorm becomes less effective'; 'Very small batches: Consider "
    "LayerNormalization'; seed 004: 'BatchNorm also works best when batch sizes are reasonably large'",
    SMALL_BATCHES_RULE,
    "Wu & He 2018 Table 2 (ResNet-50, ImageNet val error by images per GPU 32→2): BN 23.6 → 34.7%, GN 24.1 → "
    "24.1%; Batch Renorm at 4 per GPU: 26.3% (BN 27.3, GN 24.2)",
    _small_batches, ours_vs_anchor=_ours_small_batches)

ACCUMULATION_CLAIM = Claim(
    "accumulation", 12, "Gradient accumulation fixes small-batch BN",
    "seed 000, 'Pitfall 3: Small Batch Sizes': 'If you must use small batches, consider: ... Accumulating "
    "gradients over multiple mini-batches'",
    ACCUMULATION,
    "no published number; pytorch/pytorch#46516: accumulation does not change what batch norm sees",
    _accumulation)

GHOST_CLAIM = Claim(
    "ghost", 13, "Ghost BN helps large-batch training",
    "seed 001: BN 'allows for scaling up training across many GPUs ... even with very large batch sizes'",
    GHOST_RULE,
    "Hoffer et al. 2017 (MNIST F1 network): small batch 98.27%, large batch 97.05%, +LR scaling 97.55%, "
    "+Ghost BN 97.60%, +longer training 98.53%",
    _ghost, ours_vs_anchor=_ours_ghost)
