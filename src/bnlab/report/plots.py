"""The claims' plots, drawn from the figure specs their results carry (:func:`draw`), without pyplot.

Lines with 95% CI bars (over a swept value or over training), grouped bars with CIs, Ioffe &
Szegedy's Figure 1 layout, and loss-surface contours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["draw", "figure", "lines_with_ci", "bars_with_ci", "accuracy_and_percentiles", "loss_contours"]

PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]


def figure(**kwargs):
    """A matplotlib ``Figure`` made without pyplot: files only, no global figure registry and no
    interactive backend to choose, and pyplot's import (~0.4 s here) is never paid."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def draw(spec: dict, out_dir: Path) -> Path:
    """Draw one figure spec of a claim result (``{"file", "kind", "args"}``, see
    :func:`bnlab.experiments.claims.base.figure`) into ``out_dir``; returns the file."""
    kinds = {f.__name__: f for f in (lines_with_ci, bars_with_ci, accuracy_and_percentiles, loss_contours)}
    if spec["kind"] not in kinds:
        raise ValueError(f"unknown figure kind {spec['kind']!r}; known: {sorted(kinds)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    return kinds[spec["kind"]](out_dir / spec["file"], **spec["args"])


def lines_with_ci(path: Path, series: dict[str, list[tuple[float, dict]]], *, title: str, xlabel: str,
                  ylabel: str, logx: bool = False, scale: float = 1.0, hline: tuple[str, float] | None = None,
                  markers: bool = True) -> Path:
    """``series``: label -> [(x, interval dict with mean/low/high)], one line per label; with
    ``markers=False`` (curves over training) the CI is a shaded band instead of error bars."""
    fig = figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for color, (label, points) in zip(PALETTE * 3, series.items()):
        xs = np.array([x for x, _ in points], dtype=float)
        mean = np.array([iv["mean"] for _, iv in points], dtype=float) * scale
        low = np.array([iv["low"] for _, iv in points], dtype=float) * scale
        high = np.array([iv["high"] for _, iv in points], dtype=float) * scale
        if markers:
            ax.errorbar(xs, mean, yerr=[mean - low, high - mean], color=color, marker="o", capsize=4, label=label)
        else:
            ax.plot(xs, mean, color=color, label=label)
            ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)
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
    return path


def bars_with_ci(path: Path, groups: list[str], series: dict[str, list[dict]], *, title: str, ylabel: str,
                 scale: float = 1.0) -> Path:
    """``series``: label -> one interval dict per group; bars side by side within each group."""
    fig = figure(figsize=(max(6.0, 1.8 * len(groups) + 2), 4.5))
    ax = fig.subplots()
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
    return path


def accuracy_and_percentiles(path: Path, accuracy: dict[str, list[tuple[int, float]]],
                             percentiles: dict[str, dict[str, list[tuple[int, float]]]], *, title: str) -> Path:
    """Ioffe & Szegedy's Figure 1 layout: (a) test accuracy vs steps per arm; then, per arm, the
    {15, 50, 85}th percentiles of one sigmoid input over training."""
    fig = figure(figsize=(5 * (1 + len(percentiles)), 4.2))
    axes = fig.subplots(1, 1 + len(percentiles))
    for color, (label, points) in zip(PALETTE, accuracy.items()):
        axes[0].plot([s for s, _ in points], [100 * v for _, v in points], color=color, label=label)
    axes[0].set_title("(a) test accuracy (mean over seeds)")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    lows = []
    for ax, (label, series) in zip(axes[1:], percentiles.items()):
        for name, style in (("preact_p15", ":"), ("preact_p50", "-"), ("preact_p85", ":")):
            points = series.get(name, [])
            ax.plot([s for s, _ in points], [v for _, v in points], "k" + style, label=name.replace("preact_", ""))
            lows += [v for _, v in points]
        ax.set_title(f"sigmoid input, one unit: {label}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend()
    if lows:
        lo, hi = min(lows), max(lows)
        for ax in axes[1:]:
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def loss_contours(path: Path, panels: dict[str, tuple], *, title: str) -> Path:
    """Side-by-side contour plots of loss surfaces ``label -> (coords, losses[i, j])``, on one colour scale."""
    fig = figure(figsize=(5.2 * len(panels), 4.6))
    axes = fig.subplots(1, len(panels))
    axes = np.atleast_1d(axes)
    top = max(float(np.percentile(np.asarray(losses), 95)) for _, losses in panels.values())
    levels = np.linspace(0, top, 21)
    for ax, (label, (coords, losses)) in zip(axes, panels.items()):
        c = np.asarray(coords)
        cs = ax.contourf(c, c, np.clip(np.asarray(losses).T, 0, top), levels=levels, cmap="viridis")
        ax.plot(0, 0, "r+", ms=12)
        ax.set_title(label)
        ax.set_xlabel("direction 1 (filter-normalized)")
        ax.set_ylabel("direction 2")
    fig.colorbar(cs, ax=list(axes), label="training loss")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path
