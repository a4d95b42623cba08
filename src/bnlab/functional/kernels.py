"""Batch-norm kernels and the per-layout registry :func:`~bnlab.functional.batch_norm` dispatches to.

A *kernel* does the arithmetic of one batch-norm call; policy (validation,
which statistics, the non-finite guard) stays in :mod:`bnlab.functional.norms`.
Built in, tried in this order:

* ``"native"``: torch's kernel (``F.batch_norm``, so torch's checks too). It computes every
  semantics bnlab's BatchNorm needs today, so it serves every layout.
* ``"composite"``: :func:`~bnlab.functional.core.compute_stats`,
  :func:`~bnlab.functional.core.update_running_stats` and
  :func:`~bnlab.functional.core.normalize` in plain torch ops. It accepts
  every input and is the oracle the fast kernels are tested against.

A faster kernel for one layout (say a compiled NCHW float32 kernel) is added
with :func:`register_kernel`; it is tried first for the layouts it names, and
the built-in kernels still serve everything it declines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from bnlab.functional.core import bessel_factor, channel_view, compute_stats, normalize, update_running_stats

__all__ = ["Kernel", "register_kernel", "kernel_names", "select_kernel", "memory_layout", "LAYOUTS",
           "compiled_batch_norm"]

LAYOUTS = frozenset({"contiguous", "channels_last", "strided"})

# fn(input, running_mean, running_var, weight, bias, training, momentum, eps, correction) -> output
KernelFn = Callable[
    [Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, bool, float, float, int], Tensor
]


def _always(x: Tensor, correction: int) -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    """A batch-norm implementation that :func:`batch_norm` may dispatch to.

    Attributes:
        name: how users and benchmarks select it (``batch_norm(..., kernel=name)``).
        fn: ``fn(input, running_mean, running_var, weight, bias, training,
            momentum, eps, correction) -> output``. ``momentum`` is already the
            weight of the new batch; the running buffers are updated in place
            when ``training`` and they are not None, storing the variance with
            Bessel ``correction`` (1 unbiased, 0 biased).
        layouts: the :func:`memory_layout` values it handles.
        accepts: a cheap per-call veto, ``accepts(input, correction) -> bool``
            (e.g. a float32-only kernel).
    """

    name: str
    fn: KernelFn
    layouts: frozenset[str] = LAYOUTS
    accepts: Callable[[Tensor, int], bool] = field(default=_always)


def memory_layout(x: Tensor) -> str:
    """``"contiguous"`` (NCHW order), ``"channels_last"`` (NHWC/NDHWC strides) or ``"strided"``."""
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return "strided"


def _bessel_rescale(x: Tensor, correction: int) -> float:
    """s = (n-1)/(n-c): ATen's update of ``running_var / s``, times s, stores ``var * n / (n - c)``."""
    n = x.numel() // x.size(1)
    return bessel_factor(n, correction) / bessel_factor(n, 1)


@contextlib.contextmanager
def corrected_running_var(x: Tensor, running_var: Tensor | None, training: bool, correction: int):
    """Yield the buffer to hand to ATen so that its update stores ``var * n / (n - correction)``.

    ATen always stores the unbiased ``var * n/(n-1)``. Any other correction c is
    reached exactly by scaling the buffer by s = (n-1)/(n-c) around the native
    update: s * ((1-m) * rv/s + m * var*n/(n-1)) = (1-m) * rv + m * var*n/(n-c).
    That costs two C-sized ops instead of a second pass over the input.
    """
    if not (training and running_var is not None and correction != 1 and x.numel() > 0):
        yield running_var
        return
    s = _bessel_rescale(x, correction)
    scaled = running_var / s
    yield scaled
    with torch.no_grad():
        running_var.copy_(scaled * s)  # not in place on `scaled`: autograd saved it


def native_batch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    correction: int,
) -> Tensor:
    """The ``"native"`` kernel: ``torch.nn.functional.batch_norm`` itself (torch's checks, and the call
    ``__torch_function__`` overrides see), with :func:`corrected_running_var`'s rescaling for a
    correction other than 1. Written without a context manager so that TorchScript compiles it."""
    if training and running_var is not None and correction != 1 and x.numel() > 0:
        s = _bessel_rescale(x, correction)
        scaled = running_var / s
        y = F.batch_norm(x, running_mean, scaled, weight, bias, training, momentum, eps)
        with torch.no_grad():
            running_var.copy_(scaled * s)  # not in place on `scaled`: autograd saved it
        return y
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _composite_kernel(x, running_mean, running_var, weight, bias, training, momentum, eps, correction):
    if training:
        reduce_dims = [0, *range(2, x.dim())]
        mean, var = compute_stats(x, reduce_dims)
        if x.numel() > 0:
            count = x.numel() // x.size(1)
            update_running_stats(
                running_mean, running_var, mean.detach(), var.detach(), count,
                momentum=momentum, correction=correction,
            )
    else:
        mean, var = running_mean, running_var
    return normalize(
        x,
        channel_view(mean, x.dim()),
        channel_view(var, x.dim()),
        channel_view(weight, x.dim()),
        channel_view(bias, x.dim()),
        eps,
    )


def compiled_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, correction):
    """The ``"compiled"`` kernel: training batch norm by bnlab's C++ kernel and C++ autograd
    (``torch.ops.bnlab.batch_norm_train``) where it can serve the call (see
    :mod:`bnlab.functional.backend`), torch's native kernel otherwise (inference, half precision,
    mixed dtypes, a missing compiler)."""
    from bnlab.functional.backend import _eligible

    if not training or not _eligible(x, weight, bias, running_mean, running_var):
        return native_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, correction)
    return compiled_train(x, running_mean, running_var, weight, bias, momentum, eps, correction)


def compiled_train(x, running_mean, running_var, weight, bias, momentum, eps, correction):
    """The compiled training call itself, for a caller that has already checked it can serve ``x``
    (:func:`bnlab.functional.backend.compiled_serves`): no second check on the hot path."""
    unbias = bessel_factor(x.numel() // x.size(1), correction)
    return torch.ops.bnlab.batch_norm_train(x, weight, bias, running_mean, running_var, eps, momentum, unbias)


# Tried first to last; register_kernel puts new kernels in front. "compiled" is last: it is chosen by
# name, or by the backend (bnlab.functional.backend) before this registry is consulted.
_NATIVE = Kernel("native", native_batch_norm)
_KERNELS: list[Kernel] = [_NATIVE, Kernel("composite", _composite_kernel), Kernel("compiled", compiled_batch_norm)]


def native_is_first_choice() -> bool:
    """True while no faster kernel is registered in front of ``"native"`` (which accepts every input),
    so :func:`batch_norm` can skip the per-call selection."""
    return _KERNELS[0] is _NATIVE


def register_kernel(kernel: Kernel) -> None:
    """Make ``kernel`` the first choice for the layouts it names.

    Re-registering a name replaces the previous kernel of that name.
    """
    unknown = set(kernel.layouts) - LAYOUTS
    if unknown:
        raise ValueError(f"unknown layouts {sorted(unknown)}; expected a subset of {sorted(LAYOUTS)}")
    _KERNELS[:] = [kernel] + [k for k in _KERNELS if k.name != kernel.name]


def kernel_names() -> list[str]:
    """Names of the registered kernels, in the order they are tried."""
    return [k.name for k in _KERNELS]


def select_kernel(x: Tensor, correction: int, name: str | None = None) -> Kernel:
    """The kernel named ``name``, or else the first registered one that takes ``x``."""
    if name is not None:
        for k in _KERNELS:
            if k.name == name:
                return k
        raise ValueError(f"unknown batch-norm kernel {name!r}; registered: {kernel_names()}")
    layout = memory_layout(x)
    for k in _KERNELS:
        if layout in k.layouts and k.accepts(x, correction):
            return k
    raise RuntimeError(f"no batch-norm kernel accepts a {layout} {x.dtype} input")  # composite accepts all
