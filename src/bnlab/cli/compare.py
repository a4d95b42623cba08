"""``bnlab compare``: the same network with and without batch norm (or any norms), over several seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from bnlab.cli.common import (add_ray_option, add_store_option, open_store, output_dir, positive_float, positive_int,
                              ray_executor)
from bnlab.models.presets import PRESETS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train a preset with and without BN (or any norms) on several seeds; table, plot and HTML report",
        description="Train a preset with each normalization variant on every seed (stacked, so extra seeds are "
        "cheap), print mean ± 95% CI over seeds and each variant's difference from the first, and write "
        "summary.json, curves.png and index.html. Finished runs are reused from the run store; an interrupted "
        "run resumes.",
        epilog="examples: bnlab compare --variants none,batch,group,renorm --set batch_size=4 | "
        "bnlab compare --set lr=0.5 --set activation=sigmoid | 'bnlab presets NAME' lists the --set keys",
    )
    p.add_argument("--preset", default="torch-mlp", choices=sorted(PRESETS), help="recipe (default: torch-mlp)")
    p.add_argument("--seeds", type=positive_int, default=5, help="seeds per variant (default: 5)")
    p.add_argument("--epochs", type=positive_float, default=None, help="override the preset's training length")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion"], help="(default: mnist)")
    p.add_argument("--variants", default="none,batch", metavar="KINDS",
                   help="comma-separated norm kinds to compare, the first being the baseline: none, batch, layer, "
                        "group, instance, renorm, ghost, frozen (default: none,batch)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the preset's model or training config (repeatable), "
                        "e.g. --set lr=0.5 --set hidden=256,128; 'bnlab presets NAME' lists the keys")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for matmuls (faster, see README)")
    p.add_argument("--out", type=Path, default=Path("out/compare"), help="report directory (default: out/compare)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_option(p, "the variants")
    add_store_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bnlab.cli.common import phase_report, process_seconds
    from bnlab.experiments.compare import CompareRequest, run_compare
    from bnlab.experiments.settings import parse_settings
    from bnlab.report.compare_report import format_table, write_report

    startup = process_seconds()
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    request = CompareRequest(preset=args.preset, seeds=args.seeds, epochs=args.epochs, dataset=args.dataset,
                             bf16=args.bf16, variants=variants, settings=parse_settings(args.settings))
    request.configs()  # a variant or setting the preset cannot take fails here, before any work
    output_dir(args.out)
    executor = ray_executor(args)
    with open_store(args) as store:
        summary = run_compare(request, store, progress=not args.no_progress, fetch=True, executor=executor)
        summary["phases_seconds"] = {"startup": startup, **summary["phases_seconds"]}
        paths = write_report(summary, args.out)
    print(format_table(summary))
    reused = [label for label, v in summary["variants"].items() if v["reused"]]
    if reused:
        print(f"(reused finished runs from the store for: {', '.join(reused)})")
    total = process_seconds()
    print(phase_report(summary["phases_seconds"], total))
    print(f"report: {paths['html']}")
    return 0
