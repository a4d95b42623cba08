"""Synchronised batch norm on any device torch.distributed runs on, CPU (gloo) included.

With data parallelism each worker sees a slice of the batch; batch norm must normalize with the
statistics of the whole batch, or a model trained on W workers with per-worker batches of b behaves
as if its batch were b. ``torch.nn.SyncBatchNorm`` does this on GPUs only (it refuses CPU tensors).

**During training** in a process group of W > 1 workers, each worker computes, per channel, its
count :math:`n_i`, mean :math:`\\mu_i` and centred second moment :math:`M_i = \\sum (x - \\mu_i)^2`;
one all-gather shares them, and every worker merges them the same way (Chan et al.'s parallel
update, stable where :math:`\\sum x^2 - n\\mu^2` is not):

.. math::
    n = \\sum n_i, \\quad \\mu = \\frac{\\sum n_i \\mu_i}{n}, \\quad
    \\sigma^2 = \\frac{\\sum M_i + \\sum n_i (\\mu_i - \\mu)^2}{n}

So unequal slices count by their size, and a worker with an empty slice (:math:`n_i = 0`) takes part
without changing the result. Each worker normalizes its slice with :math:`\\mu, \\sigma^2` and updates
the running statistics with them (identically on every worker). The backward pass all-reduces
:math:`\\sum dy` and :math:`\\sum dy\\,(x - \\mu)`, the two sums the input gradient needs; the parameter
gradients are each worker's own (DistributedDataParallel then reduces them, as for any parameter).

**Otherwise** (eval mode, no process group, a group of one) it is ``bnlab.nn.BatchNorm``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from bnlab.functional.core import bessel_factor
from bnlab.nn._replace import copy_norm_state, factory_kwargs, replace_modules
from bnlab.nn.batchnorm import CONVENTION_DEFAULT, _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]


class SyncError(RuntimeError):
    """A collective of SyncBatchNorm failed: a worker died, or the workers ran different layers."""


def _group_size(group) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        raise SyncError(f"SyncBatchNorm: the {what} across workers failed; a worker of the process group died, "
                        f"timed out, or reached a different layer ({type(exc).__name__}: {str(exc)[:300]})") from exc


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, new_batch_weight, correction, group):
        import torch.distributed as dist

        c = x.size(1)
        dims = [0, *range(2, x.dim())]
        n_local = x.numel() // c if c else 0
        stats_dtype = torch.float64  # the merge in double: cheap (3C numbers per worker)
        if n_local > 0:
            # the local moments in the input's precision (float32 at least), as batch norm computes them
            local = x.detach() if x.dtype in (torch.float32, torch.float64) else x.detach().float()
            var, mean = torch.var_mean(local, dim=dims, correction=0)
            var, mean = var.to(stats_dtype), mean.to(stats_dtype)
            moments = var * n_local
        else:  # an empty slice: nothing to add, but the worker still takes part in the collective
            mean = torch.zeros(c, dtype=stats_dtype, device=x.device)
            moments = torch.zeros(c, dtype=stats_dtype, device=x.device)
        packed = torch.cat([torch.full((1,), float(n_local), dtype=stats_dtype, device=x.device), mean, moments])
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        _collective("all-gather of the batch statistics", dist.all_gather, gathered, packed, group=group)
        table = torch.stack(gathered)  # (W, 1 + 2C)
        counts, means, m2 = table[:, :1], table[:, 1 : 1 + c], table[:, 1 + c :]
        n = float(counts.sum())
        if n < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} over all workers")
        global_mean = (counts * means).sum(0) / n
        global_var = (m2.sum(0) + (counts * (means - global_mean) ** 2).sum(0)) / n
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - new_batch_weight).add_(global_mean.to(running_mean.dtype), alpha=new_batch_weight)
                running_var.mul_(1 - new_batch_weight).add_(
                    (global_var * bessel_factor(int(n), correction)).to(running_var.dtype), alpha=new_batch_weight)
        invstd = torch.rsqrt(global_var + eps).to(x.dtype)
        mean_x = global_mean.to(x.dtype)
        shape = (1, c) + (1,) * (x.dim() - 2)
        scale = invstd if weight is None else invstd * weight
        shift = -mean_x * scale if bias is None else bias - mean_x * scale
        y = x * scale.view(shape) + shift.view(shape)
        ctx.save_for_backward(x, weight, mean_x, invstd)
        ctx.group, ctx.n, ctx.has_bias = group, n, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        import torch.distributed as dist

        x, weight, mean, invstd = ctx.saved_tensors
        c = x.size(1)
        dims = [0, *range(2, x.dim())]
        shape = (1, c) + (1,) * (x.dim() - 2)
        centered = x - mean.view(shape)
        local = torch.cat([grad_out.sum(dims), (grad_out * centered).sum(dims)]) if x.numel() else \
            torch.zeros(2 * c, dtype=x.dtype, device=x.device)
        local_sum_dy, local_sum_dy_xmu = local[:c].clone(), local[c:].clone()
        _collective("all-reduce of the gradient sums", dist.all_reduce, local, group=ctx.group)
        sum_dy, sum_dy_xmu = local[:c], local[c:]
        k = invstd if weight is None else invstd * weight
        grad_x = None
        if ctx.needs_input_grad[0]:
            proj = (sum_dy_xmu / ctx.n * invstd * invstd).view(shape)
            grad_x = (grad_out - (sum_dy / ctx.n).view(shape) - centered * proj) * k.view(shape)
        grad_w = local_sum_dy_xmu * invstd if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = local_sum_dy if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of the whole batch across a process group (see the
    module docstring for the merge), on CPU (gloo) as on GPU; ``bnlab.nn.BatchNorm`` otherwise.

    Args:
        num_features, eps, momentum, affine, track_running_stats, convention, bias: as ``bnlab.nn.BatchNorm2d``.
        process_group: the group whose workers share statistics (default: the whole world).

    Collectives time out as the process group was told (``init_process_group(timeout=...)``); a failed or
    timed-out collective (a worker died) raises ``SyncError``, a ``RuntimeError`` that says what happened.

    Shape: ``(N, C, *)`` with ``N`` the worker's slice, which may be 0.
    """

    def __init__(self, num_features: int, eps=CONVENTION_DEFAULT, momentum=CONVENTION_DEFAULT, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device=None, dtype=None, *,
                 convention: str = "torch", bias: bool = True, **kwargs) -> None:
        # momentum=None is a cumulative average, as in every bnlab batch norm; omitted: the convention's default
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         convention=convention, bias=bias, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *), got {input.dim()}D input")

    def _batch_norm(self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    use_batch_stats: bool, new_batch_weight: float) -> Tensor:
        if not (use_batch_stats and self.training and _group_size(self.process_group) > 1):
            return super()._batch_norm(input, running_mean, running_var, use_batch_stats, new_batch_weight)
        if self.skip_nonfinite_update:
            raise ValueError("SyncBatchNorm does not support skip_nonfinite_update")
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                            new_batch_weight, self._running_var_correction(), self.process_group)


class _BatchNormXd(_BatchNorm):
    """What :func:`revert_sync_batchnorm` gives back when the layer's original dimensionality is unknown:
    a bnlab batch norm that accepts any ``(N, C, *)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *), got {input.dim()}D input")


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Every plain batch norm of ``module`` (``torch.nn.BatchNormNd`` and ``bnlab.nn.BatchNormNd``, either
    convention) replaced by a :class:`SyncBatchNorm` with the same state, in place (returns the module)."""
    from bnlab.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNorm1d, BatchNorm2d, BatchNorm3d)

    def sync_of(m):
        sync = SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, process_group,
                             convention=getattr(m, "convention", "torch"), bias=m.bias is not None or not m.affine,
                             **factory_kwargs(m))
        sync._bnlab_original = type(m).__name__[-2:]  # "1d", "2d", "3d": what revert gives back
        return copy_norm_state(m, sync)

    return replace_modules(module, lambda m: type(m) in plain, sync_of)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every :class:`SyncBatchNorm` back to a ``bnlab.nn.BatchNormNd`` with the same state (single-process
    inference or export), in place (returns the module)."""
    from bnlab.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

    classes = {"1d": BatchNorm1d, "2d": BatchNorm2d, "3d": BatchNorm3d}

    def plain_of(m):
        cls = classes.get(getattr(m, "_bnlab_original", ""), _BatchNormXd)
        plain = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, convention=m.convention,
                    bias=m.bias is not None or not m.affine, **factory_kwargs(m))
        return copy_norm_state(m, plain)

    return replace_modules(module, lambda m: isinstance(m, SyncBatchNorm), plain_of)
