"""Measure where bnlab's compiled batch norm trains faster than ATen, and write the dispatch table.

For each layout the kernel reads (rows, planes_3d/4d/5d, channels_last), each dtype and a grid of
sizes, one training step (forward + backward, running statistics updated) of ``bnlab.nn.BatchNormNd``
is timed with the ``"aten"`` and the ``"compiled"`` backend in interleaved rounds, and the paired
median ratio aten/compiled is kept. The rule written to ``src/bnlab/functional/dispatch_table.py``:
the compiled kernel serves a size range of a layout only where every measured shape in it, at every
channel count, was faster by at least ``--margin`` (default 10%, above this machine's run-to-run noise);
a size between two such measured points is served only if both of them qualify. Everything else stays
on ATen, so "auto" is never slower than torch by more than the noise at the measured points.

Run on a quiet machine:  .venv/bin/python benchmarks/make_dispatch_table.py [--rounds 7] [--write]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path

import torch

import bnlab.functional as BF
import bnlab.nn as bnn

VALUES_PER_CHANNEL = (2 ** 6, 2 ** 9, 2 ** 12, 2 ** 15, 2 ** 18)
CHANNELS = (16, 128)
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
TABLE = Path(__file__).resolve().parents[1] / "src" / "bnlab" / "functional" / "dispatch_table.py"


def shape_for(layout: str, values_per_channel: int, channels: int) -> tuple[tuple[int, ...], torch.memory_format]:
    """An input of ``layout`` with that many values per channel (N · spatial)."""
    if layout == "rows":
        return (values_per_channel, channels), torch.contiguous_format
    if layout == "planes_3d":
        length = min(64, values_per_channel // 2)
        return (values_per_channel // length, channels, length), torch.contiguous_format
    if layout in ("planes_4d", "channels_last"):
        n = min(16, max(2, values_per_channel // 64))
        side = max(1, int(math.isqrt(values_per_channel // n)))
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        return (n, channels, side, values_per_channel // (n * side)), fmt
    n = min(8, max(2, values_per_channel // 64))
    side = max(1, round((values_per_channel // n) ** (1 / 3)))
    return (n, channels, side, side, values_per_channel // (n * side * side)), torch.contiguous_format


def step_seconds(layer, x, up, calls: int) -> float:
    def step():
        y = layer(x)
        torch.autograd.grad(y, [x, layer.weight, layer.bias], up)

    step()
    started = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - started) / calls


def ratio(layout: str, vpc: int, channels: int, dtype: torch.dtype, rounds: int) -> float:
    """Paired median over rounds of time(aten) / time(compiled) for one training step."""
    shape, fmt = shape_for(layout, vpc, channels)
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
    up = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    stats = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # as under autocast
    layer = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}[len(shape)](
        channels, dtype=stats)
    calls = max(1, int(3e6 // x.numel()))
    pairs = []
    order = random.Random(0)
    for _ in range(rounds):
        times = {}
        backends = ["aten", "compiled"]
        order.shuffle(backends)
        for name in backends:
            BF.set_backend(name)
            times[name] = step_seconds(layer, x, up, calls)
        pairs.append(times["aten"] / times["compiled"])
    BF.set_backend("auto")
    return statistics.median(pairs)


def rule(measured: dict[tuple[int, int], float], margin: float) -> list[tuple[int, int, int]]:
    """``(low, high, min_channels)`` ranges of values per channel: each run of consecutive measured sizes
    where every channel count was faster by ``margin``, from its first size to just past its last (to
    any larger size if the run ends at the largest size measured)."""
    good = [all(measured[(vpc, c)] >= 1 + margin for c in CHANNELS) for vpc in VALUES_PER_CHANNEL]
    ranges, start = [], None
    for i, (vpc, ok) in enumerate(zip(VALUES_PER_CHANNEL, good)):
        if ok and start is None:
            start = vpc
        if ok and (i + 1 == len(good) or not good[i + 1]):
            high = 2 ** 62 if i + 1 == len(good) else vpc + 1
            ranges.append((start, high, min(CHANNELS)))
            start = None
    return ranges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--margin", type=float, default=0.10)
    parser.add_argument("--write", action="store_true", help="write src/bnlab/functional/dispatch_table.py")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = ATen time / compiled time "
          f"per training step (paired median of {args.rounds} rounds); >1: compiled faster")
    table, lines = {}, []
    for dtype in DTYPES:
        for layout in ("rows", "planes_3d", "planes_4d", "planes_5d", "channels_last"):
            measured = {}
            for vpc in VALUES_PER_CHANNEL:
                for channels in CHANNELS:
                    measured[(vpc, channels)] = r = ratio(layout, vpc, channels, dtype, args.rounds)
                    shape = shape_for(layout, vpc, channels)[0]
                    line = f"{str(dtype).removeprefix('torch.'):<8s} {layout:<14s} {str(shape):<24s} {r:6.2f}x"
                    print(line, flush=True)
                    lines.append(line)
            ranges = rule(measured, args.margin)
            if ranges:
                table[(layout, str(dtype).removeprefix("torch."))] = tuple(ranges)
    print("\nFASTER =", table)
    if args.write:
        text = TABLE.read_text().split("FASTER:")[0]
        body = ",\n".join(f"    {k!r}: {v!r}" for k, v in table.items())
        TABLE.write_text(text + "FASTER: dict[tuple[str, str], tuple[tuple[int, int, int], ...]] = {\n"
                         + (body + ",\n" if body else "") + "}\n\n# measured by benchmarks/make_dispatch_table.py:\n"
                         + "".join(f"# {line}\n" for line in lines))
        print(f"wrote {TABLE}")


if __name__ == "__main__":
    main()
