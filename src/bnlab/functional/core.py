"""The three building blocks of bnlab's normalizations, written once in plain torch ops.

Each normalization (batch, layer, group, instance, renorm, ghost) is the
same computation with different reduction axes:

1. :func:`compute_stats`: mean and variance over the reduction axes,
2. :func:`normalize`: ``y = (x - mean) / sqrt(var + eps) * weight + bias``,
3. :func:`update_running_stats`: fold batch statistics into moving averages
   (only the batch-statistics layers use it).

Where they run: batch renorm, ghost batch norm's eager path and the
``"composite"`` batch-norm kernel (``bnlab.functional.batch_norm(...,
kernel="composite")``) are these functions, and autograd gives the exact
backward pass of the composition. Plain batch, layer, group and instance norm
run torch's own kernels by default (``F.batch_norm`` and friends: the drop-in's
promise of torch's numbers and speed); the tests hold those kernels, the
compiled ones in :mod:`bnlab.functional.compiled` and these functions to the
same NumPy reference (:mod:`bnlab.reference`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["compute_stats", "normalize", "scale_shift", "update_running_stats", "stats_dtype", "channel_view",
           "bessel_factor"]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are reduced and kept in for inputs of ``dtype``.

    Half-precision sums over tens of thousands of values lose most of their
    mantissa (and fp16 overflows past 65504), so reductions run in float32 at
    least. float64 stays float64.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def bessel_factor(count: int, correction: int) -> float:
    """``count / (count - correction)``: what turns a biased variance over ``count`` values into the one a
    convention stores (``correction`` 1: unbiased, torch; 0: biased, Keras/Flax/ONNX). NaN without
    enough values, as ATen's update gives. The one place every layer and kernel takes it from."""
    return count / (count - correction) if count > correction else float("nan")


def channel_view(t: Tensor | None, ndim: int) -> Tensor | None:
    """A per-channel ``(C,)`` tensor viewed as ``(1, C, 1, ...)`` to broadcast against an ``ndim`` input."""
    return None if t is None else t.view((1, -1) + (1,) * (ndim - 2))


def compute_stats(
    x: Tensor, reduce_dims: Sequence[int], *, correction: int = 0, keepdim: bool = False
) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``x`` over ``reduce_dims``, in float32 or wider.

    Args:
        x: input of any floating dtype.
        reduce_dims: the axes that are averaged away (``(0, 2, 3)`` for
            BatchNorm2d on NCHW, ``(1, 2, 3)`` for LayerNorm over C, H, W).
        correction: ``0`` gives the biased (population) variance
            ``sum((x - mean)^2) / n`` used for normalization; ``1`` gives the
            Bessel-corrected ``/ (n - 1)``.
        keepdim: keep the reduced axes with size 1 so the results broadcast
            against ``x``.

    Returns:
        ``(mean, var)`` in :func:`stats_dtype` of ``x``.

    ``torch.var_mean`` is used rather than ``E[x^2] - E[x]^2``: the latter
    cancels catastrophically when ``|mean| >> std`` and can even go negative.
    """
    acc = x.to(stats_dtype(x.dtype))
    var, mean = torch.var_mean(acc, dim=tuple(reduce_dims), correction=correction, keepdim=keepdim)
    return mean, var


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias``, returned in ``x.dtype``.

    ``mean``, ``var``, ``weight`` and ``bias`` must broadcast against ``x``
    (e.g. shape ``(1, C, 1, 1)`` for per-channel statistics on NCHW).

    The affine part is folded into one scale and one shift per statistic,
    ``y = x * scale + shift`` with ``scale = weight / sqrt(var + eps)`` and
    ``shift = bias - mean * scale``: one multiply-add per element, and the same
    rounding order as torch's native CPU kernel, so results agree to the last
    float32 bits more often than the textbook order would.
    """
    scale, shift = scale_shift(mean, var, weight, bias, eps)
    y = x.to(scale.dtype) * scale + shift
    return y.to(x.dtype)


def scale_shift(
    mean: Tensor, var: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``(x - mean) / sqrt(var + eps) * weight + bias == x * scale + shift``.

    With running statistics this is batch norm at inference: a fixed affine map per
    channel, which can be folded into the weights of a preceding linear layer or
    convolution (see :meth:`bnlab.models.StackedModel.inference_copy`).
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int,
    *,
    momentum: float,
    correction: int = 1,
) -> None:
    """Fold one batch into the moving averages, in place.

    ``running = (1 - momentum) * running + momentum * batch`` (the PyTorch
    direction: ``momentum`` is the weight of the *new* batch).

    ``batch_var`` is the biased variance over ``count`` values per channel; it
    is stored as ``batch_var * count / (count - correction)``. PyTorch keeps
    the unbiased estimate (``correction=1``), Keras, Flax and ONNX the biased
    one (``correction=0``).
    """
    if running_mean is not None:
        running_mean.mul_(1.0 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        bessel = bessel_factor(count, correction)
        running_var.mul_(1.0 - momentum).add_(batch_var.to(running_var.dtype), alpha=momentum * bessel)
