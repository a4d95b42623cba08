"""Functional normalizations: validation and running-statistics policy over the kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.functional.kernels import select_kernel

__all__ = ["batch_norm"]


def _check_enough_values(x: Tensor) -> None:
    values_per_channel = x.size(0)
    for d in x.shape[2:]:
        values_per_channel *= d
    if values_per_channel == 1:
        # Same opening words as torch, so code that matches torch's message still does.
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}. "
            "A batch variance needs at least 2 values per channel; with 1 the output would be all zeros "
            "(or NaN in the running variance). Usual cause: the last, incomplete batch of an epoch has "
            "size 1. Fix it with DataLoader(..., drop_last=True), a larger batch, or eval() mode for "
            "single-sample inference; for genuinely tiny batches use GroupNorm or LayerNorm."
        )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    running_var_correction: int = 1,
    skip_nonfinite_update: bool = False,
    kernel: str | None = None,
) -> Tensor:
    r"""Batch normalization over dim 1 of an ``(N, C, *)`` input.

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta

    **During training** (``training=True``), :math:`\mu` and :math:`\sigma^2`
    are the mean and *biased* variance of the current batch over every axis
    but C, and the running buffers (if given) are updated in place::

        running_mean = (1 - momentum) * running_mean + momentum * batch_mean
        running_var  = (1 - momentum) * running_var  + momentum * batch_var * n / (n - running_var_correction)

    with ``n`` values per channel. An empty batch leaves them untouched.

    **During inference** (``training=False``), :math:`\mu` and
    :math:`\sigma^2` are ``running_mean`` and ``running_var``.

    Args:
        input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``;
            any memory layout; float16/bfloat16 inputs are reduced in float32.
        running_mean, running_var: ``(C,)`` buffers, or None to keep no
            statistics (then ``training`` must be True).
        weight, bias: ``(C,)`` affine parameters :math:`\gamma, \beta`, or None.
        momentum: weight of the new batch in the moving averages (PyTorch
            direction; Keras' ``momentum=0.99`` is ``0.01`` here).
        eps: added to the variance before the square root.
        running_var_correction: 1 stores the unbiased variance (PyTorch), 0
            the biased one (Keras, Flax, ONNX).
        skip_nonfinite_update: leave the running buffers untouched when the
            update would make any of them NaN or Inf (one overflowing fp16
            batch otherwise poisons them for good). Costs one buffer copy.
        kernel: force a kernel by name (see :func:`~bnlab.functional.kernel_names`); default picks
            the first registered kernel that accepts the input.

    Raises:
        ValueError: in training, when there is only one value per channel.
    """
    if input.dim() < 2:
        raise ValueError(f"batch_norm expects an input of shape (N, C, *), got shape {tuple(input.shape)}")
    if training:
        _check_enough_values(input)
    elif running_mean is None or running_var is None:
        raise ValueError(
            "batch_norm with training=False normalizes with the running statistics, "
            "so running_mean and running_var must be given"
        )
    chosen = select_kernel(input, running_var_correction, kernel)
    guard = (
        skip_nonfinite_update
        and training
        and input.numel() > 0
        and (running_mean is not None or running_var is not None)
    )
    if not guard:
        return chosen.fn(
            input, running_mean, running_var, weight, bias, training, momentum, eps, running_var_correction
        )
    # Update copies, then keep them only if all finite: a branch-free select, so
    # there is no host sync and no data-dependent control flow for torch.compile.
    new_mean = None if running_mean is None else running_mean.clone()
    new_var = None if running_var is None else running_var.clone()
    output = chosen.fn(input, new_mean, new_var, weight, bias, training, momentum, eps, running_var_correction)
    with torch.no_grad():
        finite = torch.ones((), dtype=torch.bool, device=input.device)
        for new in (new_mean, new_var):
            if new is not None:
                finite = finite & torch.isfinite(new).all()
        for old, new in ((running_mean, new_mean), (running_var, new_var)):
            if old is not None:
                old.copy_(torch.where(finite, new, old))
    return output
