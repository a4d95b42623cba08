"""Normalizations with per-sample statistics: LayerNorm, GroupNorm, InstanceNorm.

They subclass the ``torch.nn`` classes (same constructor, defaults, checks,
error messages, parameters and state dict) and route the computation through
:mod:`bnlab.functional`, which calls ``torch.nn.functional`` as torch's modules do.
None of them depends on the other samples of a batch, so they behave the same in
training and inference and work at batch size 1, which is why the seeds recommend
them for small batches and sequence models.
"""

from __future__ import annotations

from torch import Tensor, nn

from bnlab import functional as BF
from bnlab.nn._interop import TorchLeaf

__all__ = ["LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class LayerNorm(TorchLeaf, nn.LayerNorm):
    r"""Layer normalization (Ba et al. 2016) over the trailing ``normalized_shape`` dims.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Mean and biased variance are taken per sample over the last
    ``len(normalized_shape)`` dims; :math:`\gamma, \beta` have shape
    ``normalized_shape`` (``elementwise_affine``, ``bias``).

    **During training** and **during inference** alike: no running statistics.
    Use it for small batches, batch size 1, and sequence models.
    """

    def forward(self, input: Tensor) -> Tensor:
        return BF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(TorchLeaf, nn.GroupNorm):
    r"""Group normalization (Wu & He 2018): channels split into ``num_groups`` groups; mean and biased
    variance per sample over each group's channels and all spatial positions; per-channel
    :math:`\gamma, \beta`.

    ``GroupNorm(1, C)`` equals layer norm over (C, H, W) (with per-channel affine);
    ``GroupNorm(C, C)`` equals instance norm. Wu & He use 32 groups.

    **During training** and **during inference** alike: no running statistics,
    so accuracy does not depend on the batch size (their Table 2: GN's error
    stays at ~24% from 32 down to 2 images per GPU, while BN's rises to 34.7%).
    """

    def forward(self, input: Tensor) -> Tensor:
        return BF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class _InstanceNormMixin:
    def _apply_instance_norm(self, input: Tensor) -> Tensor:  # what torch's forward calls after its checks
        return BF.instance_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps,
        )


_INSTANCE_DOC = r"""Instance normalization (Ulyanov et al. 2016) over {input_desc}: mean and biased variance per
    (sample, channel) over the spatial dims.

    Defaults follow torch: ``affine=False`` and ``track_running_stats=False``,
    so by default it uses the instance's own statistics **during training and
    during inference** alike. With ``track_running_stats=True`` it keeps
    running averages (of the per-instance statistics, unbiased variance) and
    uses them in eval mode, like batch norm.
    """


class InstanceNorm1d(TorchLeaf, _InstanceNormMixin, nn.InstanceNorm1d):
    __doc__ = _INSTANCE_DOC.format(input_desc="(N, C, L) or (C, L) input")


class InstanceNorm2d(TorchLeaf, _InstanceNormMixin, nn.InstanceNorm2d):
    __doc__ = _INSTANCE_DOC.format(input_desc="(N, C, H, W) or (C, H, W) input")


class InstanceNorm3d(TorchLeaf, _InstanceNormMixin, nn.InstanceNorm3d):
    __doc__ = _INSTANCE_DOC.format(input_desc="(N, C, D, H, W) or (C, D, H, W) input")
