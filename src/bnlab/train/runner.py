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

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import bnlab
from bnlab.data import Dataset, load_dataset
from bnlab.models.spec import ModelSpec
from bnlab.store import RunStore, StoreError, config_key
from bnlab.train.config import TrainConfig
from bnlab.train.engine import Probe, StackedTrainer, StopRequested, graceful_stop, prepare_data

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
    groups: dict[str, list] = {}
    for record in store.runs(group_key=key):
        groups.setdefault(record.group_id, []).append(record)
    for group_id, records in groups.items():
        if all(r.status == "finished" for r in records):
            return GroupResult(group_id, [r.id for r in records], True, records[0].wall_seconds, None)
    resumable = None
    for group_id, records in groups.items():
        status = records[0].effective_status
        if status == "running":
            raise StoreError(f"an identical job ({label}, group {group_id}) is running in process "
                             f"{records[0].pid}; wait for it or stop it first")
        resumable = resumable or (group_id, records)

    clock = time.perf_counter()
    dataset = dataset if dataset is not None else load_dataset(cfg.dataset)
    data = prepare_data(dataset, cfg, spec)
    built = time.perf_counter()
    trainer = StackedTrainer(spec, cfg, seeds, data, probes)
    if start_from is not None:
        start = store.checkpoint_path(start_from.group_id)
        origin = store.runs(group_id=start_from.group_id)
        if not origin or any(r.status != "finished" for r in origin):
            raise StoreError(f"group {start_from.group_id} has not finished training; finish it before "
                             f"starting {label} from it")
        if origin[0].config["model"] != spec.to_dict() or origin[0].config["seeds"] != list(seeds):
            raise StoreError(f"group {start_from.group_id} has another model or other seeds than {label}")
        if not start.exists():
            raise StoreError(f"group {start_from.group_id} has no checkpoint to start {label} from; train it first")
        trainer.model.load_state_dict(torch.load(start, weights_only=False)["model"])
        if start_from.prepare is not None:
            start_from.prepare(trainer)
    phases = {"data": built - clock, "setup": time.perf_counter() - built}
    if resumable is not None:
        group_id, records = resumable
        run_ids = [r.id for r in sorted(records, key=lambda r: seeds.index(r.seed))]
        checkpoint = store.checkpoint_path(group_id)
        if checkpoint.exists():
            trainer.load_checkpoint(checkpoint)
        store.truncate_metrics(group_id, after_step=trainer.step)
    else:
        group_id, run_ids = store.create_group(
            key, [(label, s, {**config, "seed": s}) for s in seeds], trainer.total_steps, code_version()
        )
    return _train(store, trainer, group_id, run_ids, label, progress, phases)


def resume(store: RunStore, run_id: str, *, progress: bool = True) -> GroupResult:
    """Continue the group that ``run_id`` belongs to from its last checkpoint."""
    record = store.run(run_id)
    if record.effective_status == "finished":
        raise StoreError(f"run {record.id} already finished; nothing to resume")
    c = record.config
    if "start_from" in c:
        raise StoreError(f"run {record.id} was fine-tuned from group {c['start_from']['group']} "
                         f"({c['start_from']['prepare']}); rerun the command that made it to resume it")
    return run_group(store, c["label"], ModelSpec.from_dict(c["model"]), TrainConfig.from_dict(c["train"]),
                     c["seeds"], progress=progress)


def trained_models(store: RunStore, group_id: str) -> list:
    """The K models of a trained group (from its checkpoint), as plain ``nn.Sequential`` in seed order."""
    from bnlab.models import StackedModel, build_model

    config = store.runs(group_id=group_id)[0].config
    spec = ModelSpec.from_dict(config["model"])
    shared = TrainConfig.from_dict(config["train"]).data_order == "shared"  # the first layer's weight layout
    stacked = StackedModel([build_model(spec, seed=s) for s in config["seeds"]], shared_input=shared)
    stacked.load_state_dict(torch.load(store.checkpoint_path(group_id), weights_only=False)["model"])
    return stacked.write_back()


def _train(store: RunStore, trainer: StackedTrainer, group_id: str, run_ids: list[str], label: str,
           progress: bool, phases: dict[str, float]) -> GroupResult:
    checkpoint = store.checkpoint_path(group_id)
    start_step, started = trainer.step, time.perf_counter()
    store.mark(group_id, "running", steps_done=trainer.step)

    def log(step: int, metrics: dict[str, torch.Tensor]) -> None:
        values = [(run_ids[k], name, float(v[k])) for name, v in metrics.items() for k in range(trainer.k)]
        store.log_metrics(step, values, steps_done=step, group_id=group_id)
        if "test_acc" in metrics:
            bar.set_postfix(test_acc=f"{metrics['test_acc'].mean():.4f}", refresh=False)

    def save(step: int) -> None:
        trainer.save_checkpoint(checkpoint)

    bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc=f"{label} ×{trainer.k}", unit="step",
               disable=not progress, mininterval=0.5, dynamic_ncols=True, leave=True)
    try:
        with graceful_stop() as flag:
            trainer.run(on_eval=log, on_checkpoint=save, progress=bar.update, stop_flag=flag)
    except (StopRequested, KeyboardInterrupt):
        # StopRequested saved a checkpoint at this step; a forced second Ctrl-C resumes
        # from the last periodic one (the store's steps_done says which).
        store.mark(group_id, "interrupted", add_wall_seconds=time.perf_counter() - started)
        raise
    except BaseException:
        store.mark(group_id, "failed", add_wall_seconds=time.perf_counter() - started)
        raise
    finally:
        bar.close()
    measuring = time.perf_counter()
    final = trainer.final_metrics()
    log(trainer.total_steps, final)
    trainer.timings["evaluation"] += time.perf_counter() - measuring
    saving = time.perf_counter()
    trainer.save_checkpoint(checkpoint)  # the trained models, for later inspection
    trainer.timings["checkpoints"] += time.perf_counter() - saving
    elapsed = time.perf_counter() - started
    phases = {**phases, **trainer.timings}
    for k, run_id in enumerate(run_ids):
        store.set_summary(run_id, {**{name: float(v[k]) for name, v in final.items()},
                                   "evaluation": trainer.eval_plan.describe(), "phases_seconds": phases})
    store.mark(group_id, "finished", steps_done=trainer.step, add_wall_seconds=elapsed)
    rate = (trainer.step - start_step) / elapsed if elapsed > 0 else None
    return GroupResult(group_id, run_ids, False, elapsed, rate, phases)
