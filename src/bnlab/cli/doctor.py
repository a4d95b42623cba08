"""``bnlab doctor FILE.py:FACTORY``: check a model for batch-norm mistakes; the exit code can gate CI."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from bnlab.errors import UsageError


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 8,3,32,32, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected at least (N, C) with positive sizes, got {text!r}")
    return shape


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check a model for batch-norm mistakes (text, JSON or SARIF)")
    p.add_argument("target", metavar="FILE.py:FACTORY",
                   help="a Python file and a function in it returning the model (or (model, example_batch))")
    p.add_argument("--input-shape", type=_shape, metavar="N,C,...",
                   help="run a random example batch of this shape through a copy (enables call-order rules)")
    p.add_argument("--inference", action="store_true", help="the model is about to serve predictions")
    p.add_argument("--batch-size", type=int, help="the training batch size")
    p.add_argument("--dataset-size", type=int, help="samples per epoch (with --batch-size: the last batch)")
    p.add_argument("--drop-last", action="store_true", help="the loader drops its last incomplete batch")
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--format", choices=("text", "json", "sarif"), default="text")
    p.add_argument("--fail-on", choices=("info", "warning", "error", "never"), default="error",
                   help="exit 1 when a finding is at least this severe (default: error)")
    p.set_defaults(run=run)


def _load(target: str):
    path_text, sep, factory_name = target.rpartition(":")
    if not sep or not path_text or not factory_name:
        raise UsageError(f"expected FILE.py:FACTORY, got {target!r}")
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"bnlab_doctor_target_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"{path} has no function {factory_name!r}")
    return factory()


def run(args: argparse.Namespace) -> int:
    import torch

    from bnlab.doctor import SEVERITIES, check, to_json, to_sarif, to_text, worst

    made = _load(args.target)
    model, example = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{args.target} returned a {type(model).__name__}, not a torch.nn.Module")
    if example is None and args.input_shape:
        example = torch.randn(args.input_shape)

    class Loader:  # what check() reads from a DataLoader
        batch_size = args.batch_size
        drop_last = args.drop_last
        dataset = range(args.dataset_size) if args.dataset_size else None

    findings = check(model, example, Loader() if args.batch_size else None, inference=args.inference,
                     accumulate=args.accumulate)
    if args.format == "json":
        print(to_json(findings))
    elif args.format == "sarif":
        print(to_sarif(findings, args.target.rpartition(":")[0]))
    else:
        print(to_text(findings))
    severity = worst(findings)
    failing = args.fail_on != "never" and severity is not None and \
        SEVERITIES.index(severity) >= SEVERITIES.index(args.fail_on)
    return 1 if failing else 0
