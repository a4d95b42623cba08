"""Claims 4–6: how BN works. Ioffe & Szegedy's Figure 1, internal covariate shift measured two ways,
and the smoothness of the loss landscape (Santurkar et al.)."""

from __future__ import annotations

import torch

from bnlab.experiments.claims import protocols
from bnlab.experiments.claims.base import Arm, Claim, ClaimContext, ClaimResult, Criterion, Rule
from bnlab.experiments.claims.common import drift, mean_curve, one, preset, series, series_mean, single_seed
from bnlab.probes import gradient_ics, landscape, loss_surface, preactivation_percentiles
from bnlab.stats import first_step_reaching, mean_ci, welch_diff
from bnlab.train.runner import trained_models

ARMS = (("no BN", "none"), ("BN", "batch"))


# -- 4. Ioffe & Szegedy Figure 1 ------------------------------------------------------------------------------

IOFFE_FIGURE_1 = Rule((Criterion("steps to 95% test accuracy (90% in the quick protocol) without BN − with BN",
                                 unit="steps"),
                       Criterion("drift of the tracked sigmoid input's median without BN − with BN")),
                      evidence=lambda n: [one(n, "steps_to_", "_no_bn_minus_bn"), n["median_drift_no_bn_minus_bn"]])


def _ioffe_figure_1(ctx: ClaimContext) -> ClaimResult:
    spec, cfg = preset("ioffe-mlp")
    steps = protocols.IOFFE_STEPS[ctx.protocol_name]
    cfg = cfg.with_(epochs=None, steps=steps, eval_every=max(50, steps // 100))
    probe_x = ctx.dataset(cfg.dataset).tensors("test", scaling=cfg.scaling)[0][:1000]
    probe = preactivation_percentiles(probe_x, activation=torch.nn.Sigmoid, unit=0)
    arms = ctx.train_all("ioffe-figure-1", {label: Arm(label, spec.with_(norm=norm), cfg) for label, norm in ARMS},
                         probes={label: (probe,) for label, _ in ARMS})
    runs = {label: [r["run_id"] for r in s["per_seed"]] for label, s in arms.items()}
    threshold = protocols.IOFFE_THRESHOLD[ctx.protocol_name]
    to_threshold = {label: [first_step_reaching(c, threshold) or r["total_steps"]
                            for c, r in zip(series(s, "test_acc"), s["per_seed"])] for label, s in arms.items()}
    median_drift = {label: [drift(c) for c in series(s, "preact_p50")] for label, s in arms.items()}
    spread_drift = {label: [drift([(a, hi - lo) for (a, hi), (_, lo) in zip(p85, p15)])
                            for p85, p15 in zip(series(s, "preact_p85"), series(s, "preact_p15"))]
                    for label, s in arms.items()}
    percent = round(threshold * 100)
    numbers = {
        f"steps_to_{percent}": {label: mean_ci(v).to_dict() for label, v in to_threshold.items()},
        f"steps_to_{percent}_no_bn_minus_bn": welch_diff(to_threshold["no BN"], to_threshold["BN"]).to_dict(),
        "final_test_acc": {label: s["aggregate"]["final_test_acc"] for label, s in arms.items()},
        "median_drift_std": {label: mean_ci(v).to_dict() for label, v in median_drift.items()},
        "median_drift_no_bn_minus_bn": welch_diff(median_drift["no BN"], median_drift["BN"]).to_dict(),
        "p85_minus_p15_drift_std": {label: mean_ci(v).to_dict() for label, v in spread_drift.items()},
    }
    first = {label: s["series"][s["per_seed"][0]["run_id"]] for label, s in arms.items()}
    plot = ctx.figure(
        "ioffe-figure-1", "accuracy_and_percentiles",
        accuracy={label: mean_curve(s, "test_acc") for label, s in arms.items()},
        percentiles={label: {k: v for k, v in sr.items() if k.startswith("preact_")} for label, sr in first.items()},
        title="Ioffe & Szegedy Fig. 1 on MNIST: accuracy, and the 15/50/85th percentiles of one sigmoid input (seed 0)")
    protocol = (f"ioffe-mlp preset (784-100-100-100-10 sigmoid, BN before the sigmoid without bias, batch 60, SGD lr "
                f"{cfg.lr}, N(0, {spec.init_scale}²) init), {steps} steps; every {cfg.eval_every} steps: test accuracy, "
                "and the 15/50/85th percentiles of the input to the last hidden layer's sigmoid for unit 0 over 1000 "
                "fixed test images, measured in training mode on copies of the buffers; drift = std over "
                f"evaluation points (after the first 10% of training) of the median; speed = steps to "
                f"{threshold:.0%} test accuracy (runs that never get there count as their total steps)")
    return ctx.result("ioffe-figure-1", protocol,
                      f"steps to {threshold:.0%} test accuracy, and the drift of the sigmoid input's median",
                      numbers, runs, [plot])


def _ours_ioffe(numbers: dict) -> str:
    acc = numbers["final_test_acc"]
    return (f"final test accuracy {100 * acc['BN']['mean']:.2f}% with BN vs {100 * acc['no BN']['mean']:.2f}% "
            "without (reproductions: 98.0% vs 97.7%)")


# -- 5. Internal covariate shift, two ways -------------------------------------------------------------------

ICS = Rule((Criterion("drift of the sigmoid-input median without BN − with BN"),
            Criterion("Santurkar et al.'s gradient ICS (relative ℓ2) without BN − with BN", 0.01)),
           evidence=lambda n: [n["drift_no_bn_minus_bn"], n["relative_ics_no_bn_minus_bn"]])


def _ics(ctx: ClaimContext) -> ClaimResult:
    spec, cfg = preset("ioffe-mlp")
    steps = protocols.ICS_STEPS[ctx.protocol_name]
    cfg = cfg.with_(epochs=None, steps=steps, eval_every=max(50, steps // 50))
    dataset = ctx.dataset(cfg.dataset)
    train_x, train_y = dataset.tensors("train", scaling=cfg.scaling)
    probes = (preactivation_percentiles(dataset.tensors("test", scaling=cfg.scaling)[0][:1000]),
              gradient_ics(train_x[:256], train_y[:256], lr=cfg.lr))
    arms = ctx.train_all("ics", {label: Arm(label, spec.with_(norm=norm), cfg) for label, norm in ARMS},
                         probes=dict.fromkeys((label for label, _ in ARMS), probes))
    runs = {label: [r["run_id"] for r in s["per_seed"]] for label, s in arms.items()}
    per_seed = {label: {name: [series_mean(c) for c in series(s, name)] for name in ("ics_rel", "ics_cos", "ics_l2")}
                for label, s in arms.items()}
    median_drift = {label: [drift(c) for c in series(s, "preact_p50")] for label, s in arms.items()}
    numbers = {
        "distribution_drift_of_median": {label: mean_ci(v).to_dict() for label, v in median_drift.items()},
        "drift_no_bn_minus_bn": welch_diff(median_drift["no BN"], median_drift["BN"]).to_dict(),
        "gradient_ics_relative_l2": {label: mean_ci(v["ics_rel"]).to_dict() for label, v in per_seed.items()},
        "gradient_ics_cosine": {label: mean_ci(v["ics_cos"]).to_dict() for label, v in per_seed.items()},
        "gradient_ics_l2": {label: mean_ci(v["ics_l2"]).to_dict() for label, v in per_seed.items()},
        "relative_ics_no_bn_minus_bn": welch_diff(per_seed["no BN"]["ics_rel"], per_seed["BN"]["ics_rel"]).to_dict(),
    }
    plot = ctx.figure("ics", "lines_with_ci",
                      series={f"{label}: cos(G, G')": single_seed(series(s, "ics_cos")[0]) for label, s in arms.items()},
                      title="Gradient ICS at the last hidden layer (seed 0)", xlabel="training step",
                      ylabel="cosine of G and G' (1 = no shift)", markers=False)
    protocol = (f"ioffe-mlp preset, {steps} steps, with and without BN; every {cfg.eval_every} steps: (a) the 15/50/85th "
                "percentiles of one last-layer sigmoid input (drift = std of the median after the first 10%), and "
                "(b) Santurkar et al.'s Definition 2.1 at the last hidden layer on a fixed batch of 256 training "
                "images: G vs G' after the earlier layers take their SGD step; averaged after the first 10% of training")
    return ctx.result("ics", protocol, "distribution drift, and gradient-based ICS (relative ℓ2, cosine)", numbers,
                      runs, [plot])


def _ours_ics(numbers: dict) -> str:
    cos = numbers["gradient_ics_cosine"]
    return (f"cos(G, G') {cos['BN']['mean']:.3f} with BN vs {cos['no BN']['mean']:.3f} without (Santurkar et al.: "
            "lower, i.e. more ICS, with BN in VGG and deep linear nets)")


# -- 6. A smoother optimization landscape ------------------------------------------------------------------

LANDSCAPE = Rule((Criterion("effective β-smoothness without BN − with BN"),
                  Criterion("loss range along the gradient without BN − with BN")),
                 evidence=lambda n: [n["beta_eff_no_bn_minus_bn"], n["loss_range_no_bn_minus_bn"]])
LANDSCAPE_MEASURES = ("beta_eff", "loss_range", "grad_change", "step_length", "loss_range_at_length",
                      "grad_change_at_length")


def _landscape(ctx: ClaimContext) -> ClaimResult:
    spec, cfg = preset("ioffe-mlp")
    steps = protocols.LANDSCAPE_STEPS[ctx.protocol_name]
    cfg = cfg.with_(epochs=None, steps=steps, eval_every=max(50, steps // 20))
    dataset = ctx.dataset(cfg.dataset)
    train_x, train_y = dataset.tensors("train", scaling=cfg.scaling)
    probe = landscape(train_x[:256], train_y[:256], lr=cfg.lr, lengths=protocols.LANDSCAPE_LENGTHS)
    arms = ctx.train_all("landscape", {label: Arm(label, spec.with_(norm=norm), cfg) for label, norm in ARMS},
                         probes={label: (probe,) for label, _ in ARMS})
    runs = {label: [r["run_id"] for r in s["per_seed"]] for label, s in arms.items()}
    measured = [m for m in LANDSCAPE_MEASURES if all(all(series(s, m)) for s in arms.values())]
    per_seed = {label: {m: [series_mean(c) for c in series(s, m)] for m in measured} for label, s in arms.items()}
    numbers = {**{m: {label: mean_ci(v[m]).to_dict() for label, v in per_seed.items()} for m in measured},
               **{f"{m}_no_bn_minus_bn": welch_diff(per_seed["no BN"][m], per_seed["BN"][m]).to_dict()
                  for m in measured}}
    curve = ctx.figure("landscape-beta", "lines_with_ci",
                       series={f"{label}: β_eff": single_seed(series(s, "beta_eff")[0]) for label, s in arms.items()},
                       title="Effective β-smoothness along the gradient (seed 0)", xlabel="training step",
                       ylabel="max ‖∇L(θ−ηg) − g‖ / ‖ηg‖", markers=False)
    panels = {label: loss_surface(trained_models(ctx.store, s["group_id"])[0], train_x[:1000], train_y[:1000],
                                  points=protocols.SURFACE_POINTS) for label, s in arms.items()}
    surface = ctx.figure("landscape-surface", "loss_contours", panels=panels,
                         title="Training loss around the final weights, two random filter-normalized directions (seed 0)")
    protocol = (f"ioffe-mlp preset, {steps} steps, with and without BN; every {cfg.eval_every} steps on a fixed batch of "
                f"256 training images, with g the gradient: the loss and gradient at θ − η·g for η = lr × (0.5, 1, 2, 4) "
                "(Santurkar et al. use ½–4 × the step size); β_eff = max ‖∇L(θ−ηg) − g‖/‖ηg‖, loss range, gradient "
                "change, averaged after the first 10% of training; the same loss range and gradient change at matched "
                f"distances θ − d·g/‖g‖, d in {list(protocols.LANDSCAPE_LENGTHS)} (`*_at_length`; not part of the "
                "rule, which was fixed before), with the SGD step length ‖lr·g‖ of each net; plus the loss surface "
                f"around the final weights on a {protocols.SURFACE_POINTS}×{protocols.SURFACE_POINTS} grid along two "
                "filter-normalized random directions")
    return ctx.result("landscape", protocol, "effective β-smoothness and loss range along the gradient", numbers, runs,
                      [curve, surface])


def _ours_landscape(numbers: dict) -> str:
    beta = numbers["beta_eff"]
    return (f"β_eff {beta['no BN']['mean'] / max(1e-12, beta['BN']['mean']):.1f}× smaller with BN (MNIST MLP; "
            "Santurkar et al. report the gap on VGG/CIFAR-10 without a single ratio)")


IOFFE_FIGURE_1_CLAIM = Claim(
    "ioffe-figure-1", 4, "Ioffe & Szegedy Fig. 1: BN trains faster and steadies the sigmoid inputs",
    "seed 000: BN fixes 'internal covariate shift - the distribution of inputs to each layer keeps shifting'; "
    "seed 003: 'Normalizing neuron outputs within each batch reduces internal covariate shift'",
    IOFFE_FIGURE_1,
    "Ioffe & Szegedy 2015 Fig. 1: BN trains faster, reaches higher accuracy, and the {15, 50, 85}th "
    "percentiles stay stable while the baseline's move in mean and spread (no numbers published; "
    "reproductions report final accuracy 98.0% vs 97.7%)",
    _ioffe_figure_1, ours_vs_anchor=_ours_ioffe)

ICS_CLAIM = Claim(
    "ics", 5, "BN works by reducing internal covariate shift",
    "seed 000: 'Batch Normalization solves this [internal covariate shift] by ensuring that the inputs to each "
    "layer have a consistent, standardized distribution'; seed 002: 'By reducing the internal covariate shift, "
    "Batch Normalization helps the network converge faster'",
    ICS,
    "Santurkar et al. 2018 Fig. 3 (VGG layers 5/10, deep linear net layers 9/17): 'networks with BatchNorm "
    "often exhibit an increase in ICS'; in the deep linear net the standard network shows almost no ICS while "
    "with BN G and G' are almost uncorrelated",
    _ics, ours_vs_anchor=_ours_ics)

LANDSCAPE_CLAIM = Claim(
    "landscape", 6, "BN smooths the optimization landscape",
    "seed 001: 'Modern research suggests Batch Norm's primary benefit is making the optimization landscape "
    "significantly smoother'; seed 003: BN 'results in a smoother contour plot'",
    LANDSCAPE,
    "Santurkar et al. 2018 Fig. 4 (VGG on CIFAR-10): with BN the loss range, gradient predictiveness range and "
    "β_eff are all smaller, the gradient gap 'close to two orders of magnitude ... especially early in training'",
    _landscape, ours_vs_anchor=_ours_landscape)
