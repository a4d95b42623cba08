"""bnlab.nn: normalization layers, drop-in compatible with ``torch.nn``.

* batch statistics: :class:`BatchNorm1d/2d/3d`, :class:`BatchRenorm1d/2d/3d`,
  :class:`GhostBatchNorm1d/2d`
* fixed statistics: :class:`FrozenBatchNorm1d/2d/3d`, :func:`freeze_batchnorm`,
  :func:`unfreeze_batchnorm`
* per-sample statistics: :class:`LayerNorm`, :class:`GroupNorm`, :class:`InstanceNorm1d/2d/3d`
* across processes: :class:`SyncBatchNorm` (CPU/gloo and GPU), :func:`convert_sync_batchnorm`,
  :func:`revert_sync_batchnorm`
* :func:`make_norm` builds any of them by name.
"""

from bnlab.nn.alternatives import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm
from bnlab.nn.batchnorm import CONVENTIONS, BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.factory import NORM_KINDS, default_groups, make_norm
from bnlab.nn.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batchnorm,
    unfreeze_batchnorm,
)
from bnlab.nn.sync import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from bnlab.nn.variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    RenormSchedule,
)

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "CONVENTIONS",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "RenormSchedule",
    "GhostBatchNorm1d", "GhostBatchNorm2d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze_batchnorm", "unfreeze_batchnorm",
    "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "make_norm", "NORM_KINDS", "default_groups",
    "SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm",
]


def _register_with_torch_tools() -> None:
    from torch import nn

    from bnlab.nn._interop import register_with_torch_tools

    register_with_torch_tools({
        nn.BatchNorm1d: [BatchNorm1d, BatchRenorm1d, GhostBatchNorm1d],
        nn.BatchNorm2d: [BatchNorm2d, BatchRenorm2d, GhostBatchNorm2d],
        nn.BatchNorm3d: [BatchNorm3d, BatchRenorm3d],
        nn.LayerNorm: [LayerNorm],
        nn.GroupNorm: [GroupNorm],
        nn.InstanceNorm1d: [InstanceNorm1d],
        nn.InstanceNorm2d: [InstanceNorm2d],
        nn.InstanceNorm3d: [InstanceNorm3d],
    })


_register_with_torch_tools()
