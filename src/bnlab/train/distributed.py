"""Data-parallel training of one model with DistributedDataParallel and synchronised batch norm.

Launched by ``torchrun`` (or ``bnlab train --nproc N``, which calls torchrun), every process trains
the same model on its share of each batch:

* the global batch of ``batch_size`` examples is split over the W workers by a
  ``DistributedSampler`` (each epoch a seeded permutation; worker r takes every W-th example), so the
  W slices of a step are the examples one process would take for that step (when W does not divide the
  training set, the sampler repeats up to W − 1 examples per epoch to even the slices out);
* every batch norm is a :class:`bnlab.nn.SyncBatchNorm`: it normalizes with the statistics of the
  whole global batch, so the model computes what it computes on one process;
* every worker's slice has the same length (the sampler sees to it), so each worker's mean loss,
  averaged over the W workers by DDP, is the global batch's mean: so is the gradient, the last
  partial batch of an epoch included.

Hence W processes train the model one process trains, to float32 round-off (tested with 2 gloo
processes). Rank 0 evaluates and writes the run store; the others only train.

With a ``checkpoint`` file, rank 0 saves the model, the optimizer and the step there every
``checkpoint_every`` steps (atomically), and a run that finds the file resumes from it: what
``torchrun --max-restarts`` needs after a worker dies. A run may resume on another number of workers:
the global batches are the same for every W that divides the training set (otherwise the sampler's
padding repeats up to W − 1 examples in each epoch's last batch). A resumed run trains what an
uninterrupted one trains, except for dropout masks, which are drawn afresh.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bnlab.data import Dataset
from bnlab.models import ModelSpec, build_model
from bnlab.train.config import TrainConfig
from bnlab.train.engine import CheckpointDamaged, _make_optimizer, load_checkpoint_file, prepare_data

__all__ = ["train_data_parallel", "DistributedResult", "world_from_environment"]


@dataclass
class DistributedResult:
    world_size: int
    steps: int
    seconds_per_step: float
    test_acc: float
    test_loss: float
    model: nn.Module  # rank 0's model (the same on every rank), unwrapped, SyncBatchNorm reverted
    run_id: str | None = None


def world_from_environment() -> tuple[int, int]:
    """``(rank, world size)`` as torchrun sets them (``RANK``, ``WORLD_SIZE``), or ``(0, 1)``."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), 1000):
        logits = model(x[start : start + 1000])
        loss += float(nn.functional.cross_entropy(logits, y[start : start + 1000], reduction="sum"))
        correct += int((logits.argmax(1) == y[start : start + 1000]).sum())
    model.train(was)
    return loss / len(x), correct / len(x)


def _resume_state(checkpoint: Path | None, identity: dict, world: int) -> dict | None:
    """The checkpoint to resume from, read by rank 0 and sent to every rank (so only rank 0's machine
    needs the file), or None when there is none yet; one made by another model, config or seed is an
    error rather than a silent restart."""
    import torch.distributed as dist

    state = None
    if checkpoint is not None and world_from_environment()[0] == 0 and checkpoint.exists():
        try:
            state = load_checkpoint_file(checkpoint)
        except CheckpointDamaged as exc:
            state = {"error": f"{exc}: delete it to start afresh"}
        except OSError as exc:  # told to every rank below, rather than leaving them waiting for rank 0
            state = {"error": f"checkpoint {checkpoint} cannot be read ({exc})"}
        else:
            if state.get("identity") != identity:
                state = {"error": f"checkpoint {checkpoint} was made by another model, training config or seed; "
                                  "delete it or give another --checkpoint"}
    if world > 1:
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    if state is not None and "error" in state:
        raise ValueError(state["error"])
    return state


def _save_checkpoint(checkpoint: Path, identity: dict, model: nn.Module, optimizer, step: int) -> None:
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    partial = checkpoint.with_name(checkpoint.name + ".partial")
    torch.save({"identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step}, partial)
    os.replace(partial, checkpoint)  # a run killed while saving leaves the previous checkpoint whole


def train_data_parallel(spec: ModelSpec, cfg: TrainConfig, dataset: Dataset, *, seed: int = 0,
                        store=None, label: str = "train", log=print,
                        checkpoint: str | Path | None = None) -> DistributedResult:
    """Train ``spec`` with ``cfg`` on ``dataset`` across the process group torchrun set up (or in this
    process alone), as described in the module docstring; returns rank 0's result on every rank.
    ``checkpoint``: a file to save to every ``cfg.checkpoint_every`` steps and to resume from."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    import bnlab.nn as bnn

    rank, world = world_from_environment()
    unsupported = {name: value for name, value in (("accumulate", cfg.accumulate != 1), ("bf16", cfg.bf16),
                                                    ("data_order", cfg.data_order != "per_seed")) if value}
    if unsupported:
        raise ValueError(f"data-parallel training does not do {', '.join(unsupported)} yet; train with the "
                         "defaults for these settings")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # the model stays on the CPU: NCCL would need device placement
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {world} workers; choose a multiple")
    data = prepare_data(dataset, cfg, spec)
    model = bnn.convert_sync_batchnorm(build_model(spec, seed=seed))
    model.train()
    optimizer = _make_optimizer(cfg, model.parameters())
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    # what must match for a checkpoint to continue this run (how often it is saved need not)
    identity = {"model": spec.to_dict(), "seed": seed,
                "train": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"}}
    resumed = _resume_state(checkpoint, identity, world)
    step = 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        step = int(resumed["step"])
        log(f"resuming from {checkpoint} at step {step}")
    net = DistributedDataParallel(model) if world > 1 else model
    n = len(data.train_y)
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=cfg.drop_last)
    local_batch = cfg.batch_size // world
    steps_per_epoch = cfg.steps_per_epoch(n)
    total = cfg.total_steps(n)
    run_id = None
    if rank == 0 and store is not None:
        from bnlab.train.runner import code_version, group_config

        config = {**group_config(label, spec, cfg, [seed]), "world_size": world, "resumed_from_step": step}
        # every invocation trains (the other ranks cannot know what rank 0 would reuse), and is recorded
        key = f"distributed:{label}:{uuid.uuid4().hex}"
        _, group_id, (run_id,) = store.claim_group(key, [(label, seed, config)], total, code_version())
    first_step, started = step, time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        # dropout: each rank draws its own masks for its slice (the one way W workers differ from one
        # process; without dropout they train the same model)
        torch.manual_seed(seed * 1000 + rank + 7919 * step)
        while step < total:
            sampler.set_epoch(step // steps_per_epoch)
            order = torch.tensor(list(iter(sampler)))
            for position in range(step % steps_per_epoch, steps_per_epoch):
                if step >= total:
                    break
                idx = order[position * local_batch : (position + 1) * local_batch]
                if len(idx) * world < 2:  # a global batch of one has no batch variance: take the epoch's start
                    idx = order[: max(1, 2 // world)]
                x, y = data.train_x[idx], data.train_y[idx]
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(net(x), y).backward()
                optimizer.step()
                step += 1
                if rank == 0 and checkpoint is not None and (step % cfg.checkpoint_every == 0 or step == total):
                    _save_checkpoint(checkpoint, identity, model, optimizer, step)
                if rank == 0 and cfg.is_eval_step(step, total):
                    test_loss, test_acc = _evaluate(model, data.test_x, data.test_y)
                    if store is not None:
                        store.log_metrics(step, [(run_id, "test_acc", test_acc), (run_id, "test_loss", test_loss)])
                        store.heartbeat(group_id, steps_done=step)
                    log(f"step {step}/{total}: test accuracy {test_acc:.4f}")
    seconds = (time.perf_counter() - started) / max(1, total - first_step)
    plain = bnn.revert_sync_batchnorm(model)
    test_loss, test_acc = _evaluate(plain, data.test_x, data.test_y) if rank == 0 else (float("nan"),) * 2
    if rank == 0 and store is not None:
        store.set_summary(run_id, {"final_test_acc": test_acc, "world_size": world, "seconds_per_step": seconds})
        store.mark(group_id, "finished", steps_done=total, add_wall_seconds=seconds * (total - first_step))
    if world > 1:
        dist.barrier()
    return DistributedResult(world, total, seconds, test_acc, test_loss, plain, run_id)
