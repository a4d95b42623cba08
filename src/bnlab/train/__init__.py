"""bnlab.train: the training engine (K seeds stacked), its recipes, and the store-backed runner (lab layer)."""

from bnlab.train.config import TrainConfig
from bnlab.train.engine import StackedTrainer, StopRequested, TrainData, prepare_data
from bnlab.train.runner import GroupResult, resume, run_group

__all__ = ["TrainConfig", "StackedTrainer", "StopRequested", "TrainData", "prepare_data", "GroupResult",
           "run_group", "resume"]
