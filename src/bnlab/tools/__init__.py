"""Practitioner tools built on the library layer: things one does *to* a model with batch norm.

- :func:`recompute_bn_stats` (precise BN): replace the running averages by population statistics.
- :func:`fold_batchnorm`: fold eval-mode batch norm into the Linear/convolution before it.
"""

from bnlab.tools.fold import FoldReport, fold_batchnorm
from bnlab.tools.precise_bn import recompute_bn_stats

__all__ = ["recompute_bn_stats", "fold_batchnorm", "FoldReport"]
