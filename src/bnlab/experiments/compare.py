"""With vs without batch norm, on one preset, over several seeds: the seeds' central demonstration.

Seeds 000 and 003 train one network with and without BN once each and show
the curves. :func:`run_compare` trains both variants on every seed (stacked,
so all seeds cost little more than one), then summarises each variant with
95% confidence intervals over seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bnlab.data import Dataset, load_dataset
from bnlab.models import PRESETS, ModelSpec
from bnlab.stats import first_step_reaching, mean_ci
from bnlab.store import RunStore
from bnlab.train import TrainConfig, run_group
from bnlab.train.runner import code_version

__all__ = ["CompareRequest", "run_compare", "VARIANTS", "THRESHOLDS"]

THRESHOLDS = (0.95, 0.97)
VARIANTS = {"no BN": "none", "BN": "batch"}


@dataclass(frozen=True)
class CompareRequest:
    preset: str = "torch-mlp"
    seeds: int = 5
    epochs: float | None = None  # None: the preset's own length
    dataset: str = "mnist"
    bf16: bool = False

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)} (see 'bnlab presets')")
        if self.seeds < 1:
            raise ValueError("--seeds must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError("--epochs must be positive")

    def configs(self) -> tuple[dict[str, ModelSpec], TrainConfig]:
        preset = PRESETS[self.preset]
        train = dict(preset["train"], dataset=self.dataset, bf16=self.bf16)
        if self.epochs is not None:
            train.pop("steps", None)
            train["epochs"] = self.epochs
        cfg = TrainConfig.from_dict(train)
        base = ModelSpec.from_dict(preset["model"])
        return {label: base.with_(norm=norm) for label, norm in VARIANTS.items()}, cfg


def run_compare(request: CompareRequest, store: RunStore, *, progress: bool = True,
                dataset: Dataset | None = None) -> dict:
    """Train (or reuse) both variants on all seeds; return the summary (also what summary.json holds)."""
    specs, cfg = request.configs()
    seeds = list(range(request.seeds))
    dataset = dataset if dataset is not None else load_dataset(cfg.dataset)
    started = time.perf_counter()
    variants = {}
    for label, spec in specs.items():
        result = run_group(store, f"{request.preset}/{label}", spec, cfg, seeds, dataset=dataset, progress=progress)
        variants[label] = _summarise_variant(store, result, spec)
    return {
        "request": {
            "preset": request.preset, "seeds": request.seeds, "epochs": request.epochs,
            "dataset": request.dataset, "bf16": request.bf16,
        },
        "preset": PRESETS[request.preset],
        "train_config": cfg.to_dict(),
        "models": {label: spec.to_dict() for label, spec in specs.items()},
        "code_version": code_version(),
        "store": str(store.path),
        "wall_seconds": time.perf_counter() - started,
        "variants": variants,
    }


def _summarise_variant(store: RunStore, result, spec: ModelSpec) -> dict:
    per_seed = []
    curves = {}
    for run_id in result.run_ids:
        record = store.run(run_id)
        series = store.metrics(run_id)
        test_acc = [(s, v) for s, v in series.get("test_acc", [])]
        final = record.summary or {}
        final_test_acc = test_acc[-1][1] if test_acc else None
        row = {
            "run_id": run_id,
            "seed": record.seed,
            "final_test_acc": final_test_acc,
            "final_test_loss": series["test_loss"][-1][1] if series.get("test_loss") else None,
            "final_train_loss": final.get("final_train_loss"),
            "final_train_acc": final.get("final_train_acc"),
        }
        if row["final_train_acc"] is not None and final_test_acc is not None:
            row["train_test_gap"] = row["final_train_acc"] - final_test_acc
        for threshold in THRESHOLDS:
            row[f"steps_to_{round(threshold * 100)}"] = first_step_reaching(test_acc, threshold)
        per_seed.append(row)
        curves[run_id] = {name: series.get(name, []) for name in ("test_acc", "test_loss", "train_loss")}

    def interval(key):
        values = [r[key] for r in per_seed if r.get(key) is not None]
        return mean_ci(values).to_dict()

    aggregate = {key: interval(key) for key in ("final_test_acc", "final_train_loss", "train_test_gap")}
    for threshold in THRESHOLDS:
        key = f"steps_to_{round(threshold * 100)}"
        aggregate[key] = {**interval(key), "reached": sum(r[key] is not None for r in per_seed),
                          "of": len(per_seed)}
    return {
        "group_id": result.group_id,
        "reused": result.reused,
        "train_wall_seconds": result.wall_seconds,
        "steps_per_second": result.steps_per_second,
        "norm": spec.norm,
        "aggregate": aggregate,
        "per_seed": per_seed,
        "curves": curves,
    }
