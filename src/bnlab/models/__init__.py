"""bnlab.models: model specs, the builder, K-model stacking, and the seed/paper presets (lab layer).

The presets are plain data and import without torch (``bnlab --help`` stays fast); the
rest is imported on first use.
"""

from bnlab.models.presets import PRESETS

__all__ = ["ModelSpec", "build_model", "StackedModel", "PRESETS"]

_LAZY = {"ModelSpec": "bnlab.models.spec", "build_model": "bnlab.models.spec", "StackedModel": "bnlab.models.fused"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnlab.models' has no attribute {name!r}")
