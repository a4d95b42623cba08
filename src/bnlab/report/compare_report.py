"""What ``bnlab compare`` shows: a terminal table, ``summary.json``, ``curves.png`` and ``index.html``."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np

from bnlab._json import dumps
from bnlab.report.plots import figure
from bnlab.stats import mean_ci

__all__ = ["format_table", "write_report", "plot_curves"]

# colour-blind-safe (Okabe-Ito), by variant position: the baseline orange, the second (BN by default) green
PALETTE = ("#d55e00", "#009e73", "#0072b2", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442")


def _color(summary: dict, label: str) -> str:
    return PALETTE[list(summary["variants"]).index(label) % len(PALETTE)]


# (metric, row title, scale, digits, unit)
_METRICS = (("final_test_acc", "final test accuracy", 100, 2, " %"),
            ("steps_to_95", "steps to 95% test acc", 1, 0, ""),
            ("steps_to_97", "steps to 97% test acc", 1, 0, ""),
            ("final_train_loss", "final train loss", 1, 4, ""),
            ("train_test_gap", "train-test gap (acc)", 100, 2, " pts"))


def _rows(summary: dict) -> list[tuple[str, list[str]]]:
    labels = list(summary["variants"])
    agg = {label: summary["variants"][label]["aggregate"] for label in labels}

    def cell(label, key, scale=1.0, digits=2, unit=""):
        d = agg[label][key]
        if d["n"] == 0:
            return f"not reached (0/{d['of']} seeds)" if "of" in d else "n/a"
        text = f"{d['mean'] * scale:.{digits}f}"
        if d["n"] > 1:
            text += f" ± {d['half_width'] * scale:.{digits}f}"
        text += unit
        if "reached" in d and d["reached"] < d["of"]:
            text += f" ({d['reached']}/{d['of']} seeds)"
        return text

    rows = [(title, [cell(l, key, scale, digits, unit) for l in labels]) for key, title, scale, digits, unit in _METRICS]
    return rows


def _difference_rows(summary: dict) -> list[tuple[str, list[str]]]:
    """Each variant minus the first, with Welch's 95% interval; '*' where the interval excludes 0."""
    differences = summary.get("differences") or {}
    if not differences:
        return []
    labels = list(summary["variants"])
    rows = []
    for key, title, scale, digits, unit in _METRICS:
        cells = ["(baseline)"]
        for label in labels[1:]:
            d = differences[label][key]
            if d["n"] == 0 or d["mean"] is None or d["mean"] != d["mean"]:
                cells.append("n/a")
                continue
            text = f"{d['mean'] * scale:+.{digits}f}"
            if d["low"] != d["high"]:
                text += f" [{d['low'] * scale:+.{digits}f}, {d['high'] * scale:+.{digits}f}]"
                text += " *" if d["low"] > 0 or d["high"] < 0 else ""
            text += unit
            # a steps-to-X difference is over the seeds that reached X: say so when some did not
            counts = [summary["variants"][v]["aggregate"][key] for v in (label, labels[0])]
            if any(c.get("reached", c["n"]) < c.get("of", c["n"]) for c in counts):
                text += f" (over {counts[0]['reached']}/{counts[0]['of']} and {counts[1]['reached']}/{counts[1]['of']} seeds)"
            cells.append(text)
        rows.append((f"Δ {title}", cells))
    return rows


def _evaluation_note(summary: dict) -> str:
    """How the numbers were measured, with the approximation error this run measured."""
    evaluation = next((v.get("evaluation") for v in summary["variants"].values() if v.get("evaluation")), None)
    if not evaluation:
        return "every evaluation on the full test set"
    inter, train = evaluation["intermediate_points"], evaluation["train_metrics"]
    errors = [v["curve_max_abs_error"] for v in summary["variants"].values() if v.get("curve_max_abs_error") is not None]

    def part(d):
        scope = f"{d['examples']:,}-image stratified subset" if d["stratified_subset"] else f"all {d['of']:,} images"
        folded = ", batch norm folded into the layer before it" if d.get("batch_norm_folded") else ""
        return f"{scope}, {d['dtype']}{folded}"

    exactness = "approximate" if inter["stratified_subset"] or inter["dtype"] != "float32" else "exact"
    text = (f"final test accuracy exact (all {evaluation['milestones']['of']:,} test images, float32, as at the first "
            f"point of each epoch); intermediate curve points {exactness} ({part(inter)}); "
            f"train loss and gap: {part(train)}")
    if errors:
        text += f"; largest |approx - exact| test accuracy at the milestones: {max(errors) * 100:.2f} pts"
    return text


def format_table(summary: dict) -> str:
    labels = list(summary["variants"])
    rows = _rows(summary)
    differences = _difference_rows(summary)
    width0 = max(len(r[0]) for r in rows + differences)
    widths = [max(len(labels[i]), *(len(r[1][i]) for r in rows + differences)) for i in range(len(labels))]
    req = summary["request"]
    n = req["seeds"]
    every = summary["train_config"]["eval_every"]
    order = summary["train_config"].get("data_order", "shared")
    lines = [
        f"{req['preset']} on {req['dataset']}, {n} seed{'s' if n > 1 else ''} per variant; "
        f"mean ± 95% CI (Student t) over seeds",
        ("(a seed fixes initialization, dropout and batch order; model k sees the same batches in every variant)"
         if order == "per_seed" else
         "(all seeds saw the same batches: the CIs cover initialization and dropout only)"),
        f"(steps-to-X are evaluation steps: test accuracy is measured every {every} steps, "
        f"every {max(1, every // 4)} during the first {2 * every})",
        "(" + _evaluation_note(summary) + ")",
        "  ".join([" " * width0] + [l.rjust(w) for l, w in zip(labels, widths)]),
    ]
    for title, cells in rows + differences:
        lines.append("  ".join([title.ljust(width0)] + [c.rjust(w) for c, w in zip(cells, widths)]))
    if differences:
        lines.append(f"(Δ: each variant minus {labels[0]}, Welch 95% CI; * where it excludes 0)")
    return "\n".join(lines)


def _band(curves: dict, metric: str):
    """Steps, mean, CI low, CI high over seeds for one metric (steps common to all seeds)."""
    per_run = [dict(c[metric]) for c in curves.values() if c.get(metric)]
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(r) for r in per_run)))
    mean, low, high = [], [], []
    for s in steps:
        iv = mean_ci([r[s] for r in per_run if r[s] is not None])
        mean.append(iv.mean)
        low.append(iv.low if iv.n > 1 else iv.mean)
        high.append(iv.high if iv.n > 1 else iv.mean)
    return np.array(steps), np.array(mean), np.array(low), np.array(high), per_run


def plot_curves(summary: dict, path: Path) -> None:
    fig = figure(figsize=(15, 4.4))
    axes = fig.subplots(1, 3)
    panels = [
        ("test_acc", "test accuracy (%)", 100.0, None),
        ("test_acc", "test accuracy (%), zoomed", 100.0, "zoom"),
        ("train_loss", "train loss (mean over each interval, log)", 1.0, "log"),
    ]
    for ax, (metric, title, scale, mode) in zip(axes, panels):
        top_low = []
        for label, variant in summary["variants"].items():
            band = _band(variant["curves"], metric)
            if band is None:
                continue
            steps, mean, low, high, per_run = band
            color = _color(summary, label)
            for run in per_run:
                xs = sorted(run)
                ax.plot(xs, [run[s] * scale for s in xs], color=color, alpha=0.18, lw=0.8)
            ax.fill_between(steps, low * scale, high * scale, color=color, alpha=0.25, lw=0)
            ax.plot(steps, mean * scale, color=color, lw=2, label=f"{label} (mean, 95% CI band)")
            top_low.append(np.percentile(mean * scale, 20))
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if mode == "log":
            ax.set_yscale("log")
        if mode == "zoom" and top_low:
            ax.set_ylim(max(min(top_low), 80.0), 100.0)
    axes[0].legend(loc="lower right")
    req = summary["request"]
    fig.suptitle(f"{req['preset']} on {req['dataset']}: {' vs '.join(summary['variants'])}, {req['seeds']} seeds "
                 "(thin lines: individual seeds; see the report for which points are exact)")
    # fixed margins for this fixed layout: tight_layout would draw the figure once more to measure it
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.12, top=0.86, wspace=0.16)
    fig.savefig(path, dpi=110)


def write_report(summary: dict, out_dir: Path) -> dict[str, Path]:
    """Write summary.json, curves.png and index.html into ``out_dir``; return their paths."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out_dir / "summary.json", "curves": out_dir / "curves.png", "html": out_dir / "index.html"}
    plot_curves(summary, paths["curves"])
    paths["html"].write_text(_html(summary))
    summary.setdefault("phases_seconds", {})["report"] = time.perf_counter() - started
    paths["summary"].write_text(dumps(summary, indent=2))
    return paths


def _html(summary: dict) -> str:
    e = html.escape
    labels = list(summary["variants"])
    head = "".join(f"<th>{e(l)}</th>" for l in labels)
    body = "".join(
        f"<tr><th>{e(title)}</th>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>"
        for title, cells in _rows(summary) + _difference_rows(summary)
    )
    seed_rows = []
    for label, variant in summary["variants"].items():
        for r in variant["per_seed"]:
            acc, loss = r["final_test_acc"], r.get("final_train_loss")
            seed_rows.append(
                f"<tr><td>{e(label)}</td><td>{r['seed']}</td><td><code>{e(r['run_id'])}</code></td>"
                f"<td>{'' if acc is None else f'{acc * 100:.2f} %'}</td>"
                f"<td>{r.get('steps_to_95') or '-'}</td><td>{r.get('steps_to_97') or '-'}</td>"
                f"<td>{'' if loss is None else f'{loss:.4f}'}</td></tr>"
            )
    req = summary["request"]
    preset = summary["preset"]
    seeds_text = ("A seed fixes a model's initialization, dropout and batch order; model k sees the same batches "
                  "in every variant." if summary["train_config"].get("data_order") == "per_seed" else
                  "All seeds saw the same batches, so the intervals cover initialization and dropout only.")
    config = json.dumps({"train": summary["train_config"], "models": summary["models"]}, indent=2)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bnlab compare: {e(req['preset'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>{e(' vs '.join(labels))}: {e(req['preset'])} on {e(req['dataset'])}</h1>
<p>{e(preset['source'])}. Our choices: {e(preset['our_choices'])}.</p>
<p>{req['seeds']} seeds per variant. {e(seeds_text)} Numbers are means with 95% confidence
intervals (Student t) over seeds; Δ rows are each variant minus {e(labels[0])} with Welch's 95% interval.
"Steps to X%" is the first evaluation step at which test accuracy reached X.</p>
<p>Measurement: {e(_evaluation_note(summary))}.</p>
<table><tr><th></th>{head}</tr>{body}</table>
<img src="curves.png" alt="test accuracy and train loss vs training steps, with and without batch norm">
<h2>Per seed</h2>
<table><tr><th>variant</th><th>seed</th><th>run</th><th>final test acc</th><th>steps to 95%</th>
<th>steps to 97%</th><th>final train loss</th></tr>{''.join(seed_rows)}</table>
<h2>Configuration</h2>
<p>Code: {e(summary['code_version'])}. Runs are in the store <code>{e(summary['store'])}</code>
(<code>bnlab runs show ID</code>).</p>
<pre>{e(config)}</pre>
</body></html>
"""
