"""The practitioner tools, measured: what folding saves at inference, what precise BN changes in accuracy.

1. ``fold_batchnorm``: a ResNet-18 (benchmarks/bench_compiled_bn.py) in eval mode, batch 32 at 64×64,
   forward time before and after folding (interleaved rounds, paired median), and the largest output
   difference.
2. ``recompute_bn_stats``: the torch-mlp and keras-mlp recipes trained for a short schedule (200 steps,
   5 seeds, real MNIST), test accuracy with the moving averages and with statistics re-estimated on 100
   training batches; mean difference with its 95% CI. Keras' momentum 0.99 averages over ~100 batches,
   so after 200 steps its averages still carry the initial values; torch's 0.1 over ~10.

Run:  .venv/bin/python benchmarks/bench_tools.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_compiled_bn import resnet18  # noqa: E402

from bnlab.data import fetch_dataset  # noqa: E402
from bnlab.models import PRESETS, ModelSpec  # noqa: E402
from bnlab.stats import mean_ci, welch_diff  # noqa: E402
from bnlab.tools import fold_batchnorm, recompute_bn_stats  # noqa: E402
from bnlab.train import StackedTrainer, TrainConfig, prepare_data  # noqa: E402


def fold_speed(rounds: int) -> None:
    torch.manual_seed(0)
    model = resnet18(torch.nn.BatchNorm2d)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # statistics away from their initial values
            model(torch.randn(32, 3, 64, 64))
    model.eval()
    folded, report = fold_batchnorm(model)
    x = torch.randn(32, 3, 64, 64)
    with torch.no_grad():
        diff = float((folded(x) - model(x)).abs().max())
        scale = float(model(x).abs().max())
        pairs, order = [], random.Random(0)
        for _ in range(rounds):
            times = {}
            for name in order.sample(["plain", "folded"], 2):
                net = model if name == "plain" else folded
                net(x)
                started = time.perf_counter()
                for _ in range(3):
                    net(x)
                times[name] = (time.perf_counter() - started) / 3
            pairs.append((times["plain"], times["folded"]))
    plain = statistics.median(p for p, _ in pairs)
    fold = statistics.median(f for _, f in pairs)
    ratio = statistics.median(p / f for p, f in pairs)
    print(f"fold_batchnorm, ResNet-18 eval forward, batch 32, 64x64: {len(report.folded)} batch norms folded, "
          f"{len(report.kept)} kept; {plain * 1e3:.1f} ms -> {fold * 1e3:.1f} ms ({ratio:.2f}x faster); "
          f"largest output difference {diff:.2e} (outputs up to {scale:.1f})")


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).double().mean())


def precise_bn_effect(steps: int = 200, seeds: int = 5, batches: int = 100) -> None:
    dataset = fetch_dataset("mnist")
    for preset in ("torch-mlp", "keras-mlp"):
        spec = ModelSpec.from_dict(PRESETS[preset]["model"]).with_(norm="batch")
        cfg = TrainConfig.from_dict({**PRESETS[preset]["train"], "epochs": None, "steps": steps,
                                     "eval_every": steps})
        data = prepare_data(dataset, cfg, spec)
        trainer = StackedTrainer(spec, cfg, list(range(seeds)), data)
        trainer.run()
        ema, precise = [], []
        order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))
        train_batches = [data.train_x[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]] for i in range(batches)]
        for model in trainer.write_back():
            ema.append(_accuracy(model, data.test_x, data.test_y))
            recompute_bn_stats(model, train_batches)
            precise.append(_accuracy(model, data.test_x, data.test_y))
        d = welch_diff(precise, ema)
        print(f"recompute_bn_stats, {preset} after {steps} steps ({seeds} seeds): test accuracy "
              f"{100 * mean_ci(ema).mean:.2f}% with the moving averages, {100 * mean_ci(precise).mean:.2f}% with "
              f"precise statistics ({batches} batches): {100 * d.mean:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}] "
              "points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    fold_speed(args.rounds)
    precise_bn_effect()


if __name__ == "__main__":
    main()
