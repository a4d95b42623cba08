"""``bnlab presets``: the named recipes, as data."""

from __future__ import annotations

import argparse
import json

from bnlab.models import PRESETS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("presets", help="list the seed and paper recipes (model + training)")
    p.add_argument("name", nargs="?", choices=sorted(PRESETS), help="show one preset in full (JSON)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.name:
        print(json.dumps({args.name: PRESETS[args.name]}, indent=2))
        return 0
    for name, preset in PRESETS.items():
        train = preset["train"]
        length = f"{train['epochs']} epochs" if "epochs" in train else f"{train['steps']} steps"
        print(f"{name:<10s} {preset['source']}")
        print(f"{'':<10s} {train['optimizer']} lr {train['lr']}, batch {train['batch_size']}, {length}")
    return 0
