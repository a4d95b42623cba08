"""How far the cheap evaluation of `bnlab compare` is from the exact one, on real MNIST.

`bnlab compare` evaluates intermediate curve points on a fixed stratified subset of
the test set in bf16 (where the CPU has native bf16), with batch norm folded into the
layer before it, and the final train-set
metrics on a stratified subset of the training set; milestones (epoch ends and
the last step) are exact (bnlab.train.engine.EvalPlan). This script trains K
seeds of a preset and, at every evaluation point, measures both the exact value
(full test set, float32) and the cheap one, and prints:

* the largest and mean |approx - exact| test accuracy over the curve,
* steps-to-95% and steps-to-97% from the exact curve and from the cheap one,
* the train-set accuracy and loss from the subset against the full 60,000 images.

Run:  .venv/bin/python benchmarks/eval_error.py [--preset torch-mlp] [--seeds 8] [--epochs 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bnlab.data import fetch_dataset
from bnlab.models import PRESETS, ModelSpec
from bnlab.stats import first_step_reaching
from bnlab.train import StackedTrainer, TrainConfig, prepare_data


def measure(preset: str, norm: str, seeds: int, epochs: float, dataset) -> dict:
    p = PRESETS[preset]
    spec = ModelSpec.from_dict(p["model"]).with_(norm=norm)
    cfg = TrainConfig.from_dict({**p["train"], "epochs": epochs})
    data = prepare_data(dataset, cfg, spec)
    trainer = StackedTrainer(spec, cfg, list(range(seeds)), data)
    plan = trainer.eval_plan
    exact, approx = [], []
    while trainer.step < trainer.total_steps:
        trainer.train_step()
        if cfg.is_eval_step(trainer.step, trainer.total_steps):
            exact.append((trainer.step, trainer.evaluate(data.test_x, data.test_y)[1]))
            approx.append((trainer.step, trainer.evaluate_approximately("test_approx")[1]))
    errors = torch.stack([(a - b).abs() for (_, a), (_, b) in zip(exact, approx)])  # (points, K)
    steps = {}
    for threshold in (0.95, 0.97):
        steps[threshold] = [(first_step_reaching([(s, v[k].item()) for s, v in exact], threshold),
                             first_step_reaching([(s, v[k].item()) for s, v in approx], threshold))
                            for k in range(seeds)]
    full_loss, full_acc = trainer.evaluate(data.train_x, data.train_y)
    sub_loss, sub_acc = trainer.final_metrics().values()
    return {"spec": f"{preset} {norm}", "plan": plan.describe(), "points": len(exact),
            "max_err": errors.max().item(), "mean_err": errors.mean().item(), "steps": steps,
            "train_acc_err": (sub_acc - full_acc).abs().max().item(),
            "train_acc_bias": (sub_acc - full_acc).mean().item(),
            "train_loss_rel_err": ((sub_loss - full_loss).abs() / full_loss).max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="torch-mlp", choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    dataset = fetch_dataset("mnist", log=lambda m: None)
    for norm in ("none", "batch"):
        r = measure(args.preset, norm, args.seeds, args.epochs, dataset)
        inter = r["plan"]["intermediate_points"]
        print(f"{r['spec']}, {args.seeds} seeds, {args.epochs} epoch(s), {r['points']} evaluation points; "
              f"intermediate: {inter['examples']} images, {inter['dtype']}"
              f"{', BN folded' if inter.get('batch_norm_folded') else ''}")
        print(f"  test accuracy |approx - exact| over the curve: max {100 * r['max_err']:.2f} pts, "
              f"mean {100 * r['mean_err']:.2f} pts")
        for threshold, pairs in r["steps"].items():
            diffs = [a - e for e, a in pairs if e is not None and a is not None]
            missed = sum((e is None) != (a is None) for e, a in pairs)
            text = (f"median {statistics.median(diffs):+.0f}, range {min(diffs):+d}..{max(diffs):+d}"
                    if diffs else "no seed reached it")
            print(f"  steps to {threshold:.0%} (approx - exact): {text}"
                  + (f"; reached by one curve only for {missed} seed(s)" if missed else ""))
            print(f"    per seed (exact, approx): {pairs}")
        print(f"  train-set metrics from the subset: |Δ acc| max {100 * r['train_acc_err']:.2f} pts "
              f"(mean bias {100 * r['train_acc_bias']:+.2f}), loss relative error max {100 * r['train_loss_rel_err']:.1f}%")


if __name__ == "__main__":
    main()
