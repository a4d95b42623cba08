"""Batch-norm variants that keep batch norm's state and change how a training batch is normalized.

Both subclass bnlab's batch norm: same arguments, parameters, buffers and
state dict, the same inference path, and the same conventions. Only
``_normalize`` (the call into :mod:`bnlab.functional`) differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from bnlab import functional as BF
from bnlab.nn.batchnorm import CONVENTION_DEFAULT, _BatchNorm

__all__ = [
    "RenormSchedule",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
]


@dataclass(frozen=True)
class RenormSchedule:
    """The paper's warm-up: plain batch norm, then relax the clipping limits.

    ``r_max = 1`` and ``d_max = 0`` for the first ``start`` steps; then both
    rise linearly to ``r_final`` at step ``r_full`` and ``d_final`` at step
    ``d_full``. The defaults are Ioffe (2017): 5000 steps of BN, r_max 3 at
    40k and d_max 5 at 25k. The paper says "gradually relaxed" without the
    shape; linear is our choice. For short runs, scale the steps down.
    """

    start: int = 5000
    r_full: int = 40000
    d_full: int = 25000
    r_final: float = 3.0
    d_final: float = 5.0

    def limits(self, step: int) -> tuple[float, float]:
        """``(r_max, d_max)`` after ``step`` training steps."""

        def ramp(full: int) -> float:
            if step <= self.start:
                return 0.0
            return min(1.0, (step - self.start) / max(1, full - self.start))

        return 1.0 + (self.r_final - 1.0) * ramp(self.r_full), self.d_final * ramp(self.d_full)


_RENORM_DOC = r"""Batch renormalization (Ioffe 2017) over {input_desc}.

    **During training** the batch is normalized with its own statistics and
    then corrected towards the running ones:

    .. math::
        r = \mathrm{{clip}}_{{[1/r_{{max}}, r_{{max}}]}}\left(\frac{{\sigma_B}}{{\sigma}}\right),\quad
        d = \mathrm{{clip}}_{{[-d_{{max}}, d_{{max}}]}}\left(\frac{{\mu_B - \mu}}{{\sigma}}\right),\quad
        y = \gamma\left(\frac{{x - \mu_B}}{{\sigma_B}} r + d\right) + \beta

    where :math:`\sigma_B = \sqrt{{\mathrm{{Var}}_B + \epsilon}}`, :math:`\mu` is
    ``running_mean`` and :math:`\sigma = \sqrt{{\text{{running\_var}} + \epsilon}}`;
    no gradient flows through ``r`` and ``d``. Because the output no longer
    depends on the batch alone (only through the clipped corrections), small or
    non-i.i.d. batches hurt less than with batch norm. The running statistics
    are then updated exactly as by :class:`BatchNorm{n}d` in the same convention.
    With ``r_max=1, d_max=0`` this *is* batch norm.

    **During inference** it is batch norm with the running statistics.

    ``r_max`` and ``d_max`` are plain attributes, settable at any time. With
    ``schedule=RenormSchedule(...)`` they follow the paper's warm-up instead,
    driven by ``num_batches_tracked``.

    Versus Keras 3 (``BatchNormalization(renorm=True)``): Keras keeps, as the
    paper does, a moving *standard deviation* and derives
    ``moving_variance = relu(moving_stddev² − ε)`` from it, and computes r and d
    from a second pair of averages (``renorm_mean``/``renorm_stddev``, updated
    with ``renorm_momentum``). bnlab keeps one pair of running statistics,
    exactly batch norm's buffers (so a renorm checkpoint loads into a batch norm
    and back), and computes r and d from them. Given the same moving mean and
    variance, inference is identical (tested against Keras).

    Args:
        num_features, eps, momentum, affine, convention, skip_nonfinite_update, bias:
            as :class:`BatchNorm{n}d` (running statistics are required).
        r_max: clip for r, at least 1. Default: 3 (the paper's final value).
        d_max: clip for d, at least 0. Default: 5.
        schedule: a :class:`RenormSchedule` that sets r_max and d_max from the
            step count, or None for the fixed values.
    """


class _BatchRenorm(_BatchNorm):
    def __init__(self, num_features: int, eps=CONVENTION_DEFAULT, momentum=CONVENTION_DEFAULT, affine: bool = True,
                 *, r_max: float = 3.0, d_max: float = 5.0, schedule: RenormSchedule | None = None,
                 convention: str = "torch", skip_nonfinite_update: bool = False, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, True, convention=convention,
                         skip_nonfinite_update=skip_nonfinite_update, bias=bias, device=device, dtype=dtype)
        if r_max < 1 or d_max < 0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        self.r_max, self.d_max, self.schedule = r_max, d_max, schedule

    def current_limits(self) -> tuple[float, float]:
        if self.schedule is None:
            return self.r_max, self.d_max
        return self.schedule.limits(int(self.num_batches_tracked))

    def _normalize(self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   use_batch_stats: bool, new_batch_weight: float) -> Tensor:
        if not (use_batch_stats and self.training and running_mean is not None and running_var is not None):
            return self._batch_norm(input, running_mean, running_var, use_batch_stats, new_batch_weight)
        if torch.jit.is_scripting():
            raise RuntimeError("batch renorm trains only in Python; a TorchScript copy runs in eval() mode")
        return self._renorm(input, running_mean, running_var, new_batch_weight)

    @torch.jit.unused
    def _renorm(self, input: Tensor, running_mean: Tensor, running_var: Tensor, new_batch_weight: float) -> Tensor:
        r_max, d_max = self.current_limits()
        return BF.batch_renorm(
            input, running_mean, running_var, self.weight, self.bias, True, new_batch_weight, self.eps,
            r_max=r_max, d_max=d_max, running_var_correction=self._running_var_correction(),
            skip_nonfinite_update=self.skip_nonfinite_update,
        )

    def extra_repr(self) -> str:
        limits = f"schedule={self.schedule}" if self.schedule else f"r_max={self.r_max}, d_max={self.d_max}"
        return f"{super().extra_repr()}, {limits}"


class BatchRenorm1d(_BatchRenorm, torch.nn.BatchNorm1d):
    __doc__ = _RENORM_DOC.format(input_desc="(N, C) or (N, C, L) input", n=1)


class BatchRenorm2d(_BatchRenorm, torch.nn.BatchNorm2d):
    __doc__ = _RENORM_DOC.format(input_desc="(N, C, H, W) input", n=2)


class BatchRenorm3d(_BatchRenorm, torch.nn.BatchNorm3d):
    __doc__ = _RENORM_DOC.format(input_desc="(N, C, D, H, W) input", n=3)


_GHOST_DOC = r"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017) over {input_desc}.

    **During training** the batch is split into consecutive *ghost batches*
    of ``virtual_batch_size`` samples, and each is normalized with its own
    mean and (biased) variance, as if it were a separate small batch. Large
    batches then keep the regularizing noise of small-batch statistics. A batch
    of at most ``virtual_batch_size`` samples is a single ghost batch; a larger
    one must be a multiple of it (a clear ``ValueError`` says so otherwise).

    The running statistics are updated, in the layer's convention,

    * ``update="per_ghost"`` (default): once per ghost batch, in order, which is
      what calling batch norm on each ``torch.chunk`` of the batch does;
    * ``update="averaged"``: once per step with the average of the ghost
      statistics, as tf.keras 2's ``virtual_batch_size`` does.

    With ``skip_nonfinite_update``, each ghost batch is guarded on its own:
    a NaN/Inf ghost batch skips its update, the others still count.

    **During inference** it is batch norm with the running statistics (no ghosts).

    Args:
        num_features, eps, momentum, affine, convention, skip_nonfinite_update, bias:
            as :class:`BatchNorm{n}d`.
        virtual_batch_size: samples per ghost batch (Hoffer et al. used 128).
        update: ``"per_ghost"`` or ``"averaged"``.
    """


class _GhostBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, eps=CONVENTION_DEFAULT, momentum=CONVENTION_DEFAULT, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, virtual_batch_size: int = 32,
                 update: str = "per_ghost", convention: str = "torch", skip_nonfinite_update: bool = False,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         convention=convention, skip_nonfinite_update=skip_nonfinite_update, bias=bias)
        if virtual_batch_size < 2:
            raise ValueError(f"virtual_batch_size must be at least 2, got {virtual_batch_size}")
        if update not in ("per_ghost", "averaged"):
            raise ValueError(f"update must be 'per_ghost' or 'averaged', got {update!r}")
        self.virtual_batch_size, self.update = virtual_batch_size, update

    def _normalize(self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   use_batch_stats: bool, new_batch_weight: float) -> Tensor:
        if not use_batch_stats:
            return self._batch_norm(input, running_mean, running_var, use_batch_stats, new_batch_weight)
        if torch.jit.is_scripting():
            raise RuntimeError("ghost batch norm trains only in Python; a TorchScript copy runs in eval() mode")
        return self._ghost(input, running_mean, running_var, new_batch_weight)

    @torch.jit.unused
    def _ghost(self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               new_batch_weight: float) -> Tensor:
        return BF.ghost_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, True, new_batch_weight, self.eps,
            virtual_batch_size=self.virtual_batch_size, update=self.update,
            running_var_correction=self._running_var_correction(),
            skip_nonfinite_update=self.skip_nonfinite_update,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}, update={self.update!r}"


class GhostBatchNorm1d(_GhostBatchNorm, torch.nn.BatchNorm1d):
    __doc__ = _GHOST_DOC.format(input_desc="(N, C) or (N, C, L) input", n=1)


class GhostBatchNorm2d(_GhostBatchNorm, torch.nn.BatchNorm2d):
    __doc__ = _GHOST_DOC.format(input_desc="(N, C, H, W) input", n=2)
