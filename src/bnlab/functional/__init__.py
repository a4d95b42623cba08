"""bnlab.functional: the one computational core of every bnlab normalization layer.

* :mod:`~bnlab.functional.core`: ``compute_stats``, ``normalize``,
  ``scale_shift`` (inference-time batch norm as one affine map) and ``update_running_stats``, the building blocks in plain torch ops.
* :mod:`~bnlab.functional.kernels`: the per-layout kernel registry (torch's
  native kernel, the composite one, and any faster kernel registered later).
* :mod:`~bnlab.functional.norms`: ``batch_norm``, the policy (validation,
  statistics, guards) in front of the kernels, and the family built on them.
* :mod:`~bnlab.functional.compiled`: the compiled CPU kernels (``csrc/``) that
  ghost batch norm and batch renorm use, and plain batch norm where
  :mod:`~bnlab.functional.backend` sends it, built on first use, with a torch fallback.
"""

from bnlab.functional.backend import get_backend, set_backend
from bnlab.functional.core import compute_stats, normalize, scale_shift, stats_dtype, update_running_stats
from bnlab.functional.kernels import Kernel, kernel_names, memory_layout, register_kernel
from bnlab.functional.norms import (
    batch_norm,
    batch_renorm,
    ghost_batch_norm,
    group_norm,
    instance_norm,
    layer_norm,
)

__all__ = [
    "batch_norm",
    "layer_norm",
    "group_norm",
    "instance_norm",
    "batch_renorm",
    "ghost_batch_norm",
    "compute_stats",
    "normalize",
    "scale_shift",
    "update_running_stats",
    "stats_dtype",
    "Kernel",
    "register_kernel",
    "kernel_names",
    "memory_layout",
    "set_backend",
    "get_backend",
]
