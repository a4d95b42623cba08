"""Seed 000's Keras recipe with real Keras 3 (torch backend): the peer of `bnlab compare --preset keras-mlp`.

Dense 128-64-32 ReLU (BN variant: Dense -> BatchNormalization -> Activation('relu')), Dense 10
softmax, Adam, sparse categorical cross-entropy, batch 32, inputs /255, `model.fit` with the test
set as validation data, as the seed does. One process, every seed and both variants.

Usage: KERAS_BACKEND=torch python seed000_keras.py --seeds K --epochs E --json-out PATH
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import torch  # noqa: E402

from bnlab.data import fetch_dataset  # noqa: E402


def build(use_bn: bool) -> keras.Sequential:
    layers = [keras.Input((784,))]
    for width in (128, 64, 32):
        if use_bn:
            layers += [keras.layers.Dense(width), keras.layers.BatchNormalization(), keras.layers.Activation("relu")]
        else:
            layers.append(keras.layers.Dense(width, activation="relu"))
    layers.append(keras.layers.Dense(10, activation="softmax"))
    return keras.Sequential(layers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    ds = fetch_dataset("mnist", log=lambda m: None)
    x_train = ds.train_images.reshape(-1, 784).numpy().astype("float32") / 255.0
    x_test = ds.test_images.reshape(-1, 784).numpy().astype("float32") / 255.0
    y_train, y_test = ds.train_labels.numpy(), ds.test_labels.numpy()
    results = {"no BN": [], "BN": []}
    started = time.perf_counter()
    for label, use_bn in (("no BN", False), ("BN", True)):
        for seed in range(args.seeds):
            keras.utils.set_random_seed(seed)
            model = build(use_bn)
            model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            history = model.fit(x_train, y_train, epochs=args.epochs, batch_size=32,
                                validation_data=(x_test, y_test), verbose=0)
            results[label].append(float(history.history["val_accuracy"][-1]))
    with open(args.json_out, "w") as f:
        json.dump({"final_test_acc": results, "train_seconds": time.perf_counter() - started}, f)


if __name__ == "__main__":
    main()
