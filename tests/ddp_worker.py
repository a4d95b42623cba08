"""One rank of the data-parallel training test: ``python ddp_worker.py RANK WORLD PORT OUT [CHECKPOINT]``."""

from __future__ import annotations

import datetime
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bnlab.models import ModelSpec  # noqa: E402
from bnlab.train import TrainConfig  # noqa: E402
from bnlab.train.distributed import train_data_parallel  # noqa: E402
from fakes import fake_dataset  # noqa: E402

SPEC = ModelSpec(hidden=(32, 16), norm="batch")
CFG = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, batch_size=32, steps=24, eval_every=8)
N_TRAIN = 330  # 10 batches of 32 and one of 10 (5 per worker): the last partial batch is in the test


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    checkpoint = sys.argv[5] if len(sys.argv) > 5 else None  # resume from (and save to) this file
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    result = train_data_parallel(SPEC, CFG, fake_dataset(n_train=N_TRAIN, n_test=100), seed=3, log=lambda *a: None,
                                 checkpoint=checkpoint)
    if rank == 0:
        torch.save({"state": result.model.state_dict(), "test_acc": result.test_acc}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
