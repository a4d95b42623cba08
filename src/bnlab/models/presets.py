"""Named recipes that reproduce the seeds and the paper: plain data, printable with ``bnlab presets``.

Each preset is a model (:class:`~bnlab.models.spec.ModelSpec` fields) plus a
training recipe (a dict read by :class:`bnlab.train.TrainConfig`), plus where it
comes from and which choices are ours because the source leaves them open.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "torch-mlp": {
        "source": "seed 003 (PyTorch tutorial): 784-512-256-10 ReLU, BN before ReLU on fc1/fc2",
        "model": {"arch": "mlp", "hidden": [512, 256], "activation": "relu", "init": "torch",
                  "bias_before_norm": True},
        "train": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 64, "epochs": 5,
                  "scaling": "standardize", "eval_every": 100},
        "our_choices": "evaluation cadence (every 100 steps; the seed only prints epoch losses)",
    },
    "keras-mlp": {
        "source": "seed 000 (Keras tutorial): Dense 128-64-32 ReLU, BN before ReLU, Adam, batch 32, 10 epochs",
        "model": {"arch": "mlp", "hidden": [128, 64, 32], "activation": "relu", "init": "glorot",
                  "norm_convention": "keras", "bias_before_norm": True},
        "train": {"optimizer": "adam", "lr": 1e-3, "adam_eps": 1e-7, "batch_size": 32, "epochs": 10,
                  "scaling": "unit", "eval_every": 200},
        "our_choices": "torch Adam with Keras' eps=1e-7 (Keras adds eps outside the bias correction; "
                       "the difference is below 1e-7 relative)",
    },
    "keras-cnn": {
        "source": "seed 000's CNN: Conv32-BN-ReLU-Pool, Conv64-BN-ReLU-Pool, Dense64-BN-ReLU, Dense10",
        "model": {"arch": "cnn", "conv_channels": [32, 64], "hidden": [64], "activation": "relu",
                  "init": "glorot", "norm_convention": "keras", "bias_before_norm": True},
        "train": {"optimizer": "adam", "lr": 1e-3, "adam_eps": 1e-7, "batch_size": 32, "epochs": 3,
                  "scaling": "unit", "eval_every": 200},
        "our_choices": "the seed shows no training code for the CNN: we use its MLP recipe (Adam, batch 32) "
                       "and 3 epochs to keep CPU time reasonable",
    },
    "ioffe-mlp": {
        "source": "Ioffe & Szegedy 2015 §4.1: 784-100-100-100-10 sigmoid, BN before sigmoid without bias, "
                  "batch 60, 50k steps, small Gaussian init",
        "model": {"arch": "mlp", "hidden": [100, 100, 100], "activation": "sigmoid", "init": "normal",
                  "init_scale": 0.1, "bias_before_norm": False},
        "train": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "batch_size": 60, "steps": 50000,
                  "scaling": "unit", "eval_every": 500},
        "our_choices": "optimizer (plain SGD), learning rate 0.1 and init std 0.1: the paper states none of them",
    },
}
