"""Every claim's protocol sizes, quick and full, in one table (tests shrink them here to seconds).

The full sizes follow the sources (the Udacity lesson ran 50k steps, 10k already separates its
arms; Ioffe & Szegedy's Figure 1 ran 50k); the quick ones keep the whole suite within minutes.
Claim modules read these as ``protocols.NAME`` at run time, never copy them at import.
"""

from __future__ import annotations

from bnlab.models import PRESETS, ModelSpec
from bnlab.train import TrainConfig

__all__ = ["PAPER_MLP", "PAPER_SGD", "PRESETS"]

# The 784-100-100-100-10 network of Ioffe & Szegedy §4.1, as used by the Udacity lesson whose table
# anchors claims 2 and 3: batch 60, plain SGD, pixels in [0, 1], bias dropped before a norm.
PAPER_MLP = ModelSpec(hidden=(100, 100, 100), activation="relu", init="normal", init_scale=0.05,
                      bias_before_norm=False)
PAPER_SGD = TrainConfig(optimizer="sgd", lr=0.1, batch_size=60, steps=1000, scaling="unit", eval_every=100)

QUICK_EPOCHS = 1  # torch-mlp length for the quick protocol of claims 1, 9, 11 and 14 (full: the preset's 5)
STEPS = {
    "higher-lr": {"quick": 800, "full": 10000},
    "init-sensitivity": {"quick": 800, "full": 5000},
    "placement": {"quick": 1000, "full": 10000},
}
IOFFE_STEPS = {"quick": 3000, "full": 50000}
IOFFE_THRESHOLD = {"quick": 0.90, "full": 0.95}  # a 3000-step sigmoid net does not reach 95%
ICS_STEPS = {"quick": 3000, "full": 10000}
LANDSCAPE_STEPS = {"quick": 2000, "full": 10000}
# matched distances ‖Δθ‖ for claim 6's follow-up: ½–4× the typical SGD step of the ioffe-mlp nets,
# ‖0.1·g‖ ≈ 0.02–0.04 with and without BN (measured over 3000 steps of seed 0 before the full run)
LANDSCAPE_LENGTHS = (0.02, 0.04, 0.08, 0.16)
SURFACE_POINTS = 21
SMALL_BATCH_SAMPLES = {"quick": 9600, "full": 60000}  # samples seen per run, equal for every batch size
SMALL_BATCHES = (2, 4, 8, 16, 32)
EVAL_BATCHES = (2, 4, 8, 16, 50, 100, 1000)  # all divide the 10,000 test images
REGULARIZATION_EPOCHS = {"quick": 2, "full": 10}
TRAIN_CURVE_EXAMPLES = 10000  # claim 10's train-accuracy curve: a fixed stratified subset of the training set
REESTIMATE_BATCHES = 50  # claim 11: Fashion batches for the re-estimated statistics
FINETUNE_STEPS = {"quick": 300, "full": 2000}
ACCUMULATION_STEPS = {"quick": 300, "full": 1875}  # full: one epoch at batch 32
GHOST = {"quick": {"epochs": 3, "large": 2048, "small": 128, "virtual": 128},
         "full": {"epochs": 10, "large": 4096, "small": 128, "virtual": 128}}
GHOST_EVAL_EVERY_LARGE = 8  # large-batch steps between evaluations; the small batch evaluates at the same samples
LAG_TEST_EXAMPLES = 2000  # claim 15: the stratified test subset the three evaluations share
LAG_REESTIMATE_BATCHES = 100  # claim 15: training batches behind each precise estimate
