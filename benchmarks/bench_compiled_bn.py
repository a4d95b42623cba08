"""End to end: plain batch norm on bnlab's compiled kernel vs ATen's, in whole training steps.

* ``keras-cnn`` preset (seed 000's CNN), one training step of the stacked engine at K = 1 and K = 8,
  synthetic MNIST-shaped data, with ``set_backend("aten")`` and ``set_backend("compiled")``;
* a ResNet-18 (torchvision's layout, written here) forward + backward at batch 32 on 64×64 inputs,
  every batch norm ``torch.nn.BatchNorm2d`` vs ``bnlab.nn.BatchNorm2d`` on the compiled backend.

Interleaved rounds in a new order each round; paired median ratio of the times (>1: compiled faster)
and a control (ATen against ATen) that shows the noise floor of the run.

Run on a quiet machine:  .venv/bin/python benchmarks/bench_compiled_bn.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

import bnlab.functional as BF
import bnlab.nn as bnn
from bnlab.data import Dataset
from bnlab.models import PRESETS, ModelSpec
from bnlab.train import StackedTrainer, TrainConfig, prepare_data


def synthetic_mnist(n: int = 4096) -> Dataset:
    from bnlab.data.datasets import DATASETS

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return Dataset(DATASETS["mnist"], images, labels, images[:1000], labels[:1000])


def basic_block(cin: int, cout: int, stride: int, norm) -> nn.Module:
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = norm(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = norm(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.down(x))

    return Block()


def resnet18(norm) -> nn.Module:
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [basic_block(cin, cout, stride, norm), basic_block(cout, cout, 1, norm)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers)


def timed(step, calls: int) -> float:
    step()
    started = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - started) / calls


def compare(contenders: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """{name: [seconds per step, one per round]}, each contender ``(backend, step)``."""
    times = {name: [] for name in contenders}
    order = random.Random(0)
    names = list(contenders)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            backend, step = contenders[name]
            BF.set_backend(backend)
            times[name].append(timed(step, calls))
    BF.set_backend("auto")
    return times


def report(title: str, times: dict[str, list[float]], reference: str) -> None:
    print(f"\n{title}")
    for name, ts in times.items():
        ratio = statistics.median(r / t for r, t in zip(times[reference], ts))
        print(f"  {name:<34s} {statistics.median(ts) * 1e3:9.2f} ms/step   {ratio:5.2f}x vs {reference}")


def engine_step(k: int):
    spec = ModelSpec.from_dict(PRESETS["keras-cnn"]["model"])
    cfg = TrainConfig.from_dict({**PRESETS["keras-cnn"]["train"], "epochs": 1})
    trainer = StackedTrainer(spec, cfg, list(range(k)), prepare_data(synthetic_mnist(), cfg, spec))
    return trainer.train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; paired median of {args.rounds} "
          "rounds")
    for k in (1, 8):
        step = engine_step(k)
        report(f"keras-cnn preset, engine training step, K = {k} (batch 32 per model)",
               compare({"ATen batch norm": ("aten", step), "ATen batch norm #2 (control)": ("aten", step),
                        "compiled batch norm": ("compiled", step)}, args.rounds, 10 if k == 1 else 3),
               "ATen batch norm")
    torch.manual_seed(0)
    ours, theirs = resnet18(bnn.BatchNorm2d), resnet18(nn.BatchNorm2d)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(32, 3, 64, 64)

    def step(model):
        return lambda: model(x).sum().backward()

    report("ResNet-18, batch 32, 64×64, forward + backward",
           compare({"torch.nn.BatchNorm2d": ("aten", step(theirs)),
                    "torch.nn.BatchNorm2d #2 (control)": ("aten", step(theirs)),
                    "bnlab.nn.BatchNorm2d, compiled": ("compiled", step(ours))}, args.rounds, 2),
           "torch.nn.BatchNorm2d")


if __name__ == "__main__":
    main()
