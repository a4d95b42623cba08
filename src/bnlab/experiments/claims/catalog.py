"""The claims, each a protocol, a statistic and a verdict rule fixed here, before any run."""

from __future__ import annotations

import copy

import torch

from bnlab.experiments.claims.base import Arm, Claim, ClaimContext, ClaimResult, Criterion, Rule
from bnlab.models import PRESETS, ModelSpec
from bnlab.probes import gradient_ics, landscape, loss_surface, preactivation_percentiles
from bnlab.experiments.plots import accuracy_and_percentiles, bars_with_ci, lines_with_ci, loss_contours
from bnlab.stats import first_step_reaching, mean_ci, welch_diff
from bnlab.train import TrainConfig, prepare_data
from bnlab.train.runner import StartFrom, trained_models

__all__ = ["CLAIMS"]

# The 784-100-100-100-10 network of Ioffe & Szegedy §4.1, as used by the Udacity lesson whose table
# anchors claims 2 and 3: batch 60, plain SGD, pixels in [0, 1], bias dropped before a norm.
PAPER_MLP = ModelSpec(hidden=(100, 100, 100), activation="relu", init="normal", init_scale=0.05,
                      bias_before_norm=False)
PAPER_SGD = TrainConfig(optimizer="sgd", lr=0.1, batch_size=60, steps=1000, scaling="unit", eval_every=100)

# Protocol sizes, quick / full. The full sizes follow the sources (Udacity's lesson ran 50k steps;
# 10k already separates the arms there); quick keeps the whole suite within minutes.
STEPS = {
    "higher-lr": {"quick": 800, "full": 10000},
    "init-sensitivity": {"quick": 800, "full": 5000},
    "placement": {"quick": 1000, "full": 10000},
}
IOFFE_STEPS = {"quick": 3000, "full": 50000}  # the paper's 50k steps in full
IOFFE_THRESHOLD = {"quick": 0.90, "full": 0.95}  # a 3000-step sigmoid net does not reach 95%
ICS_STEPS = {"quick": 3000, "full": 10000}
LANDSCAPE_STEPS = {"quick": 2000, "full": 10000}
SURFACE_POINTS = 21
SMALL_BATCH_SAMPLES = {"quick": 9600, "full": 60000}  # samples seen per run, equal for every batch size
SMALL_BATCHES = (2, 4, 8, 16, 32)
GHOST = {"quick": {"epochs": 3, "large": 2048, "small": 128, "virtual": 128},
         "full": {"epochs": 10, "large": 4096, "small": 128, "virtual": 128}}
REGULARIZATION_EPOCHS = {"quick": 2, "full": 10}
ACCUMULATION_STEPS = {"quick": 300, "full": 1875}  # full: one epoch at batch 32
FINETUNE_STEPS = {"quick": 300, "full": 2000}
REESTIMATE_BATCHES = 50
QUICK_EPOCHS = 1  # torch-mlp length for the quick protocol of claims 1, 9 and 14 (full: the preset's 5)


def _preset(name: str, epochs: float | None = None) -> tuple[ModelSpec, TrainConfig]:
    preset = PRESETS[name]
    train = dict(preset["train"])
    if epochs is not None:
        train.pop("steps", None)
        train["epochs"] = epochs
    return ModelSpec.from_dict(preset["model"]), TrainConfig.from_dict(train)


def _values(summary: dict, key: str, censor_at_total: bool = False) -> list[float]:
    out = []
    for row in summary["per_seed"]:
        value = row.get(key)
        if value is None and censor_at_total:
            value = row["total_steps"]
        if value is not None:
            out.append(float(value))
    return out


def _one(numbers: dict, prefix: str = "", suffix: str = "") -> dict:
    """The one entry of ``numbers`` whose key starts with ``prefix`` and ends with ``suffix`` (the part
    between names a value that depends on the protocol: a learning rate, a threshold, a norm)."""
    (key,) = [k for k in numbers if k.startswith(prefix) and k.endswith(suffix)]
    return numbers[key]


def _plot(ctx: ClaimContext, name: str) -> str:
    """Where a claim's plot goes; named by protocol, so a quick run never overwrites a full one."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    return str(ctx.out_dir / f"{name}.{ctx.protocol_name}.png")


# -- 1. BN trains faster ---------------------------------------------------------------------------------


TRAINS_FASTER = Rule((Criterion("steps to 95% test accuracy without BN − with BN"),), each="recipe",
                     evidence=lambda n: {recipe: [v["difference_no_bn_minus_bn"]] for recipe, v in n.items()})


def _trains_faster(ctx: ClaimContext) -> ClaimResult:
    recipes = {"torch-mlp": QUICK_EPOCHS} if ctx.quick else {"torch-mlp": None, "keras-mlp": None, "keras-cnn": None}
    numbers, runs = {}, {}
    for recipe, epochs in recipes.items():
        spec, cfg = _preset(recipe, epochs)
        arms = {label: ctx.train("trains-faster", Arm(f"{recipe}/{label}", spec.with_(norm=norm), cfg))
                for label, norm in (("no BN", "none"), ("BN", "batch"))}
        for label, summary in arms.items():
            runs[f"{recipe}/{label}"] = [r["run_id"] for r in summary["per_seed"]]
        steps = {label: _values(s, "steps_to_95", censor_at_total=True) for label, s in arms.items()}
        diff = welch_diff(steps["no BN"], steps["BN"])
        numbers[recipe] = {
            "steps_to_95_no_bn": mean_ci(steps["no BN"]).to_dict(),
            "steps_to_95_bn": mean_ci(steps["BN"]).to_dict(),
            "difference_no_bn_minus_bn": diff.to_dict(),
            "ratio_of_means": mean_ci(steps["no BN"]).mean / max(1e-9, mean_ci(steps["BN"]).mean),
            "not_reached": {label: s["aggregate"]["steps_to_95"]["of"] - s["aggregate"]["steps_to_95"]["reached"]
                            for label, s in arms.items()},
            "final_test_acc": {label: s["aggregate"]["final_test_acc"] for label, s in arms.items()},
        }
    plot = bars_with_ci(
        _plot(ctx, "trains-faster"), list(recipes),
        {"no BN": [numbers[r]["steps_to_95_no_bn"] for r in recipes], "BN": [numbers[r]["steps_to_95_bn"] for r in recipes]},
        title="Steps to 95% test accuracy (mean, 95% CI over seeds)", ylabel="training steps")
    cadence = ", ".join(f"{r}: every {_preset(r)[1].eval_every}" for r in recipes)
    protocol = (f"recipes {', '.join(f'{r} ({e} epoch)' if e else r for r, e in recipes.items())} as in "
                f"`bnlab presets`; test accuracy evaluated every N steps ({cadence}; 4× as often during the first "
                "2N), so steps-to-95% is known to that resolution; a run that never reaches 95% counts as its "
                "total steps (a lower bound)")
    return ClaimResult("trains-faster", ctx.protocol_name, protocol, ctx.seeds, "steps to 95% test accuracy",
                       numbers, None, None, [plot], runs, 0.0)


# -- 2. BN tolerates higher learning rates ------------------------------------------------------------------


def _sweep_plot(ctx, name, results, title, xlabel):
    series = {}
    for (act, label), points in results.items():
        series[f"{act}, {label}"] = [(x, iv) for x, iv in points]
    return lines_with_ci(_plot(ctx, name), series, title=title, xlabel=xlabel, ylabel="final test accuracy (%)",
                         logx=True, scale=100.0)


HIGHER_LR = Rule((Criterion("final test accuracy of the ReLU net at the largest learning rate, BN − no BN", 0.05,
                       unit="points", scale=100),),
            evidence=lambda n: [_one(n, prefix="relu_bn_minus_no_bn_at_lr_")])


def _higher_lr(ctx: ClaimContext) -> ClaimResult:
    lrs = (0.01, 0.1, 1.0, 2.0) if ctx.quick else (0.01, 0.1, 0.5, 1.0, 2.0)
    steps = STEPS["higher-lr"][ctx.protocol_name]
    results, runs, finals = {}, {}, {}
    for act in ("relu", "sigmoid"):
        for label, norm in (("no BN", "none"), ("BN", "batch")):
            points = []
            for lr in lrs:
                arm = Arm(f"{act}/{label}/lr{lr}", PAPER_MLP.with_(activation=act, norm=norm),
                          PAPER_SGD.with_(lr=lr, steps=steps, eval_every=max(100, steps // 10)))
                summary = ctx.train("higher-lr", arm)
                runs[arm.label] = [r["run_id"] for r in summary["per_seed"]]
                accs = _values(summary, "final_test_acc")
                finals[(act, label, lr)] = accs
                points.append((lr, mean_ci(accs).to_dict()))
            results[(act, label)] = points
    top = max(lrs)
    diff = welch_diff(finals[("relu", "BN", top)], finals[("relu", "no BN", top)])
    numbers = {
        "final_test_acc": {f"{act}, {label}": {str(lr): iv for lr, iv in pts} for (act, label), pts in results.items()},
        f"relu_bn_minus_no_bn_at_lr_{top}": diff.to_dict(),
        f"sigmoid_bn_minus_no_bn_at_lr_{top}": welch_diff(finals[("sigmoid", "BN", top)],
                                                          finals[("sigmoid", "no BN", top)]).to_dict(),
    }
    plot = _sweep_plot(ctx, "higher-lr", results, "Final test accuracy vs learning rate (784-100x3-10)",
                       "learning rate (SGD)")
    protocol = (f"784-100-100-100-10, ReLU and sigmoid, BN before the activation (no bias), N(0, 0.05²) init, "
                f"plain SGD, batch 60, {steps} steps, learning rates {list(lrs)}, MNIST pixels in [0, 1]")
    return ClaimResult("higher-lr", ctx.protocol_name, protocol, ctx.seeds, "final test accuracy", numbers, None,
                       None, [plot], runs, 0.0)


# -- 3. BN makes training less sensitive to initialization -------------------------------------------------


INIT_SENSITIVITY = Rule((Criterion("final test accuracy at each network's worst initialization, BN − no BN", 0.05,
                              unit="points", scale=100),),
            evidence=lambda n: [n["bn_worst_minus_no_bn_worst"]])


def _init_sensitivity(ctx: ClaimContext) -> ClaimResult:
    scales = (0.01, 0.1, 1.0, 5.0) if ctx.quick else (0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0)
    steps = STEPS["init-sensitivity"][ctx.protocol_name]
    results, runs, finals = {}, {}, {}
    for label, norm in (("no BN", "none"), ("BN", "batch")):
        points = []
        for scale in scales:
            arm = Arm(f"{label}/std{scale}", PAPER_MLP.with_(norm=norm, init_scale=scale),
                      PAPER_SGD.with_(lr=0.1, steps=steps, eval_every=max(100, steps // 10)))
            summary = ctx.train("init-sensitivity", arm)
            runs[arm.label] = [r["run_id"] for r in summary["per_seed"]]
            finals[(label, scale)] = _values(summary, "final_test_acc")
            points.append((scale, mean_ci(finals[(label, scale)]).to_dict()))
        results[("relu", label)] = points

    def worst(label):
        return min(scales, key=lambda s: mean_ci(finals[(label, s)]).mean)

    diff = welch_diff(finals[("BN", worst("BN"))], finals[("no BN", worst("no BN"))])
    spread = {label: max(mean_ci(finals[(label, s)]).mean for s in scales) - min(mean_ci(finals[(label, s)]).mean
                                                                                 for s in scales)
              for label in ("no BN", "BN")}
    numbers = {
        "final_test_acc": {label: {str(s): iv for s, iv in pts} for (_, label), pts in results.items()},
        "worst_init": {label: worst(label) for label in ("no BN", "BN")},
        "bn_worst_minus_no_bn_worst": diff.to_dict(),
        "spread_best_minus_worst": spread,
    }
    plot = _sweep_plot(ctx, "init-sensitivity", results, "Final test accuracy vs initial weight std (ReLU)",
                       "std of the initial weights")
    protocol = (f"784-100-100-100-10 ReLU, N(0, std²) init with std in {list(scales)}, plain SGD lr 0.1, "
                f"batch 60, {steps} steps, with and without BN")
    return ClaimResult("init-sensitivity", ctx.protocol_name, protocol, ctx.seeds,
                       "final test accuracy at the worst initialization", numbers, None, None, [plot], runs, 0.0)


# -- 4. Ioffe & Szegedy Figure 1 ------------------------------------------------------------------------------


def _drift(series: list[tuple[int, float]], skip_fraction: float = 0.1) -> float:
    """Standard deviation over evaluation points of a percentile, after the first part of training."""
    if not series:
        return float("nan")
    last = series[-1][0]
    values = torch.tensor([v for s, v in series if s >= skip_fraction * last], dtype=torch.float64)
    return float(values.std()) if len(values) > 1 else 0.0


def _mean_curve(summary: dict, name: str) -> list[tuple[int, float]]:
    curves = [dict(summary["series"][r["run_id"]].get(name, [])) for r in summary["per_seed"]]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return [(s, sum(c[s] for c in curves) / len(curves)) for s in steps]


IOFFE_FIGURE_1 = Rule((Criterion("steps to 95% test accuracy (90% in the quick protocol) without BN − with BN"),
                       Criterion("drift of the tracked sigmoid input's median without BN − with BN")),
            evidence=lambda n: [_one(n, "steps_to_", "_no_bn_minus_bn"), n["median_drift_no_bn_minus_bn"]])


def _ioffe_figure_1(ctx: ClaimContext) -> ClaimResult:
    spec, cfg = _preset("ioffe-mlp")
    steps = IOFFE_STEPS[ctx.protocol_name]
    cfg = cfg.with_(epochs=None, steps=steps, eval_every=max(50, steps // 100))
    probe_x = ctx.dataset(cfg.dataset).tensors("test", scaling=cfg.scaling)[0][:1000]
    probe = preactivation_percentiles(probe_x, activation=torch.nn.Sigmoid, unit=0)
    arms, runs = {}, {}
    for label, norm in (("no BN", "none"), ("BN", "batch")):
        arms[label] = ctx.train("ioffe-figure-1", Arm(label, spec.with_(norm=norm), cfg), probes=(probe,))
        runs[label] = [r["run_id"] for r in arms[label]["per_seed"]]
    threshold = IOFFE_THRESHOLD[ctx.protocol_name]
    to95 = {label: [first_step_reaching(s["series"][r["run_id"]].get("test_acc", []), threshold) or r["total_steps"]
                    for r in s["per_seed"]] for label, s in arms.items()}
    drift = {label: [_drift(s["series"][r["run_id"]].get("preact_p50", [])) for r in s["per_seed"]]
             for label, s in arms.items()}
    spread = {label: [_drift([(a, hi - lo) for (a, hi), (_, lo) in zip(s["series"][r["run_id"]].get("preact_p85", []),
                                                                      s["series"][r["run_id"]].get("preact_p15", []))])
                      for r in s["per_seed"]] for label, s in arms.items()}
    speed = welch_diff(to95["no BN"], to95["BN"])
    steadier = welch_diff(drift["no BN"], drift["BN"])
    numbers = {
        f"steps_to_{round(threshold * 100)}": {label: mean_ci(v).to_dict() for label, v in to95.items()},
        f"steps_to_{round(threshold * 100)}_no_bn_minus_bn": speed.to_dict(),
        "final_test_acc": {label: s["aggregate"]["final_test_acc"] for label, s in arms.items()},
        "median_drift_std": {label: mean_ci(v).to_dict() for label, v in drift.items()},
        "median_drift_no_bn_minus_bn": steadier.to_dict(),
        "p85_minus_p15_drift_std": {label: mean_ci(v).to_dict() for label, v in spread.items()},
    }
    first = {label: s["series"][s["per_seed"][0]["run_id"]] for label, s in arms.items()}
    plot = accuracy_and_percentiles(
        _plot(ctx, "ioffe-figure-1"), {label: _mean_curve(s, "test_acc") for label, s in arms.items()},
        {label: {k: v for k, v in series.items() if k.startswith("preact_")} for label, series in first.items()},
        title="Ioffe & Szegedy Fig. 1 on MNIST: accuracy, and the 15/50/85th percentiles of one sigmoid input (seed 0)")
    protocol = (f"ioffe-mlp preset (784-100-100-100-10 sigmoid, BN before the sigmoid without bias, batch 60, SGD lr "
                f"{cfg.lr}, N(0, {spec.init_scale}²) init), {steps} steps; every {cfg.eval_every} steps: test accuracy, "
                "and the 15/50/85th percentiles of the input to the last hidden layer's sigmoid for unit 0 over 1000 "
                "fixed test images, measured in training mode on copies of the buffers; drift = std over "
                f"evaluation points (after the first 10% of training) of the median; speed = steps to "
                f"{threshold:.0%} test accuracy (runs that never get there count as their total steps)")
    return ClaimResult("ioffe-figure-1", ctx.protocol_name, protocol, ctx.seeds,
                       f"steps to {threshold:.0%} test accuracy, and the drift of the sigmoid input's median", numbers, None,
                       None, [plot], runs, 0.0)


# -- 5. Internal covariate shift, two ways -------------------------------------------------------------------


def _series_mean(series: list[tuple[int, float]], skip_fraction: float = 0.1) -> float:
    if not series:
        return float("nan")
    last = series[-1][0]
    values = [v for s, v in series if s >= skip_fraction * last and v is not None]
    return sum(values) / len(values) if values else float("nan")


ICS = Rule((Criterion("drift of the sigmoid-input median without BN − with BN"),
            Criterion("Santurkar et al.'s gradient ICS (relative ℓ2) without BN − with BN", 0.01)),
            evidence=lambda n: [n["drift_no_bn_minus_bn"], n["relative_ics_no_bn_minus_bn"]])


def _ics(ctx: ClaimContext) -> ClaimResult:
    spec, cfg = _preset("ioffe-mlp")
    steps = ICS_STEPS[ctx.protocol_name]
    cfg = cfg.with_(epochs=None, steps=steps, eval_every=max(50, steps // 50))
    dataset = ctx.dataset(cfg.dataset)
    train_x, train_y = dataset.tensors("train", scaling=cfg.scaling)
    probes = (preactivation_percentiles(dataset.tensors("test", scaling=cfg.scaling)[0][:1000]),
              gradient_ics(train_x[:256], train_y[:256], lr=cfg.lr))
    arms, runs = {}, {}
    for label, norm in (("no BN", "none"), ("BN", "batch")):
        arms[label] = ctx.train("ics", Arm(label, spec.with_(norm=norm), cfg), probes=probes)
        runs[label] = [r["run_id"] for r in arms[label]["per_seed"]]
    per_seed = {label: {name: [_series_mean(s["series"][r["run_id"]].get(name, [])) for r in s["per_seed"]]
                        for name in ("ics_rel", "ics_cos", "ics_l2")} for label, s in arms.items()}
    drift = {label: [_drift(s["series"][r["run_id"]].get("preact_p50", [])) for r in s["per_seed"]]
             for label, s in arms.items()}
    drift_less = welch_diff(drift["no BN"], drift["BN"])
    ics_less = welch_diff(per_seed["no BN"]["ics_rel"], per_seed["BN"]["ics_rel"])
    numbers = {
        "distribution_drift_of_median": {label: mean_ci(v).to_dict() for label, v in drift.items()},
        "drift_no_bn_minus_bn": drift_less.to_dict(),
        "gradient_ics_relative_l2": {label: mean_ci(v["ics_rel"]).to_dict() for label, v in per_seed.items()},
        "gradient_ics_cosine": {label: mean_ci(v["ics_cos"]).to_dict() for label, v in per_seed.items()},
        "gradient_ics_l2": {label: mean_ci(v["ics_l2"]).to_dict() for label, v in per_seed.items()},
        "relative_ics_no_bn_minus_bn": ics_less.to_dict(),
    }
    series = {}
    for label, s in arms.items():
        first = s["series"][s["per_seed"][0]["run_id"]]
        series[f"{label}: cos(G, G')"] = [(step, {"mean": v, "low": v, "high": v}) for step, v in first.get("ics_cos", [])]
    plot = lines_with_ci(_plot(ctx, "ics"), series, title="Gradient ICS at the last hidden layer (seed 0)",
                         xlabel="training step", ylabel="cosine of G and G' (1 = no shift)")
    protocol = (f"ioffe-mlp preset, {steps} steps, with and without BN; every {cfg.eval_every} steps: (a) the 15/50/85th "
                "percentiles of one last-layer sigmoid input (drift = std of the median after the first 10%), and "
                "(b) Santurkar et al.'s Definition 2.1 at the last hidden layer on a fixed batch of 256 training "
                "images: G vs G' after the earlier layers take their SGD step; averaged after the first 10% of training")
    return ClaimResult("ics", ctx.protocol_name, protocol, ctx.seeds,
                       "distribution drift, and gradient-based ICS (relative ℓ2, cosine)", numbers, None, None,
                       [plot], runs, 0.0)


# -- 6. A smoother optimization landscape ------------------------------------------------------------------


LANDSCAPE = Rule((Criterion("effective β-smoothness without BN − with BN"),
                  Criterion("loss range along the gradient without BN − with BN")),
            evidence=lambda n: [n["beta_eff_no_bn_minus_bn"], n["loss_range_no_bn_minus_bn"]])


def _landscape(ctx: ClaimContext) -> ClaimResult:
    spec, cfg = _preset("ioffe-mlp")
    steps = LANDSCAPE_STEPS[ctx.protocol_name]
    cfg = cfg.with_(epochs=None, steps=steps, eval_every=max(50, steps // 20))
    dataset = ctx.dataset(cfg.dataset)
    train_x, train_y = dataset.tensors("train", scaling=cfg.scaling)
    probe = landscape(train_x[:256], train_y[:256], lr=cfg.lr)
    arms, runs = {}, {}
    for label, norm in (("no BN", "none"), ("BN", "batch")):
        arms[label] = ctx.train("landscape", Arm(label, spec.with_(norm=norm), cfg), probes=(probe,))
        runs[label] = [r["run_id"] for r in arms[label]["per_seed"]]
    names = ("beta_eff", "loss_range", "grad_change")
    per_seed = {label: {n: [_series_mean(s["series"][r["run_id"]].get(n, [])) for r in s["per_seed"]] for n in names}
                for label, s in arms.items()}
    diffs = {n: welch_diff(per_seed["no BN"][n], per_seed["BN"][n]) for n in names}
    numbers = {**{n: {label: mean_ci(v[n]).to_dict() for label, v in per_seed.items()} for n in names},
               **{f"{n}_no_bn_minus_bn": d.to_dict() for n, d in diffs.items()}}
    series = {}
    for label, s in arms.items():
        first = s["series"][s["per_seed"][0]["run_id"]]
        series[f"{label}: β_eff"] = [(st, {"mean": v, "low": v, "high": v}) for st, v in first.get("beta_eff", [])]
    curve = lines_with_ci(_plot(ctx, "landscape-beta"), series, title="Effective β-smoothness along the gradient (seed 0)",
                          xlabel="training step", ylabel="max ‖∇L(θ−ηg) − g‖ / ‖ηg‖")
    panels = {label: loss_surface(trained_models(ctx.store, s["group_id"])[0], train_x[:1000], train_y[:1000],
                                  points=SURFACE_POINTS)
              for label, s in arms.items()}
    surface = loss_contours(_plot(ctx, "landscape-surface"), panels,
                            title="Training loss around the final weights, two random filter-normalized directions (seed 0)")
    protocol = (f"ioffe-mlp preset, {steps} steps, with and without BN; every {cfg.eval_every} steps on a fixed batch of "
                f"256 training images, with g the gradient: the loss and gradient at θ − η·g for η = lr × (0.5, 1, 2, 4) "
                "(Santurkar et al. use ½–4 × the step size); β_eff = max ‖∇L(θ−ηg) − g‖/‖ηg‖, loss range, gradient "
                "change, averaged after the first 10% of training; plus the loss surface around the final weights "
                f"on a {SURFACE_POINTS}×{SURFACE_POINTS} grid along two filter-normalized random directions")
    return ClaimResult("landscape", ctx.protocol_name, protocol, ctx.seeds,
                       "effective β-smoothness and loss range along the gradient", numbers, None, None,
                       [curve, surface], runs, 0.0)


# -- 7. Placement before vs after the activation -------------------------------------------------------------


PLACEMENT = Rule((Criterion("final test accuracy with BN before − after the activation", 0.005, unit="points", scale=100),),
                 each="activation (ReLU, sigmoid)",
                 evidence=lambda n: {act: [n[act]["before_minus_after"]] for act in ("relu", "sigmoid")})


def _placement(ctx: ClaimContext) -> ClaimResult:
    steps = STEPS["placement"][ctx.protocol_name]
    numbers, runs, intervals = {}, {}, {"before": [], "after": []}
    for act in ("relu", "sigmoid"):
        accs = {}
        for placement in ("before", "after"):
            arm = Arm(f"{act}/{placement}", PAPER_MLP.with_(activation=act, norm="batch", placement=placement),
                      PAPER_SGD.with_(lr=0.1, steps=steps, eval_every=max(100, steps // 10)))
            summary = ctx.train("placement", arm)
            runs[arm.label] = [r["run_id"] for r in summary["per_seed"]]
            accs[placement] = _values(summary, "final_test_acc")
            intervals[placement].append(mean_ci(accs[placement]).to_dict())
        diff = welch_diff(accs["before"], accs["after"])
        numbers[act] = {"before": intervals["before"][-1], "after": intervals["after"][-1],
                        "before_minus_after": diff.to_dict()}
    plot = bars_with_ci(_plot(ctx, "placement"), ["relu", "sigmoid"], intervals,
                        title="Final test accuracy by BN placement", ylabel="test accuracy (%)", scale=100.0)
    protocol = (f"784-100-100-100-10 with BN before (linear→BN→act) or after (linear→act→BN) the activation, "
                f"ReLU and sigmoid, N(0, 0.05²) init, plain SGD lr 0.1, batch 60, {steps} steps")
    return ClaimResult("placement", ctx.protocol_name, protocol, ctx.seeds, "final test accuracy, before − after",
                       numbers, None, None, [plot], runs, 0.0)


# -- 8. Small batches ------------------------------------------------------------------------------------


SMALL_BATCHES_RULE = Rule((Criterion(f"BN's final test accuracy at batch {SMALL_BATCHES[-1]} − at batch {SMALL_BATCHES[0]}",
                                0.01, unit="points", scale=100),
                           Criterion(f"final test accuracy at batch {SMALL_BATCHES[0]}, the better of GroupNorm and "
                                "LayerNorm − BN", 0.01, unit="points", scale=100)),
            evidence=lambda n: [n[f"bn_batch{SMALL_BATCHES[-1]}_minus_batch{SMALL_BATCHES[0]}"], _one(n, suffix=f"_minus_bn_at_batch{SMALL_BATCHES[0]}")])


def _small_batches(ctx: ClaimContext) -> ClaimResult:
    samples = SMALL_BATCH_SAMPLES[ctx.protocol_name]
    norms = {"BatchNorm": "batch", "GroupNorm": "group", "LayerNorm": "layer", "Batch Renorm": "renorm"}
    finals, runs, series = {}, {}, {}
    for label, norm in norms.items():
        points = []
        for b in SMALL_BATCHES:
            steps = max(1, samples // b)
            arm = Arm(f"{label}/batch{b}", PAPER_MLP.with_(norm=norm),
                      PAPER_SGD.with_(batch_size=b, lr=0.1 * b / 32, steps=steps, eval_every=max(1, steps // 5)))
            summary = ctx.train("small-batches", arm)
            runs[arm.label] = [r["run_id"] for r in summary["per_seed"]]
            finals[(label, b)] = _values(summary, "final_test_acc")
            points.append((b, mean_ci(finals[(label, b)]).to_dict()))
        series[label] = points
    smallest, largest = SMALL_BATCHES[0], SMALL_BATCHES[-1]
    bn_loss = welch_diff(finals[("BatchNorm", largest)], finals[("BatchNorm", smallest)])
    best_alt = max(("GroupNorm", "LayerNorm"), key=lambda n: mean_ci(finals[(n, smallest)]).mean)
    alt_gain = welch_diff(finals[(best_alt, smallest)], finals[("BatchNorm", smallest)])
    numbers = {
        "final_test_acc": {label: {str(b): iv for b, iv in pts} for label, pts in series.items()},
        f"bn_batch{largest}_minus_batch{smallest}": bn_loss.to_dict(),
        f"{best_alt}_minus_bn_at_batch{smallest}": alt_gain.to_dict(),
    }
    plot = lines_with_ci(_plot(ctx, "small-batches"), series, title="Final test accuracy vs batch size (LR ∝ batch)",
                         xlabel="batch size", ylabel="final test accuracy (%)", logx=True, scale=100.0)
    protocol = (f"784-100-100-100-10 ReLU with each norm before the activation, plain SGD with lr = 0.1·B/32 "
                f"(linear scaling as Wu & He), {samples} training samples seen at every batch size B in "
                f"{list(SMALL_BATCHES)}; GroupNorm with 25 groups of 4 features; Batch Renorm with fixed r_max=3, "
                "d_max=5 (no warm-up schedule); models evaluated in eval mode")
    return ClaimResult("small-batches", ctx.protocol_name, protocol, ctx.seeds, "final test accuracy", numbers,
                       None, None, [plot], runs, 0.0)


# -- 9. Train mode vs eval mode at inference ----------------------------------------------------------------


EVAL_BATCHES = (2, 4, 8, 16, 50, 100, 1000)  # all divide the 10,000 test images


@torch.no_grad()
def _accuracy(model, x, y, batch) -> float:
    correct = 0
    for start in range(0, len(x), batch):
        correct += (model(x[start : start + batch]).argmax(1) == y[start : start + batch]).sum().item()
    return correct / len(x)


TRAIN_VS_EVAL = Rule((Criterion(f"test accuracy in eval mode − in train mode with evaluation batches of {EVAL_BATCHES[0]}",
                           0.01, unit="points", scale=100),),
            evidence=lambda n: [n["drop_by_eval_batch"][str(EVAL_BATCHES[0])]])


def _train_vs_eval(ctx: ClaimContext) -> ClaimResult:
    spec, cfg = _preset("torch-mlp", QUICK_EPOCHS if ctx.quick else None)
    spec = spec.with_(norm="batch")
    arm = Arm("torch-mlp/BN", spec, cfg)  # the same arm as claim 1: trained once, shared through the store
    summary = ctx.train("trains-faster", arm)
    data = prepare_data(ctx.dataset(cfg.dataset), cfg, spec)
    models = trained_models(ctx.store, summary["group_id"])
    eval_acc, train_acc = [], {b: [] for b in EVAL_BATCHES}
    for model in models:
        model.eval()
        eval_acc.append(_accuracy(model, data.test_x, data.test_y, 1000))
        forgot = copy.deepcopy(model).train()  # a copy: batch statistics, and its running stats may move
        for b in EVAL_BATCHES:
            train_acc[b].append(_accuracy(forgot, data.test_x, data.test_y, b))
    drops = {b: welch_diff(eval_acc, train_acc[b]) for b in EVAL_BATCHES}
    numbers = {
        "eval_mode_acc": mean_ci(eval_acc).to_dict(),
        "train_mode_acc_by_eval_batch": {str(b): mean_ci(v).to_dict() for b, v in train_acc.items()},
        "drop_by_eval_batch": {str(b): d.to_dict() for b, d in drops.items()},
    }
    plot = lines_with_ci(_plot(ctx, "train-vs-eval"),
                         {"model left in train mode": [(b, mean_ci(train_acc[b]).to_dict()) for b in EVAL_BATCHES]},
                         title="Test accuracy of a BN model evaluated in train mode", xlabel="evaluation batch size",
                         ylabel="test accuracy (%)", logx=True, scale=100.0,
                         hline=("eval mode (running statistics)", mean_ci(eval_acc).mean))
    protocol = (f"the torch-mlp BN models of claim 1 ({f'{QUICK_EPOCHS} epoch' if ctx.quick else 'full recipe'}), evaluated on "
                f"the test set in eval mode and, as if model.eval() were forgotten, in train mode with evaluation "
                f"batches of {list(EVAL_BATCHES)}")
    return ClaimResult("train-vs-eval", ctx.protocol_name, protocol, ctx.seeds,
                       "test accuracy lost by evaluating in train mode", numbers, None, None, [plot],
                       {arm.label: [r["run_id"] for r in summary["per_seed"]]}, 0.0)


# -- 10. Regularization: BN, Dropout, both ------------------------------------------------------------------


REGULARIZATION = Rule((Criterion("train–test accuracy gap without BN − with BN", 0.001, unit="points", scale=100),),
            evidence=lambda n: [n["gap_neither_minus_bn"]])


def _regularization(ctx: ClaimContext) -> ClaimResult:
    spec, cfg = _preset("torch-mlp", REGULARIZATION_EPOCHS[ctx.protocol_name])
    arms = {
        "neither": spec.with_(norm="none"),
        "BN": spec.with_(norm="batch"),
        "Dropout 0.3": spec.with_(norm="none", dropout=0.3),
        "BN then Dropout": spec.with_(norm="batch", dropout=0.3, dropout_position="after_norm"),
        "Dropout then BN": spec.with_(norm="batch", dropout=0.3, dropout_position="before_norm"),
    }
    gaps, accs, runs = {}, {}, {}
    for label, arm_spec in arms.items():
        summary = ctx.train("regularization", Arm(label, arm_spec, cfg))
        runs[label] = [r["run_id"] for r in summary["per_seed"]]
        gaps[label] = _values(summary, "train_test_gap")
        accs[label] = _values(summary, "final_test_acc")
    bn_vs_none = welch_diff(gaps["neither"], gaps["BN"])
    dropout_adds = welch_diff(accs["BN then Dropout"], accs["BN"])
    numbers = {
        "train_test_gap": {label: mean_ci(v).to_dict() for label, v in gaps.items()},
        "final_test_acc": {label: mean_ci(v).to_dict() for label, v in accs.items()},
        "gap_neither_minus_bn": bn_vs_none.to_dict(),
        "acc_bn_dropout_minus_bn": dropout_adds.to_dict(),
    }
    plot = bars_with_ci(_plot(ctx, "regularization"), ["train–test gap", "test accuracy"],
                        {label: [mean_ci(gaps[label]).to_dict(), mean_ci(accs[label]).to_dict()] for label in arms},
                        title="Regularization: train–test accuracy gap and test accuracy", ylabel="percent",
                        scale=100.0)
    protocol = (f"torch-mlp recipe, {REGULARIZATION_EPOCHS[ctx.protocol_name]} epochs; arms: neither, BN, Dropout "
                "0.3, BN then Dropout, Dropout then BN; gap = final train accuracy − test accuracy, both in eval "
                "mode on the full sets")
    return ClaimResult("regularization", ctx.protocol_name, protocol, ctx.seeds,
                       "train–test accuracy gap (and test accuracy)", numbers, None, None, [plot], runs, 0.0)


# -- 11. Frozen BN in transfer learning --------------------------------------------------------------------


@torch.no_grad()
def _reestimate_statistics(model: torch.nn.Module, x: torch.Tensor, batches: int, batch_size: int) -> None:
    """Replace every batch norm's running statistics by the cumulative average over ``batches``
    batches of ``x`` (train-mode forward passes, momentum=None), as precise-BN does."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(batches):
        model(x[torch.randint(len(x), (batch_size,), generator=g)])
    for m, momentum in saved:
        m.momentum = momentum


def _finetune(ctx, spec, cfg, pretrained_group: str, treatment: str) -> dict:
    """Claim 1's MNIST models fine-tuned on Fashion-MNIST with one BN treatment, through the run store."""
    from bnlab.nn import freeze_batchnorm

    def prepare(trainer) -> None:
        if treatment == "re-estimated, then frozen":
            _reestimate_statistics(trainer.model, trainer.data.train_x, REESTIMATE_BATCHES, cfg.batch_size)
        if treatment != "updating":
            freeze_batchnorm(trainer.model)
            trainer.reset_optimizer()  # the frozen affine is not trained

    start = StartFrom(pretrained_group, f"BN {treatment}", prepare)
    return ctx.train("frozen-transfer", Arm(f"fine-tune/{treatment}", spec, cfg), start_from=start)


FROZEN_TRANSFER = Rule((Criterion("test accuracy on the new task, fine-tuned with frozen BN − with updating BN", 0.005,
                             unit="points", scale=100),),
            evidence=lambda n: [n["frozen_minus_updating"]])


def _frozen_transfer(ctx: ClaimContext) -> ClaimResult:
    spec, cfg = _preset("torch-mlp", QUICK_EPOCHS if ctx.quick else None)
    spec = spec.with_(norm="batch")
    pretrained = ctx.train("trains-faster", Arm("torch-mlp/BN", spec, cfg))  # claim 1's MNIST models
    steps = FINETUNE_STEPS[ctx.protocol_name]
    tune_cfg = cfg.with_(dataset="fashion", epochs=None, steps=steps, eval_every=steps)
    treatments = ("updating", "frozen", "re-estimated, then frozen")
    tuned = {t: _finetune(ctx, spec, tune_cfg, pretrained["group_id"], t) for t in treatments}
    accs = {t: _values(summary, "final_test_acc") for t, summary in tuned.items()}
    gain = welch_diff(accs["frozen"], accs["updating"])
    numbers = {"fashion_test_acc": {t: mean_ci(v).to_dict() for t, v in accs.items()},
               "frozen_minus_updating": gain.to_dict(),
               "reestimated_minus_updating": welch_diff(accs["re-estimated, then frozen"], accs["updating"]).to_dict()}
    plot = bars_with_ci(_plot(ctx, "frozen-transfer"), ["Fashion-MNIST test accuracy"],
                        {t: [mean_ci(v).to_dict()] for t, v in accs.items()},
                        title="Fine-tuning an MNIST model on Fashion-MNIST: what to do with BN",
                        ylabel="test accuracy (%)", scale=100.0)
    protocol = (f"claim 1's torch-mlp BN models (MNIST, {f'{QUICK_EPOCHS} epoch' if ctx.quick else '5 epochs'}) "
                f"fine-tuned on Fashion-MNIST for {steps} steps (SGD lr 0.01, momentum 0.9, batch 64), all weights "
                "trainable, with BN updating, BN frozen (freeze_batchnorm), or BN statistics re-estimated on "
                f"{REESTIMATE_BATCHES} Fashion batches then frozen; the fine-tuning runs start from claim 1's "
                "checkpoint and are kept in the run store")
    return ClaimResult("frozen-transfer", ctx.protocol_name, protocol, ctx.seeds, "Fashion-MNIST test accuracy",
                       numbers, None, None, [plot],
                       {"pretrained torch-mlp/BN": [r["run_id"] for r in pretrained["per_seed"]],
                        **{f"fine-tune/{t}": [r["run_id"] for r in summary["per_seed"]] for t, summary in tuned.items()}},
                       0.0)


# -- 12. Gradient accumulation as a small-batch remedy --------------------------------------------------------


ACCUMULATION = Rule((Criterion("final test accuracy with a real batch of 32 − with 8 accumulated micro-batches of 4",
                          0.005, "within", unit="points", scale=100),),
            evidence=lambda n: [n["real_batch_minus_accumulated"]])


def _accumulation(ctx: ClaimContext) -> ClaimResult:
    steps = ACCUMULATION_STEPS[ctx.protocol_name]
    cfg = PAPER_SGD.with_(batch_size=32, steps=steps, eval_every=max(1, steps // 5))
    arms = {
        "BN, real batch 32": Arm("BN/batch32", PAPER_MLP.with_(norm="batch"), cfg),
        "BN, 8 micro-batches of 4 accumulated": Arm("BN/accumulate8x4", PAPER_MLP.with_(norm="batch"),
                                                    cfg.with_(accumulate=8)),
        "GroupNorm, 8 × 4 accumulated": Arm("GN/accumulate8x4", PAPER_MLP.with_(norm="group"), cfg.with_(accumulate=8)),
    }
    accs, runs = {}, {}
    for label, arm in arms.items():
        summary = ctx.train("accumulation", arm)
        runs[arm.label] = [r["run_id"] for r in summary["per_seed"]]
        accs[label] = _values(summary, "final_test_acc")
    labels = list(arms)
    shortfall = welch_diff(accs[labels[0]], accs[labels[1]])
    numbers = {"final_test_acc": {label: mean_ci(v).to_dict() for label, v in accs.items()},
               "real_batch_minus_accumulated": shortfall.to_dict()}
    plot = bars_with_ci(_plot(ctx, "accumulation"), ["final test accuracy"],
                        {label: [mean_ci(v).to_dict()] for label, v in accs.items()},
                        title="Gradient accumulation vs a real batch (BN sees only the micro-batch)",
                        ylabel="test accuracy (%)", scale=100.0)
    protocol = (f"784-100-100-100-10 ReLU, plain SGD lr 0.1, {steps} optimizer steps of 32 samples each: one real "
                "batch of 32, or 8 micro-batches of 4 with their gradients summed (batch norm normalizes, and updates "
                "its running statistics, per micro-batch); GroupNorm with the same accumulation as a control that "
                "does not depend on the batch")
    return ClaimResult("accumulation", ctx.protocol_name, protocol, ctx.seeds, "final test accuracy", numbers,
                       None, None, [plot], runs, 0.0)


# -- 13. Large batches and Ghost BN -------------------------------------------------------------------------


GHOST_RULE = Rule((Criterion("final test accuracy at the large batch, Ghost BN − plain BN", 0.005, unit="points", scale=100),),
            evidence=lambda n: [n["ghost_minus_large_bn"]])


def _ghost(ctx: ClaimContext) -> ClaimResult:
    p = GHOST[ctx.protocol_name]
    base = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, batch_size=p["small"], epochs=p["epochs"],
                       scaling="unit", eval_every=100, drop_last=True)  # ghost batches must tile every batch
    large_lr = 0.1 * (p["large"] / p["small"]) ** 0.5  # Hoffer et al.'s square-root scaling
    large = base.with_(batch_size=p["large"], lr=large_lr, eval_every=10)
    arms = {
        f"small batch {p['small']}, BN": Arm("small/BN", PAPER_MLP.with_(norm="batch"), base),
        f"large batch {p['large']}, BN": Arm("large/BN", PAPER_MLP.with_(norm="batch"), large),
        f"large batch {p['large']}, Ghost BN {p['virtual']}": Arm(
            "large/ghost", PAPER_MLP.with_(norm="ghost", virtual_batch_size=p["virtual"]), large),
    }
    accs, runs = {}, {}
    for label, arm in arms.items():
        summary = ctx.train("ghost", arm)
        runs[arm.label] = [r["run_id"] for r in summary["per_seed"]]
        accs[label] = _values(summary, "final_test_acc")
    labels = list(arms)
    gain = welch_diff(accs[labels[2]], accs[labels[1]])
    gap = welch_diff(accs[labels[0]], accs[labels[1]])
    numbers = {"final_test_acc": {label: mean_ci(v).to_dict() for label, v in accs.items()},
               "ghost_minus_large_bn": gain.to_dict(), "small_minus_large_bn": gap.to_dict()}
    plot = bars_with_ci(_plot(ctx, "ghost"), ["final test accuracy"], {l: [mean_ci(v).to_dict()] for l, v in accs.items()},
                        title="Large batches: plain BN vs Ghost BN", ylabel="test accuracy (%)", scale=100.0)
    protocol = (f"784-100-100-100-10 ReLU with BN, SGD momentum 0.9, {p['epochs']} epochs for every arm (so the large "
                f"batch takes {p['large'] // p['small']}× fewer steps), lr 0.1 at batch {p['small']} and "
                f"{large_lr:.3g} (√ scaling) at batch {p['large']}; Ghost BN with virtual batches of {p['virtual']}")
    return ClaimResult("ghost", ctx.protocol_name, protocol, ctx.seeds, "final test accuracy", numbers, None,
                       None, [plot], runs, 0.0)


# -- 14. BN on the output layer ------------------------------------------------------------------------------


OUTPUT_LAYER = Rule((Criterion("final test accuracy with BN on the hidden layers only − also on the logits", 0.002,
                          unit="points", scale=100),),
            evidence=lambda n: [n["hidden_only_minus_with_output"]])


def _output_layer(ctx: ClaimContext) -> ClaimResult:
    spec, cfg = _preset("torch-mlp", QUICK_EPOCHS if ctx.quick else None)
    arms = {"BN on hidden layers": spec.with_(norm="batch"),
            "BN also on the logits": spec.with_(norm="batch", norm_output=True)}
    summaries, runs = {}, {}
    for label, s in arms.items():
        arm = Arm("torch-mlp/BN" if not s.norm_output else "torch-mlp/BN+output", s, cfg)
        summaries[label] = ctx.train("trains-faster" if not s.norm_output else "output-layer", arm)
        runs[arm.label] = [r["run_id"] for r in summaries[label]["per_seed"]]
    accs = {label: _values(s, "final_test_acc") for label, s in summaries.items()}
    diff = welch_diff(accs["BN on hidden layers"], accs["BN also on the logits"])
    numbers = {"final_test_acc": {label: mean_ci(v).to_dict() for label, v in accs.items()},
               "hidden_only_minus_with_output": diff.to_dict()}
    plot = bars_with_ci(_plot(ctx, "output-layer"), ["torch-mlp"],
                        {label: [mean_ci(v).to_dict()] for label, v in accs.items()},
                        title="Final test accuracy with and without BN on the logits", ylabel="test accuracy (%)",
                        scale=100.0)
    protocol = f"torch-mlp recipe ({f'{QUICK_EPOCHS} epoch' if ctx.quick else '5 epochs'}), BN on the hidden layers, with and without a BatchNorm1d(10) on the logits"
    return ClaimResult("output-layer", ctx.protocol_name, protocol, ctx.seeds, "final test accuracy", numbers, None,
                       None, [plot], runs, 0.0)


CLAIMS: dict[str, Claim] = {c.name: c for c in [
    Claim("trains-faster", 1, "BN makes training faster",
          "seed 002: BN 'helps the network converge faster, reducing the number of training iterations required'; "
          "seed 003: the BN model 'shows faster convergence'",
          TRAINS_FASTER,
          "Ioffe & Szegedy 2015 Fig. 1(a): the BN network trains faster (no MNIST numbers published); Udacity lesson: "
          "ReLU lr 0.01, BN >90% 'almost immediately' vs ~3000 iterations without",
          _trains_faster),
    Claim("higher-lr", 2, "BN tolerates higher learning rates",
          "seed 000: 'You can often use higher learning rates'; seed 001: BN 'allows gradient descent to use much "
          "larger learning rates'; seed 004: 'Higher learning rates'",
          HIGHER_LR,
          "Udacity lesson (50k steps): ReLU lr 1: 19.6% without BN vs 98.3% with; lr 2: 10.1% vs 98.2%; "
          "sigmoid lr 1: 97.8% vs 98.0% (sigmoid does not collapse)",
          _higher_lr),
    Claim("init-sensitivity", 3, "BN makes training less sensitive to initialization",
          "seed 000: with BN, 'Random weight initialization becomes less critical'; without it, 'Small changes in how "
          "you initialize weights can make the difference between a model that learns and one that doesn't'",
          INIT_SENSITIVITY,
          "Udacity lesson, init N(0, 5²): ReLU without BN stays at 9.8% for every lr; with BN 81–91%",
          _init_sensitivity),
    Claim("ioffe-figure-1", 4, "Ioffe & Szegedy Fig. 1: BN trains faster and steadies the sigmoid inputs",
          "seed 000: BN fixes 'internal covariate shift - the distribution of inputs to each layer keeps shifting'; "
          "seed 003: 'Normalizing neuron outputs within each batch reduces internal covariate shift'",
          IOFFE_FIGURE_1,
          "Ioffe & Szegedy 2015 Fig. 1: BN trains faster, reaches higher accuracy, and the {15, 50, 85}th "
          "percentiles stay stable while the baseline's move in mean and spread (no numbers published; "
          "reproductions report final accuracy 98.0% vs 97.7%)",
          _ioffe_figure_1),
    Claim("ics", 5, "BN works by reducing internal covariate shift",
          "seed 000: 'Batch Normalization solves this [internal covariate shift] by ensuring that the inputs to each "
          "layer have a consistent, standardized distribution'; seed 002: 'By reducing the internal covariate shift, "
          "Batch Normalization helps the network converge faster'",
          ICS,
          "Santurkar et al. 2018 Fig. 3 (VGG layers 5/10, deep linear net layers 9/17): 'networks with BatchNorm "
          "often exhibit an increase in ICS'; in the deep linear net the standard network shows almost no ICS while "
          "with BN G and G' are almost uncorrelated",
          _ics),
    Claim("landscape", 6, "BN smooths the optimization landscape",
          "seed 001: 'Modern research suggests Batch Norm's primary benefit is making the optimization landscape "
          "significantly smoother'; seed 003: BN 'results in a smoother contour plot'",
          LANDSCAPE,
          "Santurkar et al. 2018 Fig. 4 (VGG on CIFAR-10): with BN the loss range, gradient predictiveness range and "
          "β_eff are all smaller, the gradient gap 'close to two orders of magnitude ... especially early in training'",
          _landscape),
    Claim("placement", 7, "BN belongs before the activation",
          "seed 000, 'Pitfall 2: Wrong Placement': 'BatchNorm after activation might reduce effectiveness'; seed 004: "
          "BN 'is usually applied after the linear transformation and before the activation function'",
          PLACEMENT,
          "no controlled ablation in the BN paper; Mishkin's CaffeNet: after ReLU better by ~2.5 points, GoogLeNet: "
          "before better by ~1 point (single runs)",
          _placement),
    Claim("small-batches", 8, "BN degrades at small batches; GroupNorm/LayerNorm do not",
          "seed 000: 'Very small batch sizes (< 8): BatchNorm becomes less effective'; 'Very small batches: Consider "
          "LayerNormalization'; seed 004: 'BatchNorm also works best when batch sizes are reasonably large'",
          SMALL_BATCHES_RULE,
          "Wu & He 2018 Table 2 (ResNet-50, ImageNet val error by images per GPU 32→2): BN 23.6 → 34.7%, GN 24.1 → "
          "24.1%; Batch Renorm at 4 per GPU: 26.3% (BN 27.3, GN 24.2)",
          _small_batches),
    Claim("train-vs-eval", 9, "Forgetting model.eval() costs accuracy",
          "seed 000, 'Pitfall 1: Forgetting Training vs. Inference Mode'; seed 004: 'During inference, it uses moving "
          "averages learned during training'",
          TRAIN_VS_EVAL,
          "no published number; pytorch/pytorch#5406 and #4741 report the symptom",
          _train_vs_eval),
    Claim("regularization", 10, "BN regularizes (and can replace Dropout)",
          "seed 000: 'The noise from batch statistics provides a mild regularization effect'; 'When using Dropout: "
          "Place BatchNorm before Dropout'; seed 001: BN 'often reduces or entirely eliminates the need for Dropout'",
          REGULARIZATION,
          "no MNIST number found; Ioffe & Szegedy removed Dropout from BN-Inception without losing accuracy",
          _regularization),
    Claim("frozen-transfer", 11, "Keep BN frozen when transferring to a new task",
          "seed 000: 'Transfer learning: Keep BatchNorm layers frozen initially'",
          FROZEN_TRANSFER,
          "no MNIST→Fashion number published; detectron2 and torchvision freeze BN when fine-tuning detectors "
          "(batches of 1–2 images per GPU), Keras' fine-tuning guide keeps BN in inference mode",
          _frozen_transfer),
    Claim("accumulation", 12, "Gradient accumulation fixes small-batch BN",
          "seed 000, 'Pitfall 3: Small Batch Sizes': 'If you must use small batches, consider: ... Accumulating "
          "gradients over multiple mini-batches'",
          ACCUMULATION,
          "no published number; pytorch/pytorch#46516: accumulation does not change what batch norm sees",
          _accumulation),
    Claim("ghost", 13, "Ghost BN helps large-batch training",
          "seed 001: BN 'allows for scaling up training across many GPUs ... even with very large batch sizes'",
          GHOST_RULE,
          "Hoffer et al. 2017 (MNIST F1 network): small batch 98.27%, large batch 97.05%, +LR scaling 97.55%, "
          "+Ghost BN 97.60%, +longer training 98.53%",
          _ghost),
    Claim("output-layer", 14, "BN on the output layer hurts",
          "seed 000: 'Don't use on output layers (usually)'",
          OUTPUT_LAYER,
          "no published number found",
          _output_layer),
]}
