"""``bnlab runs``: list, show, export and resume stored runs."""

from __future__ import annotations

import argparse
import csv
import io
import json
import time

from bnlab.cli.common import add_store_option, open_store


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("runs", help="list, show, export or resume runs in the run store")
    sub = p.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="one line per run")
    ls.add_argument("--status", choices=["created", "running", "interrupted", "finished", "failed"],
                    help="only runs with this status")
    show = sub.add_parser("show", help="a run's config, status, summary and last metrics")
    show.add_argument("id", help="run id (or a unique prefix)")
    export = sub.add_parser("export", help="a run's metric series as CSV or JSON on stdout")
    export.add_argument("id", help="run id (or a unique prefix)")
    export.add_argument("--format", choices=["csv", "json"], default="csv")
    resume = sub.add_parser("resume", help="continue an interrupted run (and its stacked group) from its checkpoint")
    resume.add_argument("id", help="run id (or a unique prefix)")
    resume.add_argument("--no-progress", action="store_true")
    resume.add_argument("--force", action="store_true",
                        help="take the run over even if the store says another process holds it (use only when "
                             "you know that process is gone: its lease would otherwise expire by itself)")
    for action in (ls, show, export, resume):
        add_store_option(action)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_store(args, readonly=args.runs_command != "resume") as store:
        return {"list": _list, "show": _show, "export": _export, "resume": _resume}[args.runs_command](store, args)


def _list(store, args) -> int:
    records = store.runs()
    if args.status:
        records = [r for r in records if r.effective_status == args.status]
    if not records:
        print(f"no runs in {store.path}")
        return 0
    print(f"{'id':<12s}  {'label':<24s} {'seed':>4s}  {'status':<11s} {'steps':>13s}  {'test acc':>8s}  created")
    for r in records:
        steps = f"{r.steps_done}/{r.total_steps}"
        acc = store.metrics(r.id).get("test_acc", [])
        acc_text = f"{acc[-1][1]:.4f}" if acc and acc[-1][1] is not None else "-"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created))
        print(f"{r.id:<12s}  {r.label[:24]:<24s} {r.seed:>4d}  {r.effective_status:<11s} {steps:>13s}  "
              f"{acc_text:>8s}  {created}")
    return 0


def _show(store, args) -> int:
    r = store.run(args.id)
    series = store.metrics(r.id)
    out = {
        "id": r.id, "group_id": r.group_id, "label": r.label, "seed": r.seed, "status": r.effective_status,
        "steps": f"{r.steps_done}/{r.total_steps}", "wall_seconds": round(r.wall_seconds, 1),
        "code_version": r.code_version, "summary": r.summary,
        "last_metrics": {name: {"step": s[-1][0], "value": s[-1][1]} for name, s in series.items()},
        "config": r.config,
    }
    print(json.dumps(out, indent=2))
    if r.effective_status in ("interrupted", "failed"):
        print(f"resume with: bnlab runs resume {r.id}")
    return 0


def _export(store, args) -> int:
    r = store.run(args.id)
    series = store.metrics(r.id)
    if args.format == "json":
        print(json.dumps({"run": r.id, "label": r.label, "seed": r.seed, "config": r.config,
                          "metrics": {k: [{"step": s, "value": v} for s, v in pts] for k, pts in series.items()}},
                         indent=2))
        return 0
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run_id", "step", "metric", "value"])
    for name, points in series.items():
        for step, value in points:
            writer.writerow([r.id, step, name, "" if value is None else repr(value)])
    print(buffer.getvalue(), end="")
    return 0


def _resume(store, args) -> int:
    from bnlab.train.runner import resume

    result = resume(store, args.id, progress=not args.no_progress, force=args.force)
    print(f"group {result.group_id} finished: runs {', '.join(result.run_ids)}")
    return 0
