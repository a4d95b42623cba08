"""``bnlab convert-momentum``: the same moving average in the other framework's momentum."""

from __future__ import annotations

import argparse

from bnlab.errors import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert-momentum", help="a batch-norm momentum in the other framework's direction")
    p.add_argument("momentum", type=float, help="the momentum to convert, e.g. 0.99")
    p.add_argument("--from", dest="source", choices=("keras", "torch"), required=True,
                   help="the framework it comes from (keras: weight of the old average; torch: of the new batch)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    m = args.momentum
    if not 0.0 <= m <= 1.0:
        raise UsageError(f"a momentum is in [0, 1], got {m}")
    new_batch_weight = 1.0 - m if args.source == "keras" else m
    window = f"; the average spans about {1 / new_batch_weight:.0f} batches" if new_batch_weight > 0 else ""
    if args.source == "keras":
        print(f"Keras momentum {m:g} (weight of the old average) = torch momentum {1 - m:.6g} "
              f"(weight of the new batch){window}")
    else:
        print(f"torch momentum {m:g} (weight of the new batch) = Keras momentum {1 - m:.6g} "
              f"(weight of the old average){window}")
    return 0
