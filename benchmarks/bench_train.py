"""Training throughput: seed 003's own loop vs bnlab's engine with K stacked models, in one process.

Contenders, on the torch-mlp preset (784-512-256-10 with BN, SGD lr 0.01
momentum 0.9, batch 64), real MNIST:

* ``seed loop``: seed 003's training loop as written (DataLoader over a
  TensorDataset, batch 64, shuffle; zero_grad, forward, loss, backward, step,
  ``loss.item()``).
* ``engine K=k``: bnlab's engine training k models (seeds) in one stacked step.
* ``engine K=k bf16``: the same with bfloat16 autocast.

Each round times every contender for a fixed number of *model*-steps, in a new
random order; the report gives medians over rounds, model-steps/s, the paired
ratio to the seed loop, and achieved GFLOP/s as % of a large float32 matmul
timed in the same run (the machine's compute ceiling).

With ``--accuracy-epochs E`` it also trains 8 seeds for E epochs in float32
and in bf16 and reports whether the bf16 mean test accuracy lies inside the
float32 seed-to-seed spread.

Run:  .venv/bin/python benchmarks/bench_train.py [--rounds 7] [--accuracy-epochs 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnlab.data import fetch_dataset
from bnlab.models import PRESETS, ModelSpec
from bnlab.train import StackedTrainer, TrainConfig, prepare_data

BATCH = 64
WIDTHS = [784, 512, 256, 10]


class SeedNet(nn.Module):
    """Seed 003's NeuralNetwork(use_batch_norm=True), verbatim in structure."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 512), nn.Linear(512, 256), nn.Linear(256, 10)
        self.bn1, self.bn2 = nn.BatchNorm1d(512), nn.BatchNorm1d(256)

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


def flops_per_model_step() -> float:
    """Forward 2·B·Σ in·out; backward the same for weight gradients plus input gradients below layer 1."""
    layer = [2 * BATCH * i * o for i, o in zip(WIDTHS, WIDTHS[1:])]
    return sum(layer) * 2 + sum(layer[1:])


class SeedLoop:
    def __init__(self, x, y):
        torch.manual_seed(0)
        self.model = SeedNet()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.criterion = nn.CrossEntropyLoss()
        self.loader = DataLoader(TensorDataset(x.view(-1, 1, 28, 28), y), batch_size=BATCH, shuffle=True)
        self._it = iter(self.loader)
        self.k = 1

    def steps(self, n):
        for _ in range(n):
            try:
                data, target = next(self._it)
            except StopIteration:
                self._it = iter(self.loader)
                data, target = next(self._it)
            self.optimizer.zero_grad()
            loss = self.criterion(self.model(data), target)
            loss.backward()
            self.optimizer.step()
            loss.item()


class Engine:
    def __init__(self, spec, cfg, data, k):
        self.trainer = StackedTrainer(spec, cfg, list(range(k)), data)
        self.k = k

    def steps(self, n):
        for _ in range(n):
            self.trainer.train_step()
            if self.trainer.step >= self.trainer.total_steps - 1:
                self.trainer.step = 0  # keep cycling through epochs for timing


def matmul_gflops(dtype=torch.float32, n=2048, repeats=8) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def accuracy_check(spec, cfg, dataset, epochs) -> dict:
    results = {}
    for bf16 in (False, True):
        c = cfg.with_(epochs=epochs, bf16=bf16)
        trainer = StackedTrainer(spec, c, list(range(8)), prepare_data(dataset, c, spec))
        trainer.run()
        _, acc = trainer.evaluate(trainer.data.test_x, trainer.data.test_y)
        results["bf16" if bf16 else "fp32"] = acc.tolist()
    fp32, bf16 = results["fp32"], results["bf16"]
    mean_bf16 = statistics.mean(bf16)
    return {"fp32": fp32, "bf16": bf16, "fp32_range": (min(fp32), max(fp32)), "bf16_mean": mean_bf16,
            "inside": min(fp32) <= mean_bf16 <= max(fp32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model-steps", type=int, default=240, help="model-steps per contender per round")
    parser.add_argument("--accuracy-epochs", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(2)

    dataset = fetch_dataset("mnist", log=lambda m: None)
    preset = PRESETS["torch-mlp"]
    spec = ModelSpec.from_dict(preset["model"]).with_(norm="batch")
    cfg = TrainConfig.from_dict({**preset["train"], "epochs": 1})
    data = prepare_data(dataset, cfg, spec)
    contenders = {"seed loop": SeedLoop(data.train_x, data.train_y)}
    # The seed loop alone, before any engine has run: if the interleaved figure below is far
    # from this one, contenders are disturbing each other (threads left spinning, say).
    alone = contenders["seed loop"]
    alone.steps(20)
    t = time.perf_counter()
    alone.steps(args.model_steps)
    seed_alone = args.model_steps / (time.perf_counter() - t)
    for k in (1, 4, 8):
        contenders[f"engine K={k}"] = Engine(spec, cfg, data, k)
    for k in (1, 8):
        contenders[f"engine K={k} bf16"] = Engine(spec, cfg.with_(bf16=True), data, k)

    ceiling = matmul_gflops()
    ceiling_bf16 = matmul_gflops(torch.bfloat16)
    for c in contenders.values():  # warm-up
        c.steps(max(2, 20 // c.k))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    shuffler = random.Random(0)
    for _ in range(args.rounds):
        shuffler.shuffle(order)
        for name in order:
            c = contenders[name]
            n = max(1, args.model_steps // c.k)
            t = time.perf_counter()
            c.steps(n)
            times[name].append((time.perf_counter() - t) / (n * c.k))  # seconds per model-step

    flops = flops_per_model_step()
    print(f"torch {torch.__version__}, 2 threads; torch-mlp with BN, batch {BATCH}; "
          f"median of {args.rounds} interleaved rounds, {args.model_steps} model-steps each")
    print(f"compute ceiling: float32 matmul 2048^2 {ceiling:.0f} GFLOP/s (bf16: {ceiling_bf16:.0f}); "
          f"{flops / 1e6:.0f} MFLOP per model-step\n")
    print(f"seed loop alone, before any engine ran: {seed_alone:.0f} steps/s (control for interference)\n")
    print(f"{'contender':<18s} {'model-steps/s':>13s} {'vs seed loop':>13s} {'GFLOP/s':>8s} {'% fp32 ceiling':>15s}")
    ratios = {}
    for name, per in times.items():
        paired = statistics.median(s / p for s, p in zip(times["seed loop"], per))
        ratios[name] = paired
        rate = 1 / statistics.median(per)
        print(f"{name:<18s} {rate:>13.0f} {paired:>12.2f}x {rate * flops / 1e9:>8.1f} "
              f"{100 * rate * flops / 1e9 / ceiling:>14.0f}%")
    print()
    print(f"bar K=8 fp32 >= 2x seed loop: {ratios['engine K=8']:.2f}x  "
          f"{'met' if ratios['engine K=8'] >= 2 else 'NOT met'}")
    print(f"bar K=8 bf16 >= 3x seed loop: {ratios['engine K=8 bf16']:.2f}x  "
          f"{'met' if ratios['engine K=8 bf16'] >= 3 else 'NOT met'}")
    print(f"bar K=1 not slower than seed loop: {ratios['engine K=1']:.2f}x  "
          f"{'met' if ratios['engine K=1'] >= 1 else 'NOT met'}")
    if args.accuracy_epochs:
        acc = accuracy_check(spec, cfg, dataset, args.accuracy_epochs)
        lo, hi = acc["fp32_range"]
        print(f"\naccuracy after {args.accuracy_epochs} epoch(s), 8 seeds: fp32 range [{lo:.4f}, {hi:.4f}], "
              f"bf16 mean {acc['bf16_mean']:.4f} -> {'inside' if acc['inside'] else 'OUTSIDE'} the fp32 spread")
        print(f"  fp32 per seed: {' '.join(f'{a:.4f}' for a in acc['fp32'])}")
        print(f"  bf16 per seed: {' '.join(f'{a:.4f}' for a in acc['bf16'])}")


if __name__ == "__main__":
    main()
