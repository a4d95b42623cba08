"""One worker of the SyncBatchNorm tests: ``python dist_worker.py RANK WORLD PORT CASE OUT``.

Every worker builds the same layer and the same full batch, takes its slice (sizes per case), runs one
training step and saves what it computed; the test compares the slices with one process on the whole batch.
"""

from __future__ import annotations

import datetime
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import bnlab.nn as bnn  # noqa: E402

SLICES = {"equal": (8, 8), "unequal": (5, 9, 2), "empty": (0, 10, 6), "die": (8, 8), "rows": (7, 9)}


def full_batch(case: str):
    g = torch.Generator().manual_seed(0)
    n = sum(SLICES[case])
    shape = (n, 6) if case == "rows" else (n, 6, 3, 4)
    return torch.randn(shape, generator=g) * 2 + 1, torch.randn(shape, generator=g)


def layer(convention: str = "torch"):
    torch.manual_seed(1)
    bn = bnn.SyncBatchNorm(6, convention=convention)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(6) + 0.5)
        bn.bias.copy_(torch.randn(6))
    return bn


def main() -> None:
    rank, world, port, case, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=15))
    convention = "keras" if case == "unequal" else "torch"
    bn = layer(convention)
    x, up = full_batch(case)
    start = sum(SLICES[case][:rank])
    piece = slice(start, start + SLICES[case][rank])
    if case == "die" and rank == 1:
        os._exit(3)  # a worker that dies before the collective
    x_local = x[piece].clone().requires_grad_(True)
    try:
        for _ in range(2):  # two steps: the running statistics follow the merged ones
            y = bn(x_local)
        y.backward(up[piece])
    except RuntimeError as exc:
        torch.save({"error": f"{type(exc).__name__}: {exc}"}, out)
        return
    torch.save({"y": y.detach(), "dx": x_local.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
