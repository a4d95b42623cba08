"""Training recipes as plain, validated data."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, fields, replace

__all__ = ["TrainConfig", "native_bf16"]

DATA_ORDERS = ("per_seed", "shared")


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16 in ``/proc/cpuinfo``);
    elsewhere bf16 is emulated and slower than float32, so evaluation stays float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
        data_seed: with ``data_order``, fixes the batch order.
        data_order: ``per_seed`` (default): model k draws its own batch order from
            ``(data_seed, seed_k)``, so a stacked model is an independent run of its seed
            (dropout masks excepted: they are drawn for the whole stack), and model k sees the
            same batches in every variant it is compared in. ``shared``: all K models see the
            same batches (one order from ``data_seed``), so K "seeds" differ only in
            initialization and dropout; runs stored before 2026-12-02 were all made so.
        eval_subset: intermediate evaluation points use a fixed, class-stratified subset of
            this many test images (0: the full test set at every point). Milestones (the first
            evaluation point of each new epoch, and the last step) always use the full test set
            in float32, so the final test accuracy is exact.
        eval_train_subset: the final train-set loss and accuracy use a fixed stratified
            subset of this many training images (0: all of them).
        eval_bf16: intermediate points and the train-set metrics in bfloat16 autocast
            (default: when the CPU has native bf16). Milestones stay float32.
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
    data_order: str = "per_seed"
    eval_subset: int = 2000
    eval_train_subset: int = 10000
    eval_bf16: bool = field(default_factory=native_bf16)
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
        if self.data_order not in DATA_ORDERS:
            raise ValueError(f"data_order must be one of {list(DATA_ORDERS)}, got {self.data_order!r}")
        if self.eval_subset < 0 or self.eval_train_subset < 0:
            raise ValueError("eval_subset and eval_train_subset must be >= 0 (0: the whole set)")
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

    def is_milestone(self, step: int, total: int, steps_per_epoch: int) -> bool:
        """Whether evaluation step ``step`` is measured exactly (full test set, float32): the last step,
        and the first evaluation step at or after the end of each epoch (no extra evaluation is added)."""
        if step == total:
            return True
        previous = next((s for s in range(step - 1, 0, -1) if self.is_eval_step(s, total)), 0)
        return step // steps_per_epoch > previous // steps_per_epoch

    def with_(self, **changes) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)
