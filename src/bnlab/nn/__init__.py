"""bnlab.nn: normalization layers, drop-in compatible with ``torch.nn``."""

from bnlab.nn.batchnorm import CONVENTIONS, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "CONVENTIONS"]
