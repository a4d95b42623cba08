"""``bnlab presets``: the named recipes, as data."""

from __future__ import annotations

import argparse
import json

from bnlab.models.presets import PRESETS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("presets", help="list the seed and paper recipes (model + training)")
    p.add_argument("name", nargs="?", choices=sorted(PRESETS), help="show one preset in full (JSON)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.name:
        from bnlab.experiments.settings import settable_fields

        print(json.dumps({args.name: PRESETS[args.name]}, indent=2))
        print(f"\n'bnlab compare --preset {args.name} --set KEY=VALUE' takes these keys (type, default):")
        preset = PRESETS[args.name]
        for part in ("model", "train"):
            print(f"  {part}:")
            for key, (where, kind, default) in settable_fields().items():
                if where == part:
                    value = preset[part].get(key, default)
                    mark = "" if key not in preset[part] else "  (preset)"
                    print(f"    {key:<20s} {kind:<18s} {value!r}{mark}")
        return 0
    for name, preset in PRESETS.items():
        train = preset["train"]
        length = f"{train['epochs']} epochs" if "epochs" in train else f"{train['steps']} steps"
        print(f"{name:<10s} {preset['source']}")
        print(f"{'':<10s} {train['optimizer']} lr {train['lr']}, batch {train['batch_size']}, {length}")
    return 0
