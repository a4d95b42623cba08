"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from bnlab.errors import UsageError
from bnlab.store import RunStore


def add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=None, metavar="PATH",
                        help="run store file (default: $BNLAB_STORE or ~/.local/share/bnlab/runs.sqlite)")


def add_ray_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help=f"train {what} as parallel tasks on a Ray cluster (ADDRESS, e.g. ray://head:10001), "
                             "or on a local Ray instance without one; this process alone writes the store; "
                             "needs pip install 'bnlab[ray]'")


def ray_executor(args: argparse.Namespace):
    """The :class:`~bnlab.experiments.executors.RayExecutor` ``--ray`` asks for, or None."""
    if args.ray is None:
        return None
    from bnlab.experiments.executors import RayExecutor

    return RayExecutor(None if args.ray == "local" else args.ray)


def open_store(args: argparse.Namespace, *, readonly: bool = False) -> RunStore:
    """The store of ``--store`` (or the default); ``readonly`` for commands that only look: they neither
    create the file nor need write access to it."""
    return RunStore(args.store, readonly=readonly)


def output_dir(path: Path) -> Path:
    """Check, before any work, that a report can be written to directory ``path`` (creating it)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file; give a directory for the report")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"--out {path} is not writable; give another directory")
    return path


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def process_seconds() -> float:
    """Seconds since this process started (interpreter start-up and imports included), from /proc;
    elsewhere, since bnlab's command module was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def phase_report(phases: dict[str, float], total: float) -> str:
    """One line: where the command's wall time went, in seconds and per cent."""
    accounted = sum(phases.values())
    parts = [f"{name} {seconds:.1f} s ({100 * seconds / total:.0f}%)" for name, seconds in phases.items()
             if seconds >= 0.05]
    if total - accounted >= 0.05:
        parts.append(f"other {total - accounted:.1f} s")
    return f"time: {total:.1f} s: " + ", ".join(parts)


_IMPORTED = time.perf_counter()
