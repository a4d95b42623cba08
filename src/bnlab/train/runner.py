"""Run a group of seeds through the engine with the run store: reuse, resume, record.

:func:`run_group` is what every command calls. For a given (label, model,
recipe, seeds) it

* returns the stored runs if an identical group already finished,
* resumes an identical group that was interrupted (from its last checkpoint,
  dropping metrics logged after it), or
* starts a new group,

and records metrics at each evaluation step, a checkpoint every
``checkpoint_every`` steps and on Ctrl-C/SIGTERM, and a per-run summary at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import bnlab
from bnlab.data import Dataset, load_dataset
from bnlab.models.spec import ModelSpec
from bnlab.store import HEARTBEAT_SECONDS, DiskFullError, LeaseLost, RunStore, StoreError, config_key
from bnlab.train.config import TrainConfig
from bnlab.train.engine import (CheckpointDamaged, Probe, StackedTrainer, StopRequested, graceful_stop,
                                load_checkpoint_file, prepare_data, previous_checkpoint)

__all__ = ["GroupResult", "StartFrom", "run_group", "resume", "trained_models", "group_config", "code_version"]


@dataclass(frozen=True)
class GroupResult:
    group_id: str
    run_ids: list[str]
    reused: bool
    wall_seconds: float
    steps_per_second: float | None  # None when reused
    # seconds this call spent per phase: data, setup, training, evaluation, probes, checkpoints
    phases: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StartFrom:
    """Start a group from the trained models of another, finished group (fine-tuning), then prepare them.

    Attributes:
        group_id: the finished group whose checkpoint holds the starting weights (same model
            architecture and seeds).
        name: what ``prepare`` does, in words; with ``group_id`` it is part of the group's identity,
            so a rerun with the same start and preparation reuses the stored runs.
        prepare: ``prepare(trainer)`` after the weights are loaded and before training, e.g.
            ``freeze_batchnorm(trainer.model)`` then ``trainer.reset_optimizer()``. When the group
            resumes, it runs again before the checkpoint is loaded, so the structure matches.
    """

    group_id: str
    name: str = "as trained"
    prepare: Callable[[StackedTrainer], None] | None = None


def group_config(label: str, spec: ModelSpec, cfg: TrainConfig, seeds: list[int],
                 start_from: StartFrom | None = None) -> dict:
    config = {"label": label, "model": spec.to_dict(), "train": cfg.to_dict(), "seeds": list(seeds)}
    if start_from is not None:
        config["start_from"] = {"group": start_from.group_id, "prepare": start_from.name}
    return config


_CODE_VERSION: str | None = None


def code_version() -> str:
    """``bnlab <version>`` plus the git commit of the source tree when there is one."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        version = f"bnlab {bnlab.__version__}"
        try:
            root = Path(bnlab.__file__).resolve().parents[2]
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, timeout=5)
            if commit.returncode == 0:
                version += f" ({commit.stdout.strip()})"
        except (OSError, subprocess.SubprocessError):
            pass
        _CODE_VERSION = version
    return _CODE_VERSION


def run_group(
    store: RunStore,
    label: str,
    spec: ModelSpec,
    cfg: TrainConfig,
    seeds: list[int],
    *,
    dataset: Dataset | None = None,
    probes: tuple[Probe, ...] = (),
    progress: bool = True,
    start_from: StartFrom | None = None,
) -> GroupResult:
    config = group_config(label, spec, cfg, seeds, start_from)
    key = config_key(config)
    for group_id, records in _groups(store, key).items():  # the cheap path of a rerun: no data, no model
        if all(r.status == "finished" for r in records):
            return _reused(store, group_id, seeds)

    clock = time.perf_counter()
    dataset = dataset if dataset is not None else load_dataset(cfg.dataset)
    data = prepare_data(dataset, cfg, spec)
    built = time.perf_counter()
    trainer = StackedTrainer(spec, cfg, seeds, data, probes)
    if start_from is not None:
        _start(store, trainer, start_from, label, spec, seeds)
    phases = {"data": built - clock, "setup": time.perf_counter() - built}

    def waiting(owner) -> None:
        print(f"bnlab: {label}: an identical job (process {owner.pid} on {owner.host}) is training it; "
              "waiting to reuse its result", file=sys.stderr)

    state, group_id, run_ids = store.claim_group(key, [(label, s, {**config, "seed": s}) for s in seeds],
                                                 trainer.total_steps, code_version(), on_wait=waiting)
    if state == "finished":
        return _reused(store, group_id, seeds)
    try:
        if state == "resume":
            _restore(store, trainer, group_id)
    except BaseException:
        store.mark(group_id, "interrupted")
        raise
    return _train(store, trainer, group_id, run_ids, label, progress, phases)


def _groups(store: RunStore, key: str) -> dict[str, list]:
    groups: dict[str, list] = {}
    for record in store.runs(group_key=key):
        groups.setdefault(record.group_id, []).append(record)
    return groups


def _reused(store: RunStore, group_id: str, seeds: list[int]) -> GroupResult:
    records = sorted(store.runs(group_id=group_id), key=lambda r: seeds.index(r.seed))
    return GroupResult(group_id, [r.id for r in records], True, records[0].wall_seconds, None)


def _start(store: RunStore, trainer: StackedTrainer, start_from: StartFrom, label: str, spec: ModelSpec,
           seeds: list[int]) -> None:
    _apply_start(trainer, start_state(store, start_from, label, spec, seeds), start_from.prepare)


def start_state(store: RunStore, start_from: StartFrom, label: str, spec: ModelSpec, seeds: list[int]) -> dict:
    """The model state ``label`` starts from: the finished group ``start_from`` names, checked to hold
    the same architecture and seeds."""
    start = store.checkpoint_path(start_from.group_id)
    origin = store.runs(group_id=start_from.group_id)
    if not origin or any(r.status != "finished" for r in origin):
        raise StoreError(f"group {start_from.group_id} has not finished training; finish it before "
                         f"starting {label} from it")
    if origin[0].config["model"] != spec.to_dict() or origin[0].config["seeds"] != list(seeds):
        raise StoreError(f"group {start_from.group_id} has another model or other seeds than {label}")
    if not start.exists():
        raise StoreError(f"group {start_from.group_id} has no checkpoint to start {label} from; train it first")
    return load_checkpoint_file(start)["model"]


def _apply_start(trainer: StackedTrainer, state: dict, prepare: Callable[[StackedTrainer], None] | None) -> None:
    trainer.model.load_state_dict(state)
    if prepare is not None:
        prepare(trainer)


def _restore(store: RunStore, trainer: StackedTrainer, group_id: str) -> None:
    """Load an interrupted group's latest readable checkpoint (the one before it if the latest is
    damaged, else none: a restart from step 0), say which when it is not the latest, and drop the
    metrics logged after it."""
    latest = store.checkpoint_path(group_id)
    damaged = []
    for path in (latest, previous_checkpoint(latest)):
        if not path.exists():
            continue
        try:
            state = load_checkpoint_file(path)
        except CheckpointDamaged as exc:
            damaged.append(str(exc))
            continue
        trainer.load_state_dict(state)
        break
    if damaged:
        where = f"resuming from step {trainer.step}" if trainer.step else "restarting the group from step 0"
        print(f"bnlab: {'; '.join(damaged)}; {where}", file=sys.stderr)
    store.truncate_metrics(group_id, after_step=trainer.step)
    store.heartbeat(group_id, steps_done=trainer.step)


def resume(store: RunStore, run_id: str, *, progress: bool = True, force: bool = False) -> GroupResult:
    """Continue the group that ``run_id`` belongs to from its last checkpoint.

    If another live process holds the group, this waits for it and returns its result, unless
    ``force``: then the group is taken over at once (for a holder known to be gone)."""
    record = store.run(run_id)
    if record.effective_status == "finished":
        raise StoreError(f"run {record.id} already finished; nothing to resume")
    if force and record.lease_live:
        store.release(record.group_id)
    c = record.config
    if "start_from" in c:
        raise StoreError(f"run {record.id} was fine-tuned from group {c['start_from']['group']} "
                         f"({c['start_from']['prepare']}); rerun the command that made it to resume it")
    try:
        spec, cfg = ModelSpec.from_dict(c["model"]), TrainConfig.from_dict(c["train"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"run {record.id} was made with settings this bnlab cannot rebuild ({exc}); "
                         f"resume it with the bnlab that made it ({record.code_version})") from None
    return run_group(store, c["label"], spec, cfg, c["seeds"], progress=progress)


def trained_models(store: RunStore, group_id: str) -> list:
    """The K models of a trained group (from its checkpoint), as plain ``nn.Sequential`` in seed order."""
    from bnlab.models import StackedModel, build_model

    config = store.runs(group_id=group_id)[0].config
    spec = ModelSpec.from_dict(config["model"])
    shared = TrainConfig.from_dict(config["train"]).data_order == "shared"  # the first layer's weight layout
    stacked = StackedModel([build_model(spec, seed=s) for s in config["seeds"]], shared_input=shared)
    stacked.load_state_dict(load_checkpoint_file(store.checkpoint_path(group_id))["model"])
    return stacked.write_back()


def _train(store: RunStore, trainer: StackedTrainer, group_id: str, run_ids: list[str], label: str,
           progress: bool, phases: dict[str, float]) -> GroupResult:
    """Train a group this process holds the lease of; the store's wall time and ``steps_done``
    advance with each heartbeat and checkpoint, so a killed process loses neither its bookkeeping
    nor more than the steps since its last checkpoint."""
    checkpoint = store.checkpoint_path(group_id)
    start_step, started = trainer.step, time.perf_counter()
    banked = started  # wall time up to here is in the store

    def bank(**extra) -> None:
        nonlocal banked
        now = time.perf_counter()
        store.heartbeat(group_id, add_wall_seconds=now - banked, **extra)
        banked = now

    def log(step: int, metrics: dict[str, torch.Tensor]) -> None:
        values = [(run_ids[k], name, float(v[k])) for name, v in metrics.items() for k in range(trainer.k)]
        store.log_metrics(step, values)
        if "test_acc" in metrics:
            bar.set_postfix(test_acc=f"{metrics['test_acc'].mean():.4f}", refresh=False)

    def save(step: int) -> None:
        bank()  # first: a process that lost the group must not overwrite the new holder's checkpoint
        trainer.save_checkpoint(checkpoint)
        store.heartbeat(group_id, steps_done=step)

    def advance(steps: int) -> None:
        bar.update(steps)
        if time.perf_counter() - banked >= HEARTBEAT_SECONDS:
            bank()

    bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc=f"{label} ×{trainer.k}", unit="step",
               disable=not progress, mininterval=0.5, dynamic_ncols=True, leave=True)
    try:
        with graceful_stop() as flag:
            trainer.run(on_eval=log, on_checkpoint=save, progress=advance, stop_flag=flag)
        measuring = time.perf_counter()
        final = trainer.final_metrics()
        log(trainer.total_steps, final)
        trainer.timings["evaluation"] += time.perf_counter() - measuring
        bank()
        saving = time.perf_counter()
        trainer.save_checkpoint(checkpoint)  # the trained models, for later inspection
        trainer.timings["checkpoints"] += time.perf_counter() - saving
    except LeaseLost:
        raise  # the group is another process's now: leave its rows alone
    except (StopRequested, KeyboardInterrupt, DiskFullError):
        # StopRequested saved a checkpoint at this step; a forced second Ctrl-C or a full disk
        # resumes from the last periodic one (the store's steps_done says which).
        _end(store, group_id, "interrupted", time.perf_counter() - banked)
        raise
    except BaseException:
        _end(store, group_id, "failed", time.perf_counter() - banked)
        raise
    finally:
        bar.close()
    phases = {**phases, **trainer.timings}
    for k, run_id in enumerate(run_ids):
        store.set_summary(run_id, {**{name: float(v[k]) for name, v in final.items()},
                                   "evaluation": trainer.eval_plan.describe(), "phases_seconds": phases})
    segment = time.perf_counter() - started
    store.mark(group_id, "finished", steps_done=trainer.step, add_wall_seconds=time.perf_counter() - banked)
    rate = (trainer.step - start_step) / segment if segment > 0 else None
    total_wall = store.runs(group_id=group_id)[0].wall_seconds  # every segment, killed ones included
    return GroupResult(group_id, run_ids, False, total_wall, rate, phases)


def _end(store: RunStore, group_id: str, status: str, add_wall_seconds: float) -> None:
    """Release the lease; if the store itself cannot be written (a full disk), the lease expires instead."""
    try:
        store.mark(group_id, status, add_wall_seconds=add_wall_seconds)
    except StoreError as exc:
        print(f"bnlab: could not mark group {group_id} {status} ({exc}); it will read as interrupted",
              file=sys.stderr)


# -- training away from the store (a Ray worker), recorded by the process that owns the store ---------------


def train_detached(label: str, spec: dict, cfg: dict, seeds: list[int], dataset: Dataset,
                   threads: int | None = None, probes: tuple[Probe, ...] = (), start: tuple | None = None) -> dict:
    """Train one group where the run store is not (a Ray task on another core or machine): the same
    :class:`~bnlab.train.StackedTrainer` run as :func:`run_group`'s, returning everything
    :func:`record_detached` writes (every evaluation's metrics, probes' included, the final ones, the
    trained state). ``start``: ``(model state, prepare)`` to fine-tune from (see :func:`start_state`
    and :class:`StartFrom`). Plain Python: nothing here imports Ray."""
    if threads is not None:
        torch.set_num_threads(threads)
    spec_, cfg_ = ModelSpec.from_dict(spec), TrainConfig.from_dict(cfg)
    started = time.perf_counter()
    trainer = StackedTrainer(spec_, cfg_, seeds, prepare_data(dataset, cfg_, spec_), probes)
    if start is not None:
        _apply_start(trainer, *start)
    metrics: list[tuple[int, dict[str, list[float]]]] = []
    trainer.run(on_eval=lambda step, m: metrics.append((step, {k: v.tolist() for k, v in m.items()})))
    final = {k: v.tolist() for k, v in trainer.final_metrics().items()}
    metrics.append((trainer.total_steps, final))
    return {"label": label, "metrics": metrics, "final": final, "state": trainer.state_dict(),
            "total_steps": trainer.total_steps, "phases": dict(trainer.timings),
            "evaluation": trainer.eval_plan.describe(), "wall_seconds": time.perf_counter() - started}


def record_detached(store: RunStore, spec: ModelSpec, cfg: TrainConfig, seeds: list[int], result: dict,
                    start_from: StartFrom | None = None) -> GroupResult:
    """Write a :func:`train_detached` result into ``store`` as a finished group (or reuse an identical
    finished one): the store's only writer stays the process that owns it."""
    label = result["label"]
    config = group_config(label, spec, cfg, seeds, start_from)
    state, group_id, run_ids = store.claim_group(config_key(config), [(label, s, {**config, "seed": s}) for s in seeds],
                                                 result["total_steps"], code_version())
    if state == "finished":
        return _reused(store, group_id, seeds)
    try:
        store.truncate_metrics(group_id, after_step=0)  # an interrupted earlier attempt's rows
        for step, values in result["metrics"]:
            store.log_metrics(step, [(run_ids[k], name, float(v[k])) for name, v in values.items()
                                     for k in range(len(seeds))])
        for k, run_id in enumerate(run_ids):
            store.set_summary(run_id, {**{name: float(v[k]) for name, v in result["final"].items()},
                                       "evaluation": result["evaluation"], "phases_seconds": result["phases"]})
        checkpoint = store.checkpoint_path(group_id)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        partial = checkpoint.with_suffix(".partial")
        torch.save(result["state"], partial)
        os.replace(partial, checkpoint)
    except BaseException:
        _end(store, group_id, "interrupted", 0.0)
        raise
    store.mark(group_id, "finished", steps_done=result["total_steps"], add_wall_seconds=result["wall_seconds"])
    rate = result["total_steps"] / result["wall_seconds"] if result["wall_seconds"] > 0 else None
    return GroupResult(group_id, run_ids, False, result["wall_seconds"], rate, result["phases"])


def finished_group(store: RunStore, label: str, spec: ModelSpec, cfg: TrainConfig, seeds: list[int],
                   start_from: StartFrom | None = None) -> GroupResult | None:
    """The finished group :func:`run_group` would reuse for these arguments, or None."""
    key = config_key(group_config(label, spec, cfg, seeds, start_from))
    for group_id, records in _groups(store, key).items():
        if all(r.status == "finished" for r in records):
            return _reused(store, group_id, seeds)
    return None
