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
from bnlab.experiments.common import summarise_group
from bnlab.store import RunStore
from bnlab.train import TrainConfig, run_group
from bnlab.train.runner import code_version

__all__ = ["CompareRequest", "run_compare", "VARIANTS"]
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
        variants[label] = {**summarise_group(store, result), "norm": spec.norm}
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


