"""Training recipes as plain, validated data."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train (everything but the model).

    Attributes:
        dataset: ``mnist`` or ``fashion``.
        optimizer: ``sgd`` or ``adam``.
        lr, momentum, weight_decay: optimizer settings (``momentum`` for SGD).
        adam_eps: Adam's epsilon (Keras uses 1e-7, torch 1e-8).
        batch_size: examples per step, drawn without replacement within an
            epoch from a permutation fixed by ``data_seed`` and the epoch number.
        epochs / steps: training length; give one (``epochs`` may be fractional).
        scaling: ``standardize`` (mean/std of the train set) or ``unit`` (/255).
        eval_every: evaluate the test set every this many steps (plus four times
            as often during the first ``2 * eval_every`` steps, where curves move fastest).
        data_seed: the batch order; all K stacked models see the same batches.
        bf16: bfloat16 autocast for matmuls and convolutions (off by default). Stacked
            runs (K > 1) keep float32 master weights and compute with bf16 copies that a
            compiled optimizer pass refreshes, instead of casting every step: the same
            numbers, fewer passes over the weights (``bnlab.train.mixed_precision``).
        checkpoint_every: save a resumable checkpoint every this many steps.
        drop_last: skip the last, incomplete batch of every epoch (as DataLoader's
            ``drop_last``), e.g. for Ghost BN, which needs batches that are a multiple
            of its virtual batch size.
        accumulate: split each batch into this many micro-batches, each with its own
            forward and backward pass, and take one optimizer step on the summed
            gradients (gradient accumulation). Batch norm then sees micro-batches
            only, and updates its running statistics once per micro-batch.
    """

    dataset: str = "mnist"
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    batch_size: int = 64
    epochs: float | None = None
    steps: int | None = None
    scaling: str = "standardize"
    eval_every: int = 100
    data_seed: int = 0
    bf16: bool = False
    checkpoint_every: int = 500
    accumulate: int = 1
    drop_last: bool = False

    def __post_init__(self):
        if self.dataset not in ("mnist", "fashion"):
            raise ValueError(f"dataset must be 'mnist' or 'fashion', got {self.dataset!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.scaling not in ("standardize", "unit"):
            raise ValueError(f"scaling must be 'standardize' or 'unit', got {self.scaling!r}")
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs and steps")
        if self.epochs is not None and self.epochs <= 0 or self.steps is not None and self.steps < 1:
            raise ValueError("training length must be positive")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (batch statistics need two values)")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.accumulate < 1 or self.batch_size % self.accumulate:
            raise ValueError(f"accumulate must be >= 1 and divide batch_size ({self.batch_size}), got {self.accumulate}")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise ValueError("eval_every and checkpoint_every must be at least 1")

    def steps_per_epoch(self, n_train: int) -> int:
        if self.drop_last:
            if n_train < self.batch_size:
                raise ValueError(f"drop_last with batch_size {self.batch_size} leaves no batch of {n_train} examples")
            return n_train // self.batch_size
        return math.ceil(n_train / self.batch_size)

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, round(self.epochs * self.steps_per_epoch(n_train)))

    def is_eval_step(self, step: int, total: int) -> bool:
        dense = max(1, self.eval_every // 4)
        return step == total or step % self.eval_every == 0 or (step < 2 * self.eval_every and step % dense == 0)

    def with_(self, **changes) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**d)
