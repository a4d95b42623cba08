"""``bnlab demo``: a quick look at batch norm on synthetic data (no dataset needed).

Trains the same deep sigmoid MLP with and without ``bnlab.nn.BatchNorm1d`` on
a synthetic 10-class problem and prints loss and accuracy side by side. Deep
sigmoid stacks are where BN's effect on trainability is easiest to see.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train a small MLP with and without BN on synthetic data")
    p.add_argument("--steps", type=int, default=600, help="SGD steps per model (default: 600)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(run=run)


def _synthetic_task(seed: int, n: int = 6000, dim: int = 64, classes: int = 10):
    import torch

    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    labels = torch.randint(classes, (n,), generator=g)
    x = centers[labels] + torch.randn(n, dim, generator=g) * 2.0
    return x, labels


def _mlp(use_bn: bool, dim: int = 64, width: int = 64, depth: int = 6, classes: int = 10):
    from torch import nn

    import bnlab.nn as bnn

    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dim if i == 0 else width, width, bias=not use_bn))
        if use_bn:
            layers.append(bnn.BatchNorm1d(width))
        layers.append(nn.Sigmoid())
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def run(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    if args.steps < 1:
        raise SystemExit("bnlab demo: error: --steps must be at least 1")
    x, y = _synthetic_task(args.seed)
    train_x, train_y, test_x, test_y = x[:5000], y[:5000], x[5000:], y[5000:]
    print(f"deep sigmoid MLP (6 x 64), SGD lr 0.5, batch 64, {args.steps} steps, synthetic 10-class data")
    print(f"{'model':<10s} {'train loss':>10s} {'test acc':>9s}")
    for use_bn in (False, True):
        torch.manual_seed(args.seed)
        model = _mlp(use_bn)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        order = torch.Generator().manual_seed(args.seed)
        for _ in range(args.steps):
            idx = torch.randint(len(train_x), (64,), generator=order)
            loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            train_loss = nn.functional.cross_entropy(model(train_x), train_y).item()
            acc = (model(test_x).argmax(1) == test_y).float().mean().item()
        print(f"{'with BN' if use_bn else 'no BN':<10s} {train_loss:>10.4f} {acc:>9.3f}")
    return 0
