"""``bnlab compare``: the same network with and without batch norm, over several seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from bnlab.cli.common import add_store_option, open_store, positive_float, positive_int
from bnlab.models import PRESETS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train a preset with and without BN on several seeds; table, plot and HTML report",
        description="Train a preset with and without batch norm on every seed (stacked, so extra seeds are "
        "cheap), print mean ± 95%% CI over seeds, and write summary.json, curves.png and index.html. "
        "Finished runs are reused from the run store; an interrupted run resumes.",
    )
    p.add_argument("--preset", default="torch-mlp", choices=sorted(PRESETS), help="recipe (default: torch-mlp)")
    p.add_argument("--seeds", type=positive_int, default=5, help="seeds per variant (default: 5)")
    p.add_argument("--epochs", type=positive_float, default=None, help="override the preset's training length")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion"], help="(default: mnist)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for matmuls (faster, see README)")
    p.add_argument("--out", type=Path, default=Path("out/compare"), help="report directory (default: out/compare)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_store_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bnlab.experiments.compare import CompareRequest, run_compare
    from bnlab.report.compare_report import format_table, write_report

    request = CompareRequest(preset=args.preset, seeds=args.seeds, epochs=args.epochs, dataset=args.dataset,
                             bf16=args.bf16)
    with open_store(args) as store:
        summary = run_compare(request, store, progress=not args.no_progress)
    paths = write_report(summary, args.out)
    print(format_table(summary))
    reused = [label for label, v in summary["variants"].items() if v["reused"]]
    if reused:
        print(f"(reused finished runs from the store for: {', '.join(reused)})")
    print(f"report: {paths['html']}  ({summary['wall_seconds']:.0f} s)")
    return 0
