"""What synchronising batch norm costs, and what data-parallel training gains, on this machine.

1. SyncBatchNorm forward + backward with 2 gloo workers, each on half of a batch, against plain batch
   norm on the same half in one process: the price of the all-gather and the all-reduce per layer call.
2. One training step of ``torch-mlp`` (synthetic data) with ``bnlab train``'s engine on 2 processes
   (1 thread each) against 1 process (1 thread): the data-parallel speed-up, all-reduces included.
3. A quick claims suite (``higher-lr``, ``init-sensitivity``, ``placement``: 28 arms at the quick
   protocol, 2 seeds, real MNIST) on a local 2-CPU Ray instance (one 1-thread task per arm) against
   the sequential runner in this process (2 threads), each into a fresh store.

A 2-core machine can show the costs; it cannot show a cluster's speed-up (two processes share two
cores and one memory bus). From the measured per-step compute and all-reduce times the script prints
a projection of the step time on N machines, assuming the compute splits evenly and the all-reduces
cost what they cost here (a LAN's latency is higher than loopback's: the projection is a best case).

Run on a quiet machine:  .venv/bin/python benchmarks/bench_dist.py [--skip-claims]
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = [(64, 256), (32, 64, 28, 28)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank, world, port, out):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import bnlab.nn as bnn

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for shape in SHAPES:
        half = (shape[0] // world, *shape[1:])
        x = torch.randn(half, requires_grad=True)
        up = torch.randn(half)
        layers = {"sync": bnn.SyncBatchNorm(shape[1]), "plain": bnn.BatchNorm2d(shape[1]) if len(shape) == 4
                  else bnn.BatchNorm1d(shape[1])}
        for name, layer in layers.items():
            times = []
            for _ in range(30):
                dist.barrier()
                t = time.perf_counter()
                layer(x).backward(up)
                times.append(time.perf_counter() - t)
            results[(shape, name)] = statistics.median(times[5:])
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def _train_worker(rank, world, port, steps, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from bnlab.models import PRESETS, ModelSpec
    from bnlab.train import TrainConfig
    from bnlab.train.distributed import train_data_parallel

    sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
    from bench_compiled_bn import synthetic_mnist

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec = ModelSpec.from_dict(PRESETS["torch-mlp"]["model"])
    cfg = TrainConfig.from_dict({**PRESETS["torch-mlp"]["train"], "epochs": None, "steps": steps,
                                 "eval_every": 10 ** 6})
    result = train_data_parallel(spec, cfg, synthetic_mnist(8192), log=lambda *a: None)
    if rank == 0:
        out["seconds_per_step"] = result.seconds_per_step
    if world > 1:
        dist.destroy_process_group()


CLAIMS_SUITE = ("higher-lr", "init-sensitivity", "placement")


def _claims_suite(executor, store_path) -> tuple[float, dict[str, int], float]:
    """(wall seconds, {claim: arms trained}, the arms' summed training seconds) of the quick suite into a
    new store."""
    from bnlab.experiments.claims import CLAIMS, ClaimContext
    from bnlab.store import RunStore

    started = time.perf_counter()
    with RunStore(store_path) as store:
        ctx = ClaimContext(store=store, quick=True, seeds=2, out_dir=store_path.parent, progress=False,
                           executor=executor)
        for name in CLAIMS_SUITE:
            CLAIMS[name].execute(ctx)
        groups = {r.group_id: (r.config["label"], r.wall_seconds) for r in store.runs()}
    per_claim = {name: sum(label.startswith(f"claim:{name}/") for label, _ in groups.values()) for name in CLAIMS_SUITE}
    return time.perf_counter() - started, per_claim, sum(seconds for _, seconds in groups.values())


def claims_on_ray() -> None:
    import tempfile
    from pathlib import Path

    from bnlab.experiments.executors import RayExecutor

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        here, per_claim, arm_seconds = _claims_suite(None, Path(tmp) / "here.sqlite")
        arms = sum(per_claim.values())
        clock = time.perf_counter()
        executor = RayExecutor(num_cpus=2)
        startup = time.perf_counter() - clock
        try:
            on_ray, ray_per_claim, ray_arm_seconds = _claims_suite(executor, Path(tmp) / "ray.sqlite")
            ray_arms = sum(ray_per_claim.values())
        finally:
            executor.shutdown()
    print(f"\nquick claims suite {', '.join(CLAIMS_SUITE)} (2 seeds, {arms} arms): sequential (2 threads) "
          f"{here:.1f} s; local Ray, 2 CPUs, 1-thread tasks: {on_ray:.1f} s + {startup:.1f} s to start Ray "
          f"({here / (on_ray + startup):.2f}x with start-up, {here / on_ray:.2f}x without)")
    per_arm = ray_arm_seconds / max(1, ray_arms)
    print(f"  per arm: {arm_seconds / max(1, arms):.1f} s sequential (2 threads), {per_arm:.1f} s as a 1-thread task")
    print("projection (each claim's arms spread over N one-CPU workers, a claim waits for its slowest arm, "
          "per-arm time as measured in the tasks):")
    for n in (2, 8, 32):
        projected = sum(-(-k // n) for k in per_claim.values()) * per_arm
        print(f"  {n} workers: {projected:.0f} s ({here / projected:.1f}x the sequential runner here)")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-claims", action="store_true", help="parts 1 and 2 only (part 3 needs MNIST)")
    args = parser.parse_args()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_sync_worker, args=(2, _port(), out), nprocs=2)
    print("SyncBatchNorm, 2 gloo workers on half the batch each, forward + backward (median of 25 calls):")
    for shape in SHAPES:
        sync, plain = out[(shape, "sync")], out[(shape, "plain")]
        print(f"  batch {shape}: sync {sync * 1e3:.3f} ms, plain BN on the half {plain * 1e3:.3f} ms, "
              f"synchronisation costs {1e3 * (sync - plain):.3f} ms per layer call ({sync / plain:.2f}x)")
    steps = {}
    for world in (1, 2):
        result = manager.dict()
        mp.spawn(_train_worker, args=(world, _port(), 60, result), nprocs=world)
        steps[world] = result["seconds_per_step"]
    print(f"\ntorch-mlp training step (batch 64): 1 process {steps[1] * 1e3:.1f} ms, 2 processes "
          f"{steps[2] * 1e3:.1f} ms ({steps[1] / steps[2]:.2f}x)")
    compute = steps[1]
    overhead = max(0.0, steps[2] - steps[1] / 2)  # what 2 workers pay beyond half the work
    print("projection (compute split evenly, the same per-step synchronisation as measured here):")
    for n in (2, 4, 8):
        projected = compute / n + overhead
        print(f"  {n} machines: {projected * 1e3:.1f} ms/step, {compute / projected:.2f}x")
    if not args.skip_claims:
        claims_on_ray()


if __name__ == "__main__":
    main()
