"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from bnlab.store import RunStore


def add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=None, metavar="PATH",
                        help="run store file (default: $BNLAB_STORE or ~/.local/share/bnlab/runs.sqlite)")


def open_store(args: argparse.Namespace) -> RunStore:
    return RunStore(args.store)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
