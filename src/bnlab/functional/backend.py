"""Which implementation trains plain batch norm: torch's (ATen) or bnlab's compiled CPU kernel.

* ``"aten"``: ``torch.nn.functional.batch_norm``, bit for bit torch's numbers.
* ``"compiled"``: bnlab's kernel (``csrc/ghost_batch_norm.cpp`` with one ghost, forward and
  backward in C++, autograd registered in C++) for every training call it can serve: a float32 or
  float64 CPU input with parameters and buffers of its dtype, or a bfloat16/float16 input with
  float32 ones (statistics in float32, as torch keeps them under autocast), at least two values per
  channel. Everything else (inference, mixed dtypes otherwise, the non-finite guard) stays on ATen.
* ``"auto"`` (the default): the compiled kernel only where the measured dispatch table
  (:mod:`bnlab.functional.dispatch_table`, written by ``benchmarks/make_dispatch_table.py``) says it
  is faster than ATen on this kind of input, ATen elsewhere. The choice depends on the layout, the
  dtype and the size, never on timing a call. What "auto" promises: results equal to torch's to
  float32 round-off (outputs, gradients and running statistics; the bound the tests hold it to is in
  the README), not bit-identical: the kernel sums in a different order.

``BNLAB_COMPILED_KERNELS=0`` makes the default ``"aten"`` (and disables every compiled kernel).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from bnlab.functional import dispatch_table

__all__ = ["set_backend", "get_backend", "BACKENDS", "compiled_serves", "compiled_layout"]

BACKENDS = ("aten", "compiled", "auto")
_backend = "aten" if os.environ.get("BNLAB_COMPILED_KERNELS", "1") == "0" else "auto"


def set_backend(name: str) -> None:
    """Choose the implementation behind training batch norm: ``"aten"``, ``"compiled"`` or ``"auto"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def compiled_layout(x: Tensor) -> str:
    """The dispatch table's name for how the kernel reads ``x``: ``rows`` ((N, C), or spatial size 1),
    ``channels_last`` (4-D/5-D), or ``planes_3d`` / ``planes_4d`` / ``planes_5d`` (contiguous (N, C, *))."""
    n, c = x.shape[0], x.shape[1]
    if x.dim() == 2 or x.numel() == n * c:
        return "rows"
    if not x.is_contiguous() and (
            (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))):
        return "channels_last"
    return f"planes_{x.dim()}d"


_STATS_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float64,
                torch.bfloat16: torch.float32, torch.float16: torch.float32}


def _eligible(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Whether the compiled kernel can serve this training call: a CPU input in float32/float64 with
    parameters and buffers of its dtype, or in bfloat16/float16 with float32 ones (as under autocast),
    contiguous buffers, more than one value per channel, not inside vmap, and the kernels built."""
    stats = _STATS_DTYPE.get(x.dtype)
    if x.device.type != "cpu" or stats is None or x.dim() < 2:
        return False
    if x.numel() <= x.shape[1]:  # empty, or one value per channel: ATen raises the right error
        return False
    # torch.func transforms (vmap, grad, jvp) wrap tensors, and may wrap only the parameters; the op has
    # no batching rule and a C++ autograd Function cannot run under them: ATen's kernel can
    if not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None:
        return False
    for p in params:
        if p is not None and (p.dtype != stats or p.device.type != "cpu" or not p.is_contiguous()):
            return False
    from bnlab.functional.compiled import load_kernels

    return load_kernels()


# The table by dtype, then layout, made once per table object: "auto" asks on every training call, and
# an input whose dtype has no entry (most of them) must cost it a dict lookup, not a layout analysis.
_by_dtype: tuple[object, dict] = (None, {})


def _faster_here(x: Tensor) -> bool:
    global _by_dtype
    table, by_dtype = _by_dtype
    if table is not dispatch_table.FASTER:
        table, by_dtype = dispatch_table.FASTER, {}
        for (layout, dtype), ranges in table.items():
            by_dtype.setdefault(getattr(torch, dtype), {})[layout] = ranges
        _by_dtype = (table, by_dtype)
    layouts = by_dtype.get(x.dtype)
    if not layouts or x.dim() < 2:
        return False
    ranges = layouts.get(compiled_layout(x), ())
    if not ranges:
        return False
    values_per_channel = x.numel() // x.shape[1]
    return any(low <= values_per_channel < high and x.shape[1] >= min_channels
               for low, high, min_channels in ranges)


def compiled_serves(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                    running_var: Optional[Tensor]) -> bool:
    """Whether a training batch-norm call goes to the compiled kernel under the current backend."""
    if _backend == "aten":
        return False
    if _backend == "auto" and not _faster_here(x):  # before eligibility: nothing is built for ATen's calls
        return False
    return _eligible(x, weight, bias, running_mean, running_var)
