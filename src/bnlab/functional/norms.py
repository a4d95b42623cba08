"""Functional normalizations: validation and running-statistics policy over the kernels.

Every function here is a thin wrapper: statistics, normalization and running
averages come from :mod:`bnlab.functional.core` or from torch's native kernels
through :func:`batch_norm`; what each adds is which axes, and what the
running statistics mean.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from bnlab.functional.backend import compiled_serves
from bnlab.functional.compiled import load_kernels
from bnlab.functional.core import bessel_factor, channel_view, compute_stats, normalize, update_running_stats
from bnlab.functional.kernels import (
    compiled_train,
    corrected_running_var,
    memory_layout,
    native_batch_norm,
    native_is_first_choice,
    select_kernel,
)

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "batch_renorm", "ghost_batch_norm"]


_ONE_VALUE_ADVICE = (
    " A batch variance needs at least 2 values per channel; with 1 the output would be all zeros "
    "(or NaN in the running variance). Usual cause: the last, incomplete batch of an epoch has "
    "size 1. Fix it with DataLoader(..., drop_last=True), a larger batch, or eval() mode for "
    "single-sample inference; for genuinely tiny batches use GroupNorm or LayerNorm."
)


def _check_enough_values(x: Tensor) -> None:
    """torch's ``_verify_batch_size`` with bnlab's advice, for the paths that do not go through ``F.batch_norm``."""
    values_per_channel = x.size(0)
    for d in x.shape[2:]:
        values_per_channel *= d
    if values_per_channel == 1:
        # Same opening words as torch, so code that matches torch's message still does.
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}." + _ONE_VALUE_ADVICE
        )


def _check_eps(eps: float, training: bool) -> None:
    """torch's check in ``F.batch_norm``, for the kernels that do not go through it."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    running_var_correction: int = 1,
    skip_nonfinite_update: bool = False,
    kernel: Optional[str] = None,
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

    With the defaults (``running_var_correction=1``, no guard, no registered
    kernel) this *is* ``torch.nn.functional.batch_norm``: the same call, the
    same checks, and what ``__torch_function__`` overrides and modes see.
    The other arguments are also TorchScript-compatible (keyword arguments
    are accepted, not required), so modules built on it script; compiled by
    TorchScript it always takes the native kernel (registered kernels are Python).

    Args:
        input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``;
            any memory layout; float16/bfloat16 inputs are reduced in float32.
        running_mean, running_var: ``(C,)`` buffers, or None to keep no
            statistics (then ``training`` must be True).
        weight, bias: ``(C,)`` affine parameters :math:`\gamma, \beta`, or None.
        momentum: weight of the new batch in the moving averages (PyTorch
            direction; Keras' ``momentum=0.99`` is ``0.01`` here).
        eps: added to the variance before the square root; as in torch it must
            be positive in training and non-negative in inference.
        running_var_correction: 1 stores the unbiased variance (PyTorch), 0
            the biased one (Keras, Flax, ONNX).
        skip_nonfinite_update: leave the running buffers untouched when the
            update would make any of them NaN or Inf (one overflowing fp16
            batch otherwise poisons them for good). Costs one buffer copy.
        kernel: force a kernel by name (see :func:`~bnlab.functional.kernel_names`); default picks
            the first registered kernel that accepts the input.

    Raises:
        ValueError: in training, when there is only one value per channel, or
            eps is not positive; an input with fewer than 2 dims; inference
            without running statistics.
    """
    if torch.jit.is_scripting():
        return _guarded_native_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                          running_var_correction, skip_nonfinite_update)
    return _eager_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                             running_var_correction, skip_nonfinite_update, kernel)


@torch.jit.unused
def _eager_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    running_var_correction: int,
    skip_nonfinite_update: bool,
    kernel: Optional[str],
) -> Tensor:
    """``batch_norm`` outside TorchScript: the kernel registry, and advice in the error messages."""
    # No checks up front: torch's own (in F.batch_norm) run first and modes see exactly
    # torch's calls; errors are explained after the fact, which costs nothing when none occur.
    try:
        if kernel is None and native_is_first_choice():  # the hot path: F.batch_norm, or the compiled kernel
            if training and not skip_nonfinite_update and compiled_serves(input, weight, bias, running_mean,
                                                                          running_var):
                _check_eps(eps, True)
                return compiled_train(input, running_mean, running_var, weight, bias, momentum, eps,
                                      running_var_correction)
            if not skip_nonfinite_update:
                return native_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                         running_var_correction)
            return _guarded_native_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                                              eps, running_var_correction, skip_nonfinite_update)
        if input.dim() >= 2 and training:
            _check_enough_values(input)
        _check_eps(eps, training)
        chosen = select_kernel(input, running_var_correction, kernel)
        if not (skip_nonfinite_update and training and input.numel() > 0):
            return chosen.fn(input, running_mean, running_var, weight, bias, training, momentum, eps,
                             running_var_correction)
        with _keep_if_finite(running_mean, running_var, True) as (target_mean, target_var):
            return chosen.fn(input, target_mean, target_var, weight, bias, training, momentum, eps,
                             running_var_correction)
    except (RuntimeError, ValueError, IndexError) as error:
        if input.dim() < 2:
            raise ValueError(
                f"batch_norm expects an input of shape (N, C, *), got shape {tuple(input.shape)}") from error
        if not training and (running_mean is None or running_var is None):
            raise ValueError(
                "batch_norm with training=False normalizes with the running statistics, "
                "so running_mean and running_var must be given") from error
        if isinstance(error, ValueError) and str(error).startswith("Expected more than 1 value per channel") \
                and _ONE_VALUE_ADVICE not in str(error):
            raise ValueError(str(error) + _ONE_VALUE_ADVICE) from error
        raise


def _guarded_native_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    correction: int,
    skip_nonfinite_update: bool,
) -> Tensor:
    """The native kernel with the optional non-finite guard, written so that TorchScript compiles it.

    The guard updates copies of the buffers and keeps them only if every value is finite: a
    branch-free select, so no host sync and no data-dependent control flow for torch.compile.
    """
    if not (skip_nonfinite_update and training and input.numel() > 0):
        return native_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, correction)
    new_mean = None if running_mean is None else running_mean.clone()
    new_var = None if running_var is None else running_var.clone()
    y = native_batch_norm(input, new_mean, new_var, weight, bias, training, momentum, eps, correction)
    _commit_if_finite(running_mean, new_mean, running_var, new_var)
    return y


def _commit_if_finite(running_mean: Optional[Tensor], new_mean: Optional[Tensor],
                      running_var: Optional[Tensor], new_var: Optional[Tensor]) -> None:
    """Copy the updated buffers back into the running ones, unless any updated value is non-finite."""
    with torch.no_grad():
        finite: Optional[Tensor] = None
        for new in [new_mean, new_var]:
            if new is not None:
                ok = torch.isfinite(new).all()
                finite = ok if finite is None else finite & ok
        if finite is not None:
            if running_mean is not None and new_mean is not None:
                running_mean.copy_(torch.where(finite, new_mean, running_mean))
            if running_var is not None and new_var is not None:
                running_var.copy_(torch.where(finite, new_var, running_var))


@contextlib.contextmanager
def _keep_if_finite(running_mean: Tensor | None, running_var: Tensor | None, enabled: bool):
    """Yield the buffers an update should write to; with ``enabled``, copies that are kept only if
    every updated value is finite (:func:`_commit_if_finite`)."""
    if not enabled or (running_mean is None and running_var is None):
        yield running_mean, running_var
        return
    new_mean = None if running_mean is None else running_mean.clone()
    new_var = None if running_var is None else running_var.clone()
    yield new_mean, new_var
    _commit_if_finite(running_mean, new_mean, running_var, new_var)


def layer_norm(
    input: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    kernel: Optional[str] = None,
) -> Tensor:
    r"""Layer normalization over the last ``len(normalized_shape)`` dims of each sample.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics (biased variance) are per sample, the same in training and
    inference; ``weight``/``bias`` have shape ``normalized_shape``. By default
    this is ``torch.nn.functional.layer_norm`` (its checks, and the call
    ``__torch_function__`` sees); ``kernel="composite"`` uses
    :func:`compute_stats` and :func:`normalize` instead (same result; the oracle).
    """
    if kernel is None or torch.jit.is_scripting():  # the common case: nothing between the caller and torch
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    return _layer_norm_by_name(input, normalized_shape, weight, bias, eps, kernel)


@torch.jit.unused
def _layer_norm_by_name(input: Tensor, normalized_shape: List[int], weight: Optional[Tensor],
                        bias: Optional[Tensor], eps: float, kernel: str) -> Tensor:
    _check_kernel_name(kernel)
    if kernel == "composite":
        dims = tuple(range(-len(normalized_shape), 0))
        mean, var = compute_stats(input, dims, keepdim=True)
        return normalize(input, mean, var, weight, bias, eps)
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    kernel: Optional[str] = None,
) -> Tensor:
    r"""Group normalization: statistics per sample over each group of ``C / num_groups`` channels
    (and all spatial positions); per-channel affine. ``num_groups=1`` is layer norm over
    (C, \*), ``num_groups=C`` is instance norm. Same in training and inference.

    By default this is ``torch.nn.functional.group_norm``, with its checks: a ``RuntimeError``
    for fewer than 2 dims, a ``ValueError`` for one value per group (whose variance would be 0
    and the output all zeros). ``kernel="composite"`` uses the core building blocks.
    """
    if kernel is None or torch.jit.is_scripting():  # F.group_norm and ATen check the shapes themselves
        return F.group_norm(input, num_groups, weight, bias, eps)
    return _group_norm_by_name(input, num_groups, weight, bias, eps, kernel)


@torch.jit.unused
def _group_norm_by_name(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float, kernel: str) -> Tensor:
    _check_kernel_name(kernel)
    if kernel != "composite":
        return F.group_norm(input, num_groups, weight, bias, eps)
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    n, c = input.shape[:2]
    if c % num_groups:
        raise ValueError(f"num_channels ({c}) must be divisible by num_groups ({num_groups})")
    grouped = input.reshape(n, num_groups, -1)
    if grouped.size(2) == 1:
        raise ValueError(f"Expected more than 1 value per group, got input size {tuple(input.shape)}")
    mean, var = compute_stats(grouped, [2], keepdim=True)
    y = normalize(grouped, mean, var, eps=eps).reshape(input.shape)
    if weight is not None:
        y = y * channel_view(weight, input.dim())
    if bias is not None:
        y = y + channel_view(bias, input.dim())
    return y


def instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    kernel: Optional[str] = None,
) -> Tensor:
    r"""Instance normalization: statistics per (sample, channel) over the spatial dims.

    It is batch norm applied to an ``(1, N*C, *)`` view: each instance-channel
    is its own "channel". With running buffers, they move towards the mean over
    instances of the per-instance statistics (unbiased variance), as in torch.

    By default this is ``torch.nn.functional.instance_norm``, with its check: with
    ``use_input_stats``, one spatial element raises ``ValueError`` (its variance
    is 0, and the unbiased running variance would become NaN).
    ``kernel="composite"`` uses the core building blocks.
    """
    if kernel is None or torch.jit.is_scripting():
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return _instance_norm_by_name(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                                  kernel)


@torch.jit.unused
def _instance_norm_by_name(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                           weight: Optional[Tensor], bias: Optional[Tensor], use_input_stats: bool, momentum: float,
                           eps: float, kernel: str) -> Tensor:
    _check_kernel_name(kernel)
    if kernel != "composite":
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if input.dim() < 3:
        raise ValueError(f"instance_norm needs spatial dims (N, C, L...), got shape {tuple(input.shape)}")
    if use_input_stats and input[0, 0].numel() == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.size()}")
    n, c = input.shape[:2]
    tracked = running_mean is not None and use_input_stats
    temp_mean = running_mean.repeat(n) if tracked else None
    temp_var = running_var.repeat(n) if tracked else None
    flat = input.reshape(1, n * c, *input.shape[2:])
    if use_input_stats:
        y = batch_norm(flat, temp_mean, temp_var, None, None, True, momentum, eps, kernel="composite")
    else:
        y = batch_norm(flat, running_mean.repeat(n), running_var.repeat(n), None, None, False, momentum, eps,
                       kernel="composite")
    if tracked:
        with torch.no_grad():
            running_mean.copy_(temp_mean.view(n, c).mean(0))
            running_var.copy_(temp_var.view(n, c).mean(0))
    y = y.reshape(input.shape)
    if weight is not None:
        y = y * channel_view(weight, input.dim())
    if bias is not None:
        y = y + channel_view(bias, input.dim())
    return y


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    running_var_correction: int = 1,
    skip_nonfinite_update: bool = False,
) -> Tensor:
    r"""Batch renormalization (Ioffe 2017).

    **During training**, with batch statistics :math:`\mu_B, \sigma_B =
    \sqrt{\mathrm{Var}_B + \epsilon}` and running ones :math:`\mu, \sigma =
    \sqrt{\text{running\_var} + \epsilon}` (their values before this step):

    .. math::
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}(\sigma_B / \sigma), \quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}((\mu_B - \mu) / \sigma), \quad
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta

    with no gradient through ``r`` and ``d``; the running statistics are
    updated exactly as in :func:`batch_norm`. **During inference** it is batch
    norm with the running statistics. With ``r_max=1, d_max=0`` it is batch norm.

    Implementation: batch norm with the affine folded to weight :math:`\gamma r`
    and bias :math:`\gamma d + \beta`, so it costs what batch norm costs (see
    ``_BatchRenormFunction``).
    """
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if r_max < 1 or d_max < 0:
        raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
    if input.numel() == 0:
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    _check_enough_values(input)
    compiled = _compiled_kernel_takes(input, weight, bias, running_mean, running_var)
    if not skip_nonfinite_update:  # the hot path, without the guard's context manager
        return _BatchRenormFunction.apply(input, weight, bias, running_mean, running_var, momentum, eps,
                                  r_max, d_max, running_var_correction, compiled)
    with _keep_if_finite(running_mean, running_var, True) as (target_mean, target_var):
        return _BatchRenormFunction.apply(input, weight, bias, target_mean, target_var, momentum, eps,
                                  r_max, d_max, running_var_correction, compiled)


def _renorm_factors_eager(x, weight, bias, running_mean, running_var, momentum, eps, r_max, d_max, correction):
    """Batch statistics, r, d and the folded affine, with the running statistics updated: the
    torch-ops twin of the compiled ``renorm_forward`` (``csrc/ghost_batch_norm.cpp``)."""
    old_mean, old_sigma = running_mean.clone(), torch.sqrt(running_var + eps)
    if torch.compiler.is_compiling():
        # ATen's batch_norm_update_stats updates the buffers without its schema saying so, so a compiled
        # graph may read them after the update (r and d then come out wrong): ops the compiler can see
        batch_var, batch_mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], correction=0)
        with torch.no_grad():
            update_running_stats(running_mean, running_var, batch_mean, batch_var, x.numel() // x.size(1),
                                 momentum=momentum, correction=correction)
    else:
        with corrected_running_var(x, running_var, True, correction) as rv:
            batch_mean, batch_var = torch.batch_norm_update_stats(x, running_mean, rv, momentum)
    batch_invstd = torch.rsqrt(batch_var + eps)
    r = (1.0 / (batch_invstd * old_sigma)).clamp(1.0 / r_max, r_max)
    d = ((batch_mean - old_mean) / old_sigma).clamp(-d_max, d_max)
    folded_weight = r if weight is None else weight * r
    folded_bias = d if weight is None else weight * d
    if bias is not None:
        folded_bias = folded_bias + bias
    return batch_mean, batch_var, batch_invstd, r, d, folded_weight, folded_bias


class _BatchRenormFunction(torch.autograd.Function):
    """Batch renorm at the cost of one batch norm.

    r and d are per-channel constants, so ``y = γ(x̂·r + d) + β`` is batch norm
    with weight ``γr`` and bias ``γd + β``, and so is its gradient with respect
    to x. With the compiled kernels, the forward is one call (statistics, r, d,
    the folded affine, the output and the running update) and the backward is
    the compiled batch-norm backward with weight ``γr``. Otherwise: ATen's
    ``batch_norm_update_stats`` (one read of x), about fifteen tiny eager ops for
    the per-channel step, ATen's inference kernel for ``x·a + b``, and ATen's
    batch-norm backward. Either way ``dγ = r·Σdy·x̂ + d·Σdy`` and ``dβ = Σdy``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, r_max, d_max, correction, compiled):
        if compiled:
            buf, layout, perm = _ghost_buffer(x, 1)
            unbias = bessel_factor(buf.numel() // layout[2], correction)
            y, batch_mean, batch_invstd, r, d, folded_weight = torch.ops.bnlab.renorm_forward(
                buf, weight, bias, running_mean, running_var, *layout[1:], eps, momentum, unbias, r_max, d_max)
            y = y.permute(_inverse(perm)) if perm else y.view(x.shape)
            ctx.save_for_backward(buf, folded_weight, batch_mean, batch_invstd, r, d)
            ctx.layout, ctx.perm = layout, perm
        else:
            batch_mean, batch_var, batch_invstd, r, d, folded_weight, folded_bias = _renorm_factors_eager(
                x, weight, bias, running_mean, running_var, momentum, eps, r_max, d_max, correction)
            y = torch.native_batch_norm(x, folded_weight, folded_bias, batch_mean, batch_var, False, 0.0, eps)[0]
            ctx.save_for_backward(x, folded_weight, batch_mean, batch_invstd, r, d)
        ctx.eps, ctx.has_weight, ctx.has_bias, ctx.compiled = eps, weight is not None, bias is not None, compiled
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, folded_weight, batch_mean, batch_invstd, r, d = ctx.saved_tensors
        need_w = ctx.has_weight and ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.compiled:  # x is the kernel's buffer here
            if torch.is_grad_enabled():
                raise RuntimeError(
                    "batch_renorm's compiled backward is not differentiable (create_graph=True); "
                    "set BNLAB_COMPILED_KERNELS=0 for double backward through the torch-ops path")
            grad_x, sum_dy, grad_xhat_sum = _compiled_backward(
                grad_out, x, ctx.layout, ctx.perm, folded_weight, batch_mean.view(1, -1), batch_invstd.view(1, -1),
                ctx.needs_input_grad[0])
        else:
            grad_x, grad_xhat_sum, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, folded_weight, None, None, batch_mean, batch_invstd, True, ctx.eps,
                [ctx.needs_input_grad[0], need_w, need_w or need_b])
        grad_w = torch.addcmul(d * sum_dy, r, grad_xhat_sum) if need_w else None
        grad_b = sum_dy if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


def ghost_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    virtual_batch_size: int,
    update: str = "per_ghost",
    running_var_correction: int = 1,
    skip_nonfinite_update: bool = False,
) -> Tensor:
    r"""Ghost batch norm (Hoffer et al. 2017): each run of ``virtual_batch_size`` samples is normalized
    with its own statistics.

    **During training**, a batch of N = G·v samples is split into G ghost
    batches of v consecutive samples, each normalized as a batch of its own.
    The running statistics are updated

    * ``update="per_ghost"``: once per ghost batch, in order, exactly as
      calling batch norm on each ``torch.chunk`` of the batch;
    * ``update="averaged"``: once per step with the average of the G
      per-ghost updates, i.e. with the average ghost mean and variance
      (tf.keras 2 ``virtual_batch_size``).

    A batch of at most v samples is one ghost batch (plain batch norm); a
    larger batch must be a multiple of v. **During inference** it is batch norm
    with the running statistics.
    """
    if update not in ("per_ghost", "averaged"):
        raise ValueError(f"update must be 'per_ghost' or 'averaged', got {update!r}")
    if virtual_batch_size < 2:
        raise ValueError(f"virtual_batch_size must be at least 2, got {virtual_batch_size}")
    n = input.size(0)
    options = dict(running_var_correction=running_var_correction, skip_nonfinite_update=skip_nonfinite_update)
    if not training or n <= virtual_batch_size:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, **options)
    if n % virtual_batch_size:
        raise ValueError(
            f"ghost batch norm got a batch of {n}, which is not a multiple of virtual_batch_size="
            f"{virtual_batch_size}. Use a batch size that is a multiple of it (and drop_last=True in the "
            "DataLoader so the last batch is too), or a virtual_batch_size that divides the batch size."
        )
    tracked = running_mean is not None and running_var is not None
    fast = (
        input.dtype in (torch.float32, torch.float64)
        and all(t is None or t.dtype == input.dtype for t in (weight, bias, running_mean, running_var))
        and not skip_nonfinite_update
    )
    if fast and _compiled_kernel_takes(input, weight, bias, running_mean, running_var):
        return _CompiledGhostBatchNormFunction.apply(input, weight, bias, running_mean, running_var, momentum, eps,
                                             virtual_batch_size, update, running_var_correction)
    if fast and not torch.compiler.is_compiling():  # its out= writes into slices do not trace: per chunk below
        return _GhostBatchNormFunction.apply(input, weight, bias, running_mean, running_var, momentum, eps,
                                     virtual_batch_size, update, running_var_correction)
    # General path (half precision, the non-finite guard): batch norm per chunk, then concatenate.
    # Chunks along dim 0 are views, contiguous in NCHW and in channels_last alike: no copies in.
    chunks = input.split(virtual_batch_size)
    if update == "per_ghost" or not tracked:
        outputs = [batch_norm(chunk, running_mean, running_var, weight, bias, True, momentum, eps, **options)
                   for chunk in chunks]
    else:
        # every ghost updates its own copy from the same start; their average is the averaged update
        copies = [(running_mean.clone(), running_var.clone()) for _ in chunks]
        outputs = [batch_norm(chunk, m, v, weight, bias, True, momentum, eps, **options)
                   for chunk, (m, v) in zip(chunks, copies)]
        with torch.no_grad():
            running_mean.copy_(torch.stack([m for m, _ in copies]).mean(0))
            running_var.copy_(torch.stack([v for _, v in copies]).mean(0))
    return torch.cat(outputs)


def _compiled_kernel_takes(x: Tensor, *params: Tensor | None) -> bool:
    """Whether the compiled kernel (``csrc/ghost_batch_norm.cpp``) serves this call: a float32/float64
    CPU input, parameters and buffers of its dtype and contiguous (the buffers are updated in place),
    and not while torch.compile traces (the ops have no fake-tensor implementation; the ATen path
    traces). Otherwise the caller takes its ATen path, with the same results."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.numel() > 0
            and all(p is None or (p.dtype == x.dtype and p.is_contiguous()) for p in params)
            and not torch.compiler.is_compiling()
            and load_kernels())


def _ghost_buffer(x: Tensor, ghosts: int) -> tuple[Tensor, tuple[int, int, int, int], tuple[int, ...] | None]:
    """The contiguous buffer the compiled ghost kernel reads, its layout arguments
    ``(ghosts, per_ghost, channels, spatial)``, and the permutation that made it (None if none).

    Channels-last inputs become the "rows" layout ``[G][v·spatial][C]`` through a permuted view (no
    copy); everything else the "planes" layout ``[G][v][C][spatial]``; (N, C) inputs are rows with
    one value per sample."""
    n, c = x.size(0), x.size(1)
    if x.dim() > 2 and memory_layout(x) == "channels_last":
        perm = (0, *range(2, x.dim()), 1)
        buf = x.permute(perm)
        return buf, (ghosts, buf.numel() // (ghosts * c), c, 0), perm
    x = x.contiguous()
    if x.dim() == 2:
        return x, (ghosts, n // ghosts, c, 0), None
    return x, (ghosts, n // ghosts, c, x[0, 0].numel()), None


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(perm)), key=perm.__getitem__))


def _compiled_backward(grad_out, buf, layout, perm, weight, means, invstds, need_dx):
    """The compiled kernel's batch-norm backward over ``buf`` (from :func:`_ghost_buffer`):
    ``dx`` in the input's layout (or None), and per channel ``Σdy`` and ``Σdy·x̂`` over all ghosts."""
    grad_buf = grad_out.permute(perm).contiguous() if perm else grad_out.contiguous().view(buf.shape)
    dx, sum_dy, sum_dy_xhat = torch.ops.bnlab.ghost_backward(grad_buf, buf, weight, means, invstds, *layout, need_dx)
    if not need_dx:
        return None, sum_dy, sum_dy_xhat
    return (dx.permute(_inverse(perm)) if perm else dx.view(grad_out.shape)), sum_dy, sum_dy_xhat


class _CompiledGhostBatchNormFunction(torch.autograd.Function):
    """Ghost batch norm in one compiled kernel call each way (``csrc/ghost_batch_norm.cpp``).

    The kernel also updates the running statistics, in the order chunked batch norm would
    (per_ghost) or once with the ghosts' average (averaged), and returns the per-ghost mean,
    biased variance and 1/σ for the backward pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, v, update, correction):
        ghosts = x.size(0) // v
        buf, layout, perm = _ghost_buffer(x, ghosts)
        unbias = bessel_factor(buf.numel() // (ghosts * layout[2]), correction)
        y, means, variances, invstds = torch.ops.bnlab.ghost_forward(
            buf, weight, bias, running_mean, running_var, *layout, eps, momentum, update == "averaged", unbias)
        ctx.save_for_backward(buf, weight, means, invstds)
        ctx.layout, ctx.perm = layout, perm
        return y.permute(_inverse(perm)) if perm else y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        buf, weight, means, invstds = ctx.saved_tensors
        dx, sum_dy, sum_dy_xhat = _compiled_backward(grad_out, buf, ctx.layout, ctx.perm, weight, means, invstds,
                                                     ctx.needs_input_grad[0])
        grad_w = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy if ctx.needs_input_grad[2] else None
        return dx, grad_w, grad_b, None, None, None, None, None, None, None


class _GhostBatchNormFunction(torch.autograd.Function):
    """Ghost batch norm as one autograd node: ATen's batch norm runs on each ghost batch and writes
    straight into its slice of the output (and, backward, of the input gradient), so there is no
    concatenation copy in either direction. Same arithmetic as the per-chunk path it replaces.
    The fallback when the compiled kernel cannot serve a call."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, v, update, correction):
        ghosts, c = x.size(0) // v, x.size(1)
        layout = torch.contiguous_format
        if memory_layout(x) == "channels_last":
            layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=layout)
        out = torch.empty_like(x, memory_format=layout)
        means = x.new_empty(ghosts, c)
        invstds = x.new_empty(ghosts, c)
        if running_mean is None:
            targets = [(None, None)] * ghosts
        elif update == "averaged":
            # every ghost updates its own copy from the same start; their average is the averaged update
            targets = list(zip(running_mean.expand(ghosts, c).clone(), running_var.expand(ghosts, c).clone()))
        else:
            targets = [(running_mean, running_var)] * ghosts
        x_ghosts, out_ghosts = x.split(v), out.split(v)
        for g in range(ghosts):
            rm, rv = targets[g]
            with corrected_running_var(x_ghosts[g], rv, True, correction) as rv_native:
                torch.ops.aten.native_batch_norm.out(
                    x_ghosts[g], weight, bias, rm, rv_native, True, momentum, eps,
                    out=out_ghosts[g], save_mean=means[g], save_invstd=invstds[g])
        if running_mean is not None and update == "averaged":
            running_mean.copy_(torch.stack([m for m, _ in targets]).mean(0))
            running_var.copy_(torch.stack([r for _, r in targets]).mean(0))
        ctx.save_for_backward(x, weight, means, invstds)
        ctx.v, ctx.eps, ctx.layout = v, eps, layout
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, means, invstds = ctx.saved_tensors
        v, eps = ctx.v, ctx.eps
        grad_out = grad_out.contiguous(memory_format=ctx.layout)
        need_w = weight is not None and ctx.needs_input_grad[1]
        need_b = ctx.needs_input_grad[2]
        grad_x = torch.empty_like(x, memory_format=ctx.layout)
        # per-ghost dγ, dβ rows, summed once at the end; ATen computes both for the dx formula anyway
        grad_w_rows, grad_b_rows = torch.empty_like(means), torch.empty_like(means)
        x_ghosts, dy_ghosts, dx_ghosts = x.split(v), grad_out.split(v), grad_x.split(v)
        backward_out = torch.ops.aten.native_batch_norm_backward.out
        for g in range(means.size(0)):
            backward_out(dy_ghosts[g], x_ghosts[g], weight, None, None, means[g], invstds[g], True, eps,
                         [True, True, True], out0=dx_ghosts[g], out1=grad_w_rows[g], out2=grad_b_rows[g])
        grad_w = grad_w_rows.sum(0) if need_w else None
        grad_b = grad_b_rows.sum(0) if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _check_kernel_name(kernel: str | None) -> None:
    if kernel not in (None, "native", "composite"):
        raise ValueError(f"unknown kernel {kernel!r}; choose 'native' (default) or 'composite'")
