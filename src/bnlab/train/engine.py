"""The training engine: K seeds of one model spec trained together on preloaded tensors.

The data lives in memory as tensors; a step gathers a batch by index (no
per-sample Python, no DataLoader). Model k's batch order is a permutation per
epoch that depends only on ``data_seed``, model k's seed and the epoch, so model
k of a stacked run is the run of seed k alone, and any step's batch can be
recomputed when a run resumes (``data_order="shared"``: one order for all K);
see :mod:`bnlab.models.fused`.

Evaluation is planned to cost little next to training (:class:`EvalPlan`):
intermediate points of the test curve on a fixed stratified subset (in bf16
where the CPU has it), milestones (epoch ends, the last step) exactly, on the
full test set in float32.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import shutil
import signal
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from bnlab.data import Dataset
from bnlab.errors import StopRequested
from bnlab.models.fused import StackedConv2d, StackedLinear, StackedModel, per_model_cross_entropy
from bnlab.models.spec import ModelSpec, build_model
from bnlab.store import DiskFullError, StoreError, disk_full_message
from bnlab.train.config import TrainConfig
from bnlab.train.mixed_precision import MasterWeightOptimizer, master_weight_kernels_available

__all__ = ["TrainData", "StackedTrainer", "StopRequested", "graceful_stop", "prepare_data", "EvalPlan",
           "stratified_subset", "batch_order", "CheckpointDamaged", "load_checkpoint_file", "previous_checkpoint"]

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


def stratified_subset(labels: Tensor, size: int, seed: int = 0) -> Tensor:
    """Sorted indices of ``size`` examples with the classes in the proportions of ``labels``
    (largest remainder), drawn by a fixed generator: the same subset on every run and machine."""
    n = len(labels)
    if size <= 0 or size >= n:
        return torch.arange(n)
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * size / n
    quota = exact.floor().long()
    remainder_order = (exact - quota).argsort(descending=True, stable=True)
    quota[remainder_order[: size - int(quota.sum())]] += 1
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:q]])
    return torch.cat(picked).sort().values


@dataclass(frozen=True)
class EvalPlan:
    """What each evaluation measures (see :class:`~bnlab.train.TrainConfig`'s ``eval_*`` fields).

    Intermediate points: ``test_subset`` of the test set, in bf16 if ``bf16``. Milestones: the
    full test set in float32, plus the intermediate measurement at the same step (stored as
    ``test_acc_approx`` / ``test_loss_approx``), so every run measures its curve's approximation
    error. Train-set metrics at the end: ``train_subset`` of the training set, in bf16 if ``bf16``.
    Approximate measurements run batch norm folded into the layer before it
    (:meth:`~bnlab.models.StackedModel.inference_copy`); exact ones run the model as it is.
    """

    test_subset: Tensor | None  # None: the full test set
    train_subset: Tensor | None
    bf16: bool
    n_test: int
    n_train: int

    @property
    def approximate(self) -> bool:
        """Whether the intermediate test points are approximate."""
        return self.test_subset is not None or self.bf16

    @property
    def train_approximate(self) -> bool:
        """Whether the train-set metrics are approximate."""
        return self.train_subset is not None or self.bf16

    def describe(self) -> dict:
        def part(subset, total):
            approximate = subset is not None or self.bf16
            return {"examples": total if subset is None else len(subset), "of": total,
                    "stratified_subset": subset is not None, "dtype": "bfloat16" if self.bf16 else "float32",
                    "batch_norm_folded": approximate}
        return {"intermediate_points": part(self.test_subset, self.n_test),
                "milestones": {"examples": self.n_test, "of": self.n_test, "dtype": "float32",
                               "when": "the first evaluation point of each new epoch, and the last step"},
                "train_metrics": part(self.train_subset, self.n_train)}

    @classmethod
    def from_config(cls, cfg: TrainConfig, data: TrainData) -> EvalPlan:
        def subset(labels, size):
            return stratified_subset(labels, size) if 0 < size < len(labels) else None

        return cls(subset(data.test_y, cfg.eval_subset), subset(data.train_y, cfg.eval_train_subset),
                   cfg.eval_bf16, len(data.test_y), len(data.train_y))


def batch_order(data_seed: int, seed: int | None, epoch: int, n: int) -> Tensor:
    """The permutation of ``n`` training examples that a model of ``seed`` draws its batches from in
    ``epoch`` (``seed=None``: the order shared by all models, ``data_order="shared"``)."""
    if seed is None:
        key = data_seed * 1_000_003 + epoch
    else:  # a hash, so that no two (data_seed, seed, epoch) share a generator seed
        digest = hashlib.blake2b(f"bnlab/{data_seed}/{seed}/{epoch}".encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "little") >> 1
    return torch.randperm(n, generator=torch.Generator().manual_seed(key))


class CheckpointDamaged(StoreError):
    """A checkpoint file cannot be read back (truncated, corrupt); the message names it."""


def previous_checkpoint(path: Path) -> Path:
    """Where :meth:`StackedTrainer.save_checkpoint` keeps the checkpoint that ``path`` replaced."""
    return path.with_suffix(".prev.pt")


def load_checkpoint_file(path: Path) -> dict:
    """A checkpoint's state; :class:`CheckpointDamaged` if the file cannot be read back."""
    try:
        state = torch.load(path, weights_only=False)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        # what a truncated zip, a bad pickle or garbage raises; an OSError (permissions, EIO) is no
        # verdict on the file's content and propagates, so a good checkpoint is never given up for it
        raise CheckpointDamaged(f"checkpoint {path} is damaged ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointDamaged(f"checkpoint {path} is damaged (not a bnlab checkpoint)")
    return state


def _out_of_space(exc: BaseException, directory: Path) -> bool:
    """Whether a failed write was for want of space (torch's zip writer reports only "file write failed")."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        return "write failed" in str(exc) and shutil.disk_usage(directory).free < 64 * 2**20
    except OSError:
        return False


class _StopFlag:
    requested = False
    signum = signal.SIGINT


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
        flag.requested, flag.signum = True, signum

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
        self.shared_order = cfg.data_order == "shared"
        self.model = StackedModel([build_model(spec, seed=s) for s in seeds], shared_input=self.shared_order)
        self.probes = probes
        self.optimizer = self._build_optimizer()
        self.n_train = len(data.train_x)
        self.total_steps = cfg.total_steps(self.n_train)
        self.steps_per_epoch = cfg.steps_per_epoch(self.n_train)
        self.eval_plan = EvalPlan.from_config(cfg, data)
        self._eval_sets: dict[str, tuple[Tensor, Tensor]] = {}
        # seconds spent in each part of run(): what `bnlab compare` reports as its phases
        self.timings = {"training": 0.0, "evaluation": 0.0, "probes": 0.0, "checkpoints": 0.0}
        self.step = 0
        self._interval_loss = torch.zeros(self.k, dtype=torch.float64)
        self._interval_steps = 0
        self._epoch_cache: tuple[int, Tensor] | None = None
        # dropout draws from the global generator: training swaps this state in and out of it
        # (_dropout_rng), so a run is a function of its config and the caller's generator is untouched
        self._rng_state = torch.Generator().manual_seed(cfg.data_seed * 7919 + sum(self.seeds)).get_state()
        self._rng_swapped_in = False

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
        """Indices ``(K, b)`` of each model's batch for 0-based ``step`` (``(1, b)`` with a shared
        order); the last batch of an epoch may be smaller."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            seeds = [None] if self.shared_order else self.seeds
            orders = torch.stack([batch_order(self.cfg.data_seed, s, epoch, self.n_train) for s in seeds])
            self._epoch_cache = (epoch, orders)
        orders = self._epoch_cache[1]
        start = position * self.cfg.batch_size
        idx = orders[:, start : start + self.cfg.batch_size]
        if idx.shape[1] < 2:  # a 1-example batch has no batch variance: take it from the start instead
            idx = orders[:, :2]
        return idx

    # -- one step -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _dropout_rng(self):
        """The run's own generator state in the global generator (which dropout draws from) for the
        block, and the caller's state back after; re-entrant, so ``run`` swaps once, not per step."""
        if self._rng_swapped_in:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            self._rng_swapped_in = True
            try:
                yield
            finally:
                self._rng_state = torch.get_rng_state()
                self._rng_swapped_in = False

    def train_step(self) -> Tensor:
        with self._dropout_rng():
            return self._train_step()

    def _train_step(self) -> Tensor:
        idx = self.batch_indices(self.step)
        if not self.model.training:  # .train() walks every module: ~65 µs a step for nothing
            self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.accumulate == 1:
            losses = self._forward_backward(idx, share=1.0)
        else:
            # each micro-batch is weighted by its share so the summed gradient is the batch mean's
            losses = sum(self._forward_backward(chunk, share=chunk.shape[1] / idx.shape[1])
                         for chunk in idx.chunk(self.cfg.accumulate, dim=1))
        self.optimizer.step()
        self.step += 1
        self._interval_loss += losses
        self._interval_steps += 1
        return losses

    def _forward_backward(self, idx: Tensor, share: float) -> Tensor:
        """Forward and backward on the examples ``idx`` ``(K or 1, b)``, gradients scaled by ``share``;
        the weighted losses."""
        per_model = idx.shape[0] > 1
        if per_model:
            # gathered model-major, (K, b, ...), and viewed as (b, K, ...): each model's batch is then
            # one contiguous matrix, which the first layer's batched matmul (and its weight gradient)
            # reads at full speed; gathered batch-major it ran ~2x slower here
            x, y = self.data.train_x[idx].transpose(0, 1), self.data.train_y[idx].t()
        else:
            x, y = self.data.train_x[idx[0]], self.data.train_y[idx[0]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            logits = self.model(x, per_model=per_model)
        losses = per_model_cross_entropy(logits.float(), y)
        (losses.sum() if share == 1.0 else losses.sum() * share).backward()
        return losses.detach() if share == 1.0 else losses.detach() * share

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, chunk: int = 1000, bf16: bool = False,
                 folded: bool = False) -> tuple[Tensor, Tensor]:
        """Per-model ``(mean loss, accuracy)`` in eval mode (running statistics), in float32 unless ``bf16``.

        ``folded``: through :meth:`~bnlab.models.StackedModel.inference_copy` (batch norm folded into
        the layer before it, weights cast once): the same function up to rounding, at a fraction of
        the cost (no norm pass, no bias pass, no per-chunk weight casts), so it serves the
        approximate points of an :class:`EvalPlan`; exact numbers use the model itself.
        ``chunk`` rows at a time: 1000 was the fastest here for bf16 and within 4% of the best for
        float32 (K=8 torch-mlp), as the activations of a chunk stay in cache."""
        was_training = self.model.training
        self.model.eval()
        model = self.model.inference_copy(torch.bfloat16 if bf16 else torch.float32) if folded else self.model
        loss_sum = torch.zeros(self.k, dtype=torch.float64)
        correct = torch.zeros(self.k, dtype=torch.float64)
        with model.reusing_weights():
            for start in range(0, len(x), chunk):
                xb, yb = x[start : start + chunk], y[start : start + chunk]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(xb).float()
                loss_sum += per_model_cross_entropy(logits, yb).double() * len(xb)
                correct += (logits.argmax(dim=2) == yb.unsqueeze(1)).sum(dim=0).double()
        self.model.train(was_training)
        return loss_sum / len(x), correct / len(x)

    def _eval_set(self, name: str) -> tuple[Tensor, Tensor]:
        """The examples an evaluation of kind ``name`` uses, gathered once (see :class:`EvalPlan`)."""
        if name not in self._eval_sets:
            plan = self.eval_plan
            x, y, subset = {"test": (self.data.test_x, self.data.test_y, None),
                            "test_approx": (self.data.test_x, self.data.test_y, plan.test_subset),
                            "train_approx": (self.data.train_x, self.data.train_y, plan.train_subset)}[name]
            self._eval_sets[name] = (x, y) if subset is None else (x[subset].contiguous(), y[subset].contiguous())
        return self._eval_sets[name]

    def eval_metrics(self) -> dict[str, Tensor]:
        """Metrics recorded at an evaluation step, each a ``(K,)`` tensor.

        ``test_acc``/``test_loss`` are exact (full test set, float32) at milestones and follow the
        :class:`EvalPlan` in between; at a milestone of an approximate plan the approximation is
        also recorded, as ``test_acc_approx``/``test_loss_approx``."""
        plan = self.eval_plan
        milestone = self.cfg.is_milestone(self.step, self.total_steps, self.steps_per_epoch)
        metrics = {}
        if milestone or not plan.approximate:
            metrics["test_loss"], metrics["test_acc"] = self.evaluate(*self._eval_set("test"))
        if plan.approximate:
            loss, acc = self.evaluate_approximately("test_approx")
            suffix = "_approx" if milestone else ""
            metrics["test_loss" + suffix], metrics["test_acc" + suffix] = loss, acc
        if self._interval_steps:
            metrics["train_loss"] = self._interval_loss / self._interval_steps
        self._interval_loss.zero_()
        self._interval_steps = 0
        probing = time.perf_counter()
        for probe in self.probes:
            metrics.update(probe(self))
        self.timings["probes"] += time.perf_counter() - probing
        return metrics

    def evaluate_approximately(self, name: str) -> tuple[Tensor, Tensor]:
        """The cheap measurement of the :class:`EvalPlan` on ``"test_approx"`` or ``"train_approx"``:
        its subset, in its dtype, through the folded inference copy."""
        return self.evaluate(*self._eval_set(name), bf16=self.eval_plan.bf16, folded=True)

    def final_metrics(self) -> dict[str, Tensor]:
        """Train-set loss and accuracy in eval mode at the end, as the :class:`EvalPlan` says."""
        if self.eval_plan.train_approximate:
            loss, acc = self.evaluate_approximately("train_approx")
        else:
            loss, acc = self.evaluate(self.data.train_x, self.data.train_y)
        return {"final_train_loss": loss, "final_train_acc": acc}

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state() if self._rng_swapped_in else self._rng_state.clone(),
            "interval_loss": self._interval_loss.clone(),
            "interval_steps": self._interval_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._rng_state = state["rng"].clone()
        if self._rng_swapped_in:
            torch.set_rng_state(self._rng_state)
        self._interval_loss = state["interval_loss"].clone()
        self._interval_steps = state["interval_steps"]

    def save_checkpoint(self, path: Path) -> None:
        """Write the state to ``path``, keeping the one it replaces as :func:`previous_checkpoint`.

        Written to a ``.partial`` file first and renamed: a crash mid-write leaves the last complete
        checkpoint in place. Raises :class:`~bnlab.store.DiskFullError` (and removes the partial
        file) when the disk is full."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        try:
            torch.save(self.state_dict(), partial)
        except (OSError, RuntimeError) as exc:
            partial.unlink(missing_ok=True)
            if _out_of_space(exc, path.parent):
                raise DiskFullError(disk_full_message(path.parent)) from exc
            raise
        if path.exists():
            os.replace(path, previous_checkpoint(path))
        os.replace(partial, path)

    def load_checkpoint(self, path: Path) -> None:
        self.load_state_dict(load_checkpoint_file(path))

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
        with self._dropout_rng():
            self._run(on_eval, on_checkpoint, progress, stop_flag)

    def _run(self, on_eval, on_checkpoint, progress, stop_flag) -> None:
        timings, clock = self.timings, time.perf_counter
        while self.step < self.total_steps:
            started = clock()
            self.train_step()
            progress(1)
            evaluated = clock()
            timings["training"] += evaluated - started
            if self.cfg.is_eval_step(self.step, self.total_steps):
                probes_before = timings["probes"]
                on_eval(self.step, self.eval_metrics())
                timings["evaluation"] += clock() - evaluated - (timings["probes"] - probes_before)
            stopping = stop_flag is not None and stop_flag.requested
            if stopping or self.step % self.cfg.checkpoint_every == 0:
                saving = clock()
                on_checkpoint(self.step)
                timings["checkpoints"] += clock() - saving
            if stopping:
                raise StopRequested(f"stopped at step {self.step} of {self.total_steps}",
                                    getattr(stop_flag, "signum", signal.SIGINT))


def _make_optimizer(cfg: TrainConfig, params):
    # fused=True: one pass over each (stacked) parameter instead of a loop of small ops;
    # the update is memory-bound and, after the matmuls, the largest cost of a step.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=True)

