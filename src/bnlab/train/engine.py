"""The training engine: K seeds of one model spec trained together on preloaded tensors.

The data lives in memory as tensors; a step gathers a batch by index (no
per-sample Python, no DataLoader) from a permutation that depends only on
``data_seed`` and the epoch, so any step's batch can be recomputed when a run
resumes. All K models see the same batches; see :mod:`bnlab.models.fused`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from bnlab.data import Dataset
from bnlab.models.fused import StackedConv2d, StackedLinear, StackedModel, per_model_cross_entropy
from bnlab.models.spec import ModelSpec, build_model
from bnlab.train.config import TrainConfig
from bnlab.train.mixed_precision import MasterWeightOptimizer, master_weight_kernels_available

__all__ = ["TrainData", "StackedTrainer", "StopRequested", "graceful_stop", "prepare_data"]

# A probe reads the trainer at an evaluation step and returns per-model values: {name: tensor of shape (K,)}.
Probe = Callable[["StackedTrainer"], dict[str, Tensor]]


@dataclass(frozen=True)
class TrainData:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def prepare_data(dataset: Dataset, cfg: TrainConfig, spec: ModelSpec) -> TrainData:
    flatten = spec.arch == "mlp"
    train_x, train_y = dataset.tensors("train", scaling=cfg.scaling, flatten=flatten)
    test_x, test_y = dataset.tensors("test", scaling=cfg.scaling, flatten=flatten)
    return TrainData(train_x, train_y, test_x, test_y)


class StopRequested(Exception):
    """Training stopped at a step boundary because of Ctrl-C or SIGTERM; state was saved."""


class _StopFlag:
    requested = False


@contextlib.contextmanager
def graceful_stop():
    """Turn SIGINT/SIGTERM into a flag checked between steps (a second Ctrl-C stops at once).

    Stopping mid-step could leave the optimizer half-applied; at a step boundary
    the state is whole and can be checkpointed.
    """
    flag = _StopFlag()
    previous = {}

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    if not _in_main_thread():
        yield flag
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class StackedTrainer:
    """Trains ``len(seeds)`` models of ``spec``: model k is initialised by ``build_model(spec, seed=seeds[k])``."""

    def __init__(self, spec: ModelSpec, cfg: TrainConfig, seeds: list[int], data: TrainData,
                 probes: tuple[Probe, ...] = ()):
        self.spec, self.cfg, self.seeds, self.data = spec, cfg, list(seeds), data
        self.k = len(seeds)
        self.model = StackedModel([build_model(spec, seed=s) for s in seeds])
        self.probes = probes
        self.optimizer = self._build_optimizer()
        self.n_train = len(data.train_x)
        self.total_steps = cfg.total_steps(self.n_train)
        self.steps_per_epoch = cfg.steps_per_epoch(self.n_train)
        self.step = 0
        self._interval_loss = torch.zeros(self.k, dtype=torch.float64)
        self._interval_steps = 0
        self._epoch_cache: tuple[int, Tensor] | None = None
        # dropout draws from the global generator; fix it so a run is a function of its config
        torch.manual_seed(cfg.data_seed * 7919 + sum(self.seeds))

    def _build_optimizer(self):
        optimizer = _make_optimizer(self.cfg, self.model.parameters())
        if (self.cfg.bf16 and self.k > 1 and self.cfg.accumulate == 1 and not self.probes
                and master_weight_kernels_available()):
            # Same numbers as autocast, without its per-step weight casts (see mixed_precision).
            # Probes may perturb the float32 weights, which a shadow would not see, and accumulated
            # micro-batch gradients would add up in bf16 on a shadow: both keep plain autocast.
            stacked = [m for m in self.model.modules() if isinstance(m, (StackedLinear, StackedConv2d))]
            optimizer = MasterWeightOptimizer(optimizer, stacked)
        return optimizer

    def reset_optimizer(self) -> None:
        """A fresh optimizer over the model's current parameters, e.g. after ``freeze_batchnorm``
        replaced some layers (their affine is then no longer trained). Optimizer state restarts."""
        if isinstance(self.optimizer, MasterWeightOptimizer):
            self.optimizer.detach_shadows()
        self.optimizer = self._build_optimizer()

    def write_back(self) -> list[nn.Sequential]:
        """The K trained models as plain ``nn.Sequential`` modules, in seed order."""
        return self.model.write_back()

    # -- batches ------------------------------------------------------------------------------

    def batch_indices(self, step: int) -> Tensor:
        """Indices of the batch for 0-based ``step`` (the last batch of an epoch may be smaller)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.data_seed * 1_000_003 + epoch)
            self._epoch_cache = (epoch, torch.randperm(self.n_train, generator=g))
        start = position * self.cfg.batch_size
        idx = self._epoch_cache[1][start : start + self.cfg.batch_size]
        if len(idx) < 2:  # a 1-example batch has no batch variance: take it from the start instead
            idx = self._epoch_cache[1][:2]
        return idx

    # -- one step -----------------------------------------------------------------------------

    def train_step(self) -> Tensor:
        idx = self.batch_indices(self.step)
        if not self.model.training:  # .train() walks every module: ~65 µs a step for nothing
            self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.accumulate == 1:
            losses = self._forward_backward(idx, share=1.0)
        else:
            # each micro-batch is weighted by its share so the summed gradient is the batch mean's
            losses = sum(self._forward_backward(chunk, share=len(chunk) / len(idx))
                         for chunk in idx.chunk(self.cfg.accumulate))
        self.optimizer.step()
        self.step += 1
        self._interval_loss += losses
        self._interval_steps += 1
        return losses

    def _forward_backward(self, idx: Tensor, share: float) -> Tensor:
        """Forward and backward on the examples ``idx``, gradients scaled by ``share``; the weighted losses."""
        x, y = self.data.train_x[idx], self.data.train_y[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            logits = self.model(x)
        losses = per_model_cross_entropy(logits.float(), y)
        (losses.sum() if share == 1.0 else losses.sum() * share).backward()
        return losses.detach() if share == 1.0 else losses.detach() * share

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, chunk: int = 5000) -> tuple[Tensor, Tensor]:
        """Per-model ``(mean loss, accuracy)`` in eval mode (running statistics)."""
        self.model.eval()
        loss_sum = torch.zeros(self.k, dtype=torch.float64)
        correct = torch.zeros(self.k, dtype=torch.float64)
        for start in range(0, len(x), chunk):
            xb, yb = x[start : start + chunk], y[start : start + chunk]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
                logits = self.model(xb)
            logits = logits.float()
            loss_sum += per_model_cross_entropy(logits, yb).double() * len(xb)
            correct += (logits.argmax(dim=2) == yb.unsqueeze(1)).sum(dim=0).double()
        self.model.train()
        return loss_sum / len(x), correct / len(x)

    def eval_metrics(self) -> dict[str, Tensor]:
        """Metrics recorded at an evaluation step, each a ``(K,)`` tensor."""
        test_loss, test_acc = self.evaluate(self.data.test_x, self.data.test_y)
        metrics = {"test_loss": test_loss, "test_acc": test_acc}
        if self._interval_steps:
            metrics["train_loss"] = self._interval_loss / self._interval_steps
        self._interval_loss.zero_()
        self._interval_steps = 0
        for probe in self.probes:
            metrics.update(probe(self))
        return metrics

    def final_metrics(self) -> dict[str, Tensor]:
        """Train-set loss and accuracy over the full train set, in eval mode, at the end."""
        loss, acc = self.evaluate(self.data.train_x, self.data.train_y)
        return {"final_train_loss": loss, "final_train_acc": acc}

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "interval_loss": self._interval_loss.clone(),
            "interval_steps": self._interval_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self._interval_loss = state["interval_loss"].clone()
        self._interval_steps = state["interval_steps"]

    def save_checkpoint(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(self.state_dict(), partial)
        os.replace(partial, path)  # atomic: the previous checkpoint survives a crash mid-write

    def load_checkpoint(self, path: Path) -> None:
        self.load_state_dict(torch.load(path, weights_only=False))

    # -- the loop -----------------------------------------------------------------------------

    def run(
        self,
        *,
        on_eval: Callable[[int, dict[str, Tensor]], None] = lambda step, metrics: None,
        on_checkpoint: Callable[[int], None] = lambda step: None,
        progress: Callable[[int], None] = lambda n: None,
        stop_flag=None,
    ) -> None:
        """Train to ``total_steps``; raise :class:`StopRequested` after a checkpoint if asked to stop."""
        while self.step < self.total_steps:
            self.train_step()
            progress(1)
            if self.cfg.is_eval_step(self.step, self.total_steps):
                on_eval(self.step, self.eval_metrics())
            stopping = stop_flag is not None and stop_flag.requested
            if stopping or self.step % self.cfg.checkpoint_every == 0:
                on_checkpoint(self.step)
            if stopping:
                raise StopRequested(f"stopped at step {self.step} of {self.total_steps}")


def _make_optimizer(cfg: TrainConfig, params):
    # fused=True: one pass over each (stacked) parameter instead of a loop of small ops;
    # the update is memory-bound and, after the matmuls, the largest cost of a step.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=True)

