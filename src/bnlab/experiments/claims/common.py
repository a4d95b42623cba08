"""What several claims share: presets as (spec, config), numbers read out of group summaries, curves."""

from __future__ import annotations

import torch

from bnlab.experiments.claims import protocols
from bnlab.models import ModelSpec
from bnlab.stats import mean_ci
from bnlab.train import TrainConfig


def preset(name: str, epochs: float | None = None) -> tuple[ModelSpec, TrainConfig]:
    """A preset of ``bnlab presets`` as ``(spec, config)``, optionally trained for ``epochs`` instead."""
    p = protocols.PRESETS[name]
    train = dict(p["train"])
    if epochs is not None:
        train.pop("steps", None)
        train["epochs"] = epochs
    return ModelSpec.from_dict(p["model"]), TrainConfig.from_dict(train)


def values(summary: dict, key: str, censor_at_total: bool = False) -> list[float]:
    """One number per seed from a group summary; with ``censor_at_total``, a threshold never reached
    counts as the run's total steps (a lower bound)."""
    out = []
    for row in summary["per_seed"]:
        value = row.get(key)
        if value is None and censor_at_total:
            value = row["total_steps"]
        if value is not None:
            out.append(float(value))
    return out


def one(numbers: dict, prefix: str = "", suffix: str = "") -> dict:
    """The one entry of ``numbers`` whose key starts with ``prefix`` and ends with ``suffix`` (the part
    between names a value that depends on the protocol: a learning rate, a threshold, a norm)."""
    (key,) = [k for k in numbers if k.startswith(prefix) and k.endswith(suffix)]
    return numbers[key]


def series(summary: dict, name: str) -> list[list[tuple[int, float]]]:
    """Metric ``name``'s series of every seed of a group summary (made with ``all_series``)."""
    return [summary["series"][r["run_id"]].get(name, []) for r in summary["per_seed"]]


def per_step(curves: list[list[tuple[int, float]]]) -> dict[int, list[float]]:
    """``{step: one value per seed}`` at the steps every seed recorded."""
    maps = [dict(c) for c in curves]
    steps = sorted(set.intersection(*(set(m) for m in maps))) if maps else []
    return {s: [float(m[s]) for m in maps] for s in steps if all(m[s] is not None for m in maps)}


def curve_with_ci(curves: list[list[tuple[int, float]]], x_scale: float = 1.0) -> list[tuple[float, dict]]:
    """The mean over seeds with its 95% CI at each common step, x = step × ``x_scale``."""
    return [(step * x_scale, mean_ci(v).to_dict()) for step, v in per_step(curves).items()]


def mean_curve(summary: dict, name: str) -> list[tuple[int, float]]:
    return [(s, sum(v) / len(v)) for s, v in per_step(series(summary, name)).items()]


def drift(points: list[tuple[int, float]], skip_fraction: float = 0.1) -> float:
    """Standard deviation over evaluation points of a percentile, after the first part of training."""
    if not points:
        return float("nan")
    last = points[-1][0]
    vals = torch.tensor([v for s, v in points if s >= skip_fraction * last], dtype=torch.float64)
    return float(vals.std()) if len(vals) > 1 else 0.0


def series_mean(points: list[tuple[int, float]], skip_fraction: float = 0.1) -> float:
    """The mean of a series after the first part of training."""
    if not points:
        return float("nan")
    last = points[-1][0]
    vals = [v for s, v in points if s >= skip_fraction * last and v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def single_seed(points: list[tuple[int, float]]) -> list[tuple[int, dict]]:
    """A one-seed series in the (x, interval) form the line figures take (no CI to draw)."""
    return [(s, {"mean": v, "low": v, "high": v}) for s, v in points]
