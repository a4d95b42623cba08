"""``bnlab train``: one model, data-parallel over N processes (or several machines with torchrun)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from bnlab.cli.common import add_store_option, positive_int
from bnlab.errors import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train one preset data-parallel (DDP + SyncBatchNorm); --nproc N, or under torchrun",
        description="Train one preset with DistributedDataParallel and bnlab.nn.SyncBatchNorm. With --nproc N it "
                    "starts N local processes (torchrun --standalone); on several machines, run it under torchrun "
                    "on each (see the README). Rank 0 evaluates and records the run in the store.")
    p.add_argument("--preset", required=True, help="a preset from 'bnlab presets'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the preset's length)")
    p.add_argument("--nproc", type=positive_int, default=1, help="local worker processes (default 1)")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="FILE",
                   help="save model, optimizer and step here every --checkpoint-every steps, and resume from it "
                        "when it exists (a rerun, or torchrun --max-restarts after a worker died)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="STEPS",
                   help="steps between checkpoints (default: the preset's, 500)")
    add_store_option(p)
    p.set_defaults(run=run)


def _under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def run(args: argparse.Namespace) -> int:
    from bnlab.models import PRESETS

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; see 'bnlab presets'")
    if args.nproc > 1 and not _under_torchrun():
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   "-m", "bnlab.cli.main", "train", "--preset", args.preset, "--seed", str(args.seed)]
        if args.steps:
            command += ["--steps", str(args.steps)]
        if args.store:
            command += ["--store", str(args.store)]
        if args.checkpoint:
            command += ["--checkpoint", str(args.checkpoint)]
        if args.checkpoint_every:
            command += ["--checkpoint-every", str(args.checkpoint_every)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # N workers share the cores
        return subprocess.call(command, env=env)
    return _train(args)


def _train(args: argparse.Namespace) -> int:
    from bnlab.data import fetch_dataset
    from bnlab.models import PRESETS, ModelSpec
    from bnlab.store import RunStore
    from bnlab.train import TrainConfig
    from bnlab.train.distributed import train_data_parallel, world_from_environment

    preset = PRESETS[args.preset]
    spec = ModelSpec.from_dict(preset["model"])
    train = dict(preset["train"])
    if args.steps:
        train.pop("epochs", None)
        train["steps"] = args.steps
    if args.checkpoint_every:
        train["checkpoint_every"] = args.checkpoint_every
    cfg = TrainConfig.from_dict(train)
    rank, world = world_from_environment()
    dataset = fetch_dataset(cfg.dataset) if rank == 0 else None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # CPU training; the engine keeps the model on the CPU
        dist.barrier()  # rank 0 fetched the data into the cache; the others read it now
    if dataset is None:
        from bnlab.data import load_dataset

        dataset = load_dataset(cfg.dataset)
    store = RunStore(args.store) if rank == 0 else None
    say = print if rank == 0 else (lambda *a, **k: None)
    result = train_data_parallel(spec, cfg, dataset, seed=args.seed, store=store, label=args.preset, log=say,
                                 checkpoint=args.checkpoint)
    say(f"{args.preset}: {result.steps} steps on {result.world_size} process(es), "
        f"{result.seconds_per_step * 1e3:.1f} ms/step, final test accuracy {result.test_acc:.4f}"
        + (f" (run {result.run_id})" if result.run_id else ""))
    return 0
