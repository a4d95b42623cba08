"""``bnlab kernels``: build the compiled CPU kernels ahead of time, and show what is built and used."""

from __future__ import annotations

import argparse
import time

from bnlab.errors import BnlabError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("kernels", help="build bnlab's compiled CPU kernels now, or show their status")
    sub = p.add_subparsers(dest="kernels_command", metavar="ACTION", required=True)
    sub.add_parser("build", help="compile the kernels for this CPU and torch (once; a CI image or a node can "
                                 "build ahead of its jobs)")
    sub.add_parser("status", help="what is built, for which CPU, and which implementation each layout uses")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bnlab.functional.compiled import kernel_status, load_kernels

    if args.kernels_command == "build":
        if kernel_status()["disabled"]:
            raise BnlabError("BNLAB_COMPILED_KERNELS=0 disables the compiled kernels; unset it to build them")
        started = time.perf_counter()
        if not load_kernels():
            raise BnlabError("the build failed (the warning above says why); bnlab keeps using torch's kernels")
        status = kernel_status()
        print(f"built and loaded in {time.perf_counter() - started:.1f} s: {status['library']}")
        return 0
    _print_status(kernel_status())
    return 0


def _print_status(status: dict) -> None:
    from bnlab.functional import get_backend
    from bnlab.functional.dispatch_table import FASTER

    state = "built" if status["built"] else "not built yet (built on first use, or now with `bnlab kernels build`)"
    print(f"compiled kernels: {state}" + (" — disabled by BNLAB_COMPILED_KERNELS=0" if status["disabled"] else ""))
    print(f"  library: {status['library']}")
    print(f"  for: {status['cpu']}, torch {status['torch']}, flags {status['flags']}")
    backend = get_backend()
    print(f"plain batch norm, training: backend {backend!r}")
    for layout in ("rows", "planes_3d", "planes_4d", "planes_5d", "channels_last"):
        for dtype in ("float32", "float64"):
            if backend == "aten" or status["disabled"]:
                choice = "ATen"
            elif backend == "compiled":
                choice = "compiled"
            else:
                ranges = FASTER.get((layout, dtype), ())
                choice = ("compiled for " + ", ".join(f"{low}–{high if high < 2 ** 60 else '∞'} values per channel"
                                                      for low, high, _ in ranges) + ", ATen elsewhere"
                          if ranges else "ATen (not measured faster)")
            print(f"  {layout:<14s} {dtype:<8s} {choice}")
    print("  inference and other mixed dtypes: ATen; bfloat16/float16 inputs: compiled only under \"compiled\" "
          "(measured slower than ATen); ghost BN and batch renorm: compiled when built")
