"""``bnlab data``: fetch and verify the datasets ahead of time."""

from __future__ import annotations

import argparse

from bnlab.data import DATASETS, default_data_dir, fetch_dataset
from bnlab.errors import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="fetch and verify MNIST / Fashion-MNIST into the cache")
    p.add_argument("names", nargs="*", default=["mnist"], metavar="NAME",
                   help=f"datasets to fetch: {', '.join(sorted(DATASETS))} (default: mnist)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for name in args.names:
        if name not in DATASETS:
            raise UsageError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
        ds = fetch_dataset(name)
        print(f"{ds.spec.title}: {len(ds.train_labels)} train + {len(ds.test_labels)} test images, verified "
              f"(cache: {default_data_dir() / name})")
    return 0
