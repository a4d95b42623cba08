"""``bnlab ARGS`` in a process of its own, on the synthetic dataset: what the fault tests start,
stop and kill. Only the data differs from the real command (``fakes.fake_dataset``, sized by
BNLAB_FAKE_TRAIN / BNLAB_FAKE_TEST)."""

from __future__ import annotations

import os
import sys

import bnlab.experiments.compare as compare_module
import bnlab.train.runner as runner_module
from bnlab.cli.main import main
from fakes import fake_dataset


def _fake(name: str, **_) -> object:
    return fake_dataset(n_train=int(os.environ.get("BNLAB_FAKE_TRAIN", "2000")),
                        n_test=int(os.environ.get("BNLAB_FAKE_TEST", "200")), name=name)


compare_module.load_dataset = _fake
runner_module.load_dataset = _fake

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
