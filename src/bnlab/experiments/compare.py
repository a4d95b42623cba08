"""One preset, several normalizations, many seeds: the seeds' central demonstration, and the user's own.

Seeds 000 and 003 train one network with and without BN once each and show
the curves. :func:`run_compare` trains every variant (a :data:`bnlab.nn.NORM_KINDS`
name; default none and batch) on every seed, stacked, so all seeds cost little
more than one, then summarises each variant with 95% confidence intervals over
seeds and each variant's difference from the first with Welch's interval.
Model k sees the same batches in every variant (its seed fixes its batch order),
so the variants differ only in their normalization.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bnlab.data import Dataset, load_dataset
from bnlab.errors import UsageError
from bnlab.experiments.common import THRESHOLDS, summarise_group
from bnlab.experiments.settings import apply_settings
from bnlab.models import PRESETS, ModelSpec
from bnlab.nn import NORM_KINDS
from bnlab.stats import welch_diff
from bnlab.store import RunStore
from bnlab.train import TrainConfig, run_group
from bnlab.train.runner import code_version, finished_group, record_detached, train_detached

__all__ = ["CompareRequest", "run_compare", "VARIANT_LABELS", "DIFFERENCE_METRICS"]

# How a norm kind is named in tables, plots and store labels ("torch-mlp/BN" is shared with the claims lab).
VARIANT_LABELS = {"none": "no norm", "batch": "BN", "layer": "LayerNorm", "group": "GroupNorm",
                  "instance": "InstanceNorm", "renorm": "BatchRenorm", "ghost": "GhostBN", "frozen": "FrozenBN"}
DIFFERENCE_METRICS = ("final_test_acc", *(f"steps_to_{round(t * 100)}" for t in THRESHOLDS), "final_train_loss",
                      "train_test_gap")


@dataclass(frozen=True)
class CompareRequest:
    preset: str = "torch-mlp"
    seeds: int = 5
    epochs: float | None = None  # None: the preset's own length
    dataset: str = "mnist"
    bf16: bool = False
    variants: tuple[str, ...] = ("none", "batch")
    settings: dict = field(default_factory=dict)  # --set KEY=VALUE, parsed (bnlab.experiments.settings)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise UsageError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)} (see 'bnlab presets')")
        if self.seeds < 1:
            raise UsageError("--seeds must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise UsageError("--epochs must be positive")
        unknown = [v for v in self.variants if v not in NORM_KINDS]
        if unknown or not self.variants:
            raise UsageError(f"--variants: unknown norm kind(s) {unknown}; choose from {list(NORM_KINDS)}"
                             if unknown else "--variants needs at least one norm kind")
        if len(set(self.variants)) != len(self.variants):
            raise UsageError(f"--variants names a kind twice: {list(self.variants)}")

    def configs(self) -> tuple[dict[str, ModelSpec], TrainConfig]:
        """``({label: spec}, cfg)``; raises ValueError (saying which) for a variant the preset cannot build."""
        preset = PRESETS[self.preset]
        train = dict(preset["train"], dataset=self.dataset, bf16=self.bf16)
        if self.epochs is not None:
            train.pop("steps", None)
            train["epochs"] = self.epochs
        base, cfg = apply_settings(ModelSpec.from_dict(preset["model"]), TrainConfig.from_dict(train), self.settings)
        specs = {}
        for kind in self.variants:
            try:
                specs[VARIANT_LABELS[kind]] = base.with_(norm=kind)
            except ValueError as exc:
                raise UsageError(f"--variants {kind}: {exc}") from None
        return specs, cfg


def run_compare(request: CompareRequest, store: RunStore, *, progress: bool = True,
                dataset: Dataset | None = None, fetch: bool = False, executor=None) -> dict:
    """Train (or reuse) every variant on all seeds; return the summary (also what summary.json holds).

    ``fetch``: a dataset not in the cache is fetched (see :func:`bnlab.data.fetch_dataset`), as the
    ``bnlab compare`` command does; otherwise it must be there (or be given as ``dataset``).
    ``executor`` (e.g. :class:`bnlab.experiments.executors.RayExecutor`): the variants not in the store
    yet train as parallel tasks there, and this process records them."""
    specs, cfg = request.configs()
    seeds = list(range(request.seeds))
    started = time.perf_counter()
    if dataset is None:
        dataset = load_dataset(cfg.dataset, allow_download=fetch, allow_registry=fetch)
    phases = {"data": time.perf_counter() - started}
    remote = {}
    if executor is not None:
        todo = [label for label, spec in specs.items()
                if finished_group(store, f"{request.preset}/{label}", spec, cfg, seeds) is None]
        calls = [(f"{request.preset}/{label}", specs[label].to_dict(), cfg.to_dict(), seeds) for label in todo]
        for label, result in zip(todo, executor.map(train_detached, calls, shared={"dataset": dataset, "threads": 1})):
            remote[label] = record_detached(store, specs[label], cfg, seeds, result)
    variants = {}
    for label, spec in specs.items():
        result = remote.get(label) or run_group(store, f"{request.preset}/{label}", spec, cfg, seeds, dataset=dataset,
                                                progress=progress)
        variants[label] = {**summarise_group(store, result), "norm": spec.norm}
        for name, seconds in result.phases.items():
            phases[name] = phases.get(name, 0.0) + seconds
    first = next(iter(variants))
    differences = {
        label: {metric: welch_diff(_values(v, metric), _values(variants[first], metric)).to_dict()
                for metric in DIFFERENCE_METRICS}
        for label, v in variants.items() if label != first
    }
    return {
        "request": {
            "preset": request.preset, "seeds": request.seeds, "epochs": request.epochs,
            "dataset": request.dataset, "bf16": request.bf16, "variants": list(request.variants),
            "settings": dict(request.settings),
        },
        "preset": PRESETS[request.preset],
        "train_config": cfg.to_dict(),
        "models": {label: spec.to_dict() for label, spec in specs.items()},
        "code_version": code_version(),
        "store": str(store.path),
        "wall_seconds": time.perf_counter() - started,
        "phases_seconds": phases,
        "variants": variants,
        "baseline": first,
        "differences": differences,
    }


def _values(variant: dict, metric: str) -> list[float]:
    return [r[metric] for r in variant["per_seed"] if r.get(metric) is not None]
