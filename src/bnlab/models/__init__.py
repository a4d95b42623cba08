"""bnlab.models: model specs, the builder, K-model stacking, and the seed/paper presets (lab layer)."""

from bnlab.models.fused import StackedModel
from bnlab.models.presets import PRESETS
from bnlab.models.spec import ModelSpec, build_model

__all__ = ["ModelSpec", "build_model", "StackedModel", "PRESETS"]
