"""Practitioner tools built on the library layer: things one does *to* a model with batch norm.

- :func:`recompute_bn_stats` (precise BN): replace the running averages by population statistics.
- :func:`fold_batchnorm`: fold eval-mode batch norm into the Linear/convolution before it.
- :func:`convert_batchnorm`, :func:`from_keras`, :func:`to_keras`: move batch norms between bnlab,
  torch.nn and Keras with the momentum direction, epsilon and stored variance handled.
"""

from bnlab.tools.convert import KerasBatchNorm, convert_batchnorm, from_keras, to_keras
from bnlab.tools.fold import FoldReport, fold_batchnorm
from bnlab.tools.precise_bn import recompute_bn_stats

__all__ = ["recompute_bn_stats", "fold_batchnorm", "FoldReport", "convert_batchnorm", "from_keras", "to_keras",
           "KerasBatchNorm"]
