"""Small synthetic stand-ins for MNIST: learnable, deterministic, and fast."""

from __future__ import annotations

import torch

from bnlab.data import DATASETS, Dataset


def fake_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 28x28 images whose class is a bright 7x7 block at one of 10 positions, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.randint(0, 60, (n, 28, 28), generator=g)
    for cls in range(10):
        r, c = divmod(cls, 5)
        rows = slice(2 + 12 * r, 9 + 12 * r)
        cols = slice(1 + 5 * c, 5 + 5 * c)
        images[labels == cls, rows, cols] += 150
    return images.clamp(0, 255).to(torch.uint8), labels.to(torch.int64)


def fake_dataset(n_train: int = 640, n_test: int = 200, name: str = "mnist") -> Dataset:
    train = fake_images(n_train, 1)
    test = fake_images(n_test, 2)
    return Dataset(DATASETS[name], train[0], train[1], test[0], test[1])
