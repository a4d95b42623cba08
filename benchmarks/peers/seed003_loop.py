"""Seed 003's PyTorch tutorial, as written: the peer of `bnlab compare --preset torch-mlp`.

One process trains the tutorial's NeuralNetwork without and with BatchNorm1d for every seed, the
way a user would loop the script over seeds: its own DataLoader (batch 64, shuffle) over a
map-style dataset that transforms each image on access, SGD lr 0.01 momentum 0.9, and one test
evaluation per epoch. torchvision does not import on this machine, so `TutorialMNIST` stands in
for `datasets.MNIST(transform=Compose([ToTensor(), Normalize((0.1307,), (0.3081,))]))`: the same
per-item work minus the PIL round trip (so, if anything, slightly faster than the real thing).

Usage: python seed003_loop.py --seeds K --epochs E --json-out PATH
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn, optim
from torch.utils.data import DataLoader, Dataset

from bnlab.data import fetch_dataset


class TutorialMNIST(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].to(torch.float32).div(255.0).unsqueeze(0)  # ToTensor
        return (x - 0.1307) / 0.3081, int(self.labels[i])  # Normalize


class NeuralNetwork(nn.Module):
    def __init__(self, use_batch_norm: bool):
        super().__init__()
        self.use_batch_norm = use_batch_norm
        self.fc1, self.fc2, self.fc3 = nn.Linear(28 * 28, 512), nn.Linear(512, 256), nn.Linear(256, 10)
        if use_batch_norm:
            self.bn1, self.bn2 = nn.BatchNorm1d(512), nn.BatchNorm1d(256)

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        x = self.fc1(x)
        if self.use_batch_norm:
            x = self.bn1(x)
        x = torch.relu(x)
        x = self.fc2(x)
        if self.use_batch_norm:
            x = self.bn2(x)
        x = torch.relu(x)
        return self.fc3(x)


def test_accuracy(model, loader) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in loader:
            correct += (model(data).argmax(1) == target).sum().item()
    return correct / len(loader.dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    ds = fetch_dataset("mnist", log=lambda m: None)
    train = TutorialMNIST(ds.train_images, ds.train_labels)
    test_loader = DataLoader(TutorialMNIST(ds.test_images, ds.test_labels), batch_size=1000)
    steps_per_epoch = -(-len(train) // 64)
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    results = {"no BN": [], "BN": []}
    started = time.perf_counter()
    for label, use_bn in (("no BN", False), ("BN", True)):
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = NeuralNetwork(use_bn)
            criterion = nn.CrossEntropyLoss()
            optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            train_loader = DataLoader(train, batch_size=64, shuffle=True)
            step, acc = 0, None
            while step < total_steps:
                model.train()
                total_loss = 0.0
                for data, target in train_loader:
                    optimizer.zero_grad()
                    loss = criterion(model(data), target)
                    loss.backward()
                    optimizer.step()
                    total_loss += loss.item()
                    step += 1
                    if step == total_steps:
                        break
                acc = test_accuracy(model, test_loader)  # one test evaluation per epoch
            results[label].append(acc)
    with open(args.json_out, "w") as f:
        json.dump({"final_test_acc": results, "train_seconds": time.perf_counter() - started}, f)


if __name__ == "__main__":
    main()
