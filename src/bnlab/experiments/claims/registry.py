"""Every claim, by name: the seeds' fourteen and the follow-ups that explain their surprises."""

from __future__ import annotations

from bnlab.experiments.claims.architecture import OUTPUT_LAYER_CLAIM, PLACEMENT_CLAIM
from bnlab.experiments.claims.base import Claim
from bnlab.experiments.claims.batch_size import ACCUMULATION_CLAIM, GHOST_CLAIM, SMALL_BATCHES_CLAIM
from bnlab.experiments.claims.inference import FROZEN_TRANSFER_CLAIM, TRAIN_VS_EVAL_CLAIM
from bnlab.experiments.claims.mechanism import ICS_CLAIM, IOFFE_FIGURE_1_CLAIM, LANDSCAPE_CLAIM
from bnlab.experiments.claims.regularization import REGULARIZATION_CLAIM
from bnlab.experiments.claims.robustness import HIGHER_LR_CLAIM, INIT_SENSITIVITY_CLAIM
from bnlab.experiments.claims.speed import BN_LAG_CLAIM, TRAINS_FASTER_CLAIM

__all__ = ["CLAIMS"]

CLAIMS: dict[str, Claim] = {c.name: c for c in sorted([
    TRAINS_FASTER_CLAIM, HIGHER_LR_CLAIM, INIT_SENSITIVITY_CLAIM, IOFFE_FIGURE_1_CLAIM, ICS_CLAIM, LANDSCAPE_CLAIM,
    PLACEMENT_CLAIM, SMALL_BATCHES_CLAIM, TRAIN_VS_EVAL_CLAIM, REGULARIZATION_CLAIM, FROZEN_TRANSFER_CLAIM,
    ACCUMULATION_CLAIM, GHOST_CLAIM, OUTPUT_LAYER_CLAIM, BN_LAG_CLAIM], key=lambda c: c.number)}
