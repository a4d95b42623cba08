"""What every experiment needs from a trained group of seeds: per-seed numbers and aggregates."""

from __future__ import annotations

from bnlab.stats import first_step_reaching, mean_ci
from bnlab.store import RunStore
from bnlab.train import GroupResult

__all__ = ["THRESHOLDS", "summarise_group"]

THRESHOLDS = (0.95, 0.97)


def summarise_group(store: RunStore, result: GroupResult, *, all_series: bool = False) -> dict:
    """Per-seed final metrics and steps-to-threshold, their means with 95% CIs, and the curves.

    ``curve_max_abs_error`` (per seed and overall) is the largest |approximate − exact| test
    accuracy over the milestones where both were measured: what the cheap intermediate
    evaluation costs in accuracy, measured on this very run.

    ``all_series`` also returns every stored metric series (probes included) as ``series``.
    """
    per_seed = []
    curves, every = {}, {}
    records = [store.run(run_id) for run_id in result.run_ids]
    for run_id, record in zip(result.run_ids, records):
        series = store.metrics(run_id)
        test_acc = series.get("test_acc", [])
        final = record.summary or {}
        final_test_acc = test_acc[-1][1] if test_acc else None
        row = {
            "run_id": run_id,
            "seed": record.seed,
            "total_steps": record.total_steps,
            "final_test_acc": final_test_acc,
            "final_test_loss": series["test_loss"][-1][1] if series.get("test_loss") else None,
            "final_train_loss": final.get("final_train_loss"),
            "final_train_acc": final.get("final_train_acc"),
        }
        if row["final_train_acc"] is not None and final_test_acc is not None:
            row["train_test_gap"] = row["final_train_acc"] - final_test_acc
        for threshold in THRESHOLDS:
            row[f"steps_to_{round(threshold * 100)}"] = first_step_reaching(test_acc, threshold)
        # the curve's measured approximation error: at each milestone both the exact value and the
        # value the cheap evaluation gives are stored (see bnlab.train.engine.EvalPlan)
        exact, approx = dict(test_acc), dict(series.get("test_acc_approx", []))
        errors = [abs(approx[s] - exact[s]) for s in approx if s in exact and None not in (approx[s], exact[s])]
        row["curve_max_abs_error"] = max(errors) if errors else None
        per_seed.append(row)
        curves[run_id] = {name: series.get(name, []) for name in ("test_acc", "test_loss", "train_loss")}
        every[run_id] = series

    def interval(key):
        return mean_ci([r[key] for r in per_seed if r.get(key) is not None]).to_dict()

    aggregate = {key: interval(key) for key in ("final_test_acc", "final_train_loss", "train_test_gap")}
    for threshold in THRESHOLDS:
        key = f"steps_to_{round(threshold * 100)}"
        aggregate[key] = {**interval(key), "reached": sum(r[key] is not None for r in per_seed), "of": len(per_seed)}
    errors = [r["curve_max_abs_error"] for r in per_seed if r["curve_max_abs_error"] is not None]
    first = records[0]
    summary = {
        "group_id": result.group_id,
        "reused": result.reused,
        "train_wall_seconds": result.wall_seconds,
        "steps_per_second": result.steps_per_second,
        "phases_seconds": result.phases,
        "data_order": first.config["train"].get("data_order", "shared"),
        "evaluation": (first.summary or {}).get("evaluation"),
        "curve_max_abs_error": max(errors) if errors else None,
        "aggregate": aggregate,
        "per_seed": per_seed,
        "curves": curves,
    }
    if all_series:
        summary["series"] = every
    return summary
