"""Two plot shapes the claims need: lines with 95% CI bars over a swept value, and grouped bars with CIs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["lines_with_ci", "bars_with_ci"]

PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lines_with_ci(path: Path, series: dict[str, list[tuple[float, dict]]], *, title: str, xlabel: str,
                  ylabel: str, logx: bool = False, scale: float = 1.0, hline: tuple[str, float] | None = None) -> Path:
    """``series``: label -> [(x, interval dict with mean/low/high)], one line per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for color, (label, points) in zip(PALETTE * 3, series.items()):
        xs = np.array([x for x, _ in points], dtype=float)
        mean = np.array([iv["mean"] for _, iv in points], dtype=float) * scale
        low = np.array([iv["low"] for _, iv in points], dtype=float) * scale
        high = np.array([iv["high"] for _, iv in points], dtype=float) * scale
        ax.errorbar(xs, mean, yerr=[mean - low, high - mean], color=color, marker="o", capsize=4, label=label)
    if hline is not None:
        ax.axhline(hline[1] * scale, color="grey", ls="--", lw=1, label=hline[0])
    if logx:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bars_with_ci(path: Path, groups: list[str], series: dict[str, list[dict]], *, title: str, ylabel: str,
                 scale: float = 1.0) -> Path:
    """``series``: label -> one interval dict per group; bars side by side within each group."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(groups) + 2), 4.5))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (color, (label, intervals)) in enumerate(zip(PALETTE * 3, series.items())):
        mean = np.array([iv["mean"] for iv in intervals], dtype=float) * scale
        low = np.array([iv["low"] for iv in intervals], dtype=float) * scale
        high = np.array([iv["high"] for iv in intervals], dtype=float) * scale
        ax.bar(x + (i - (len(series) - 1) / 2) * width, mean, width, yerr=[mean - low, high - mean], capsize=4,
               color=color, label=label)
    ax.set_xticks(x, groups)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
