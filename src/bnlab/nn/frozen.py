"""Frozen batch norm: fixed statistics and affine, for fine-tuning and inference.

A frozen layer is a fixed per-channel affine map,

    y = x * scale + shift,   scale = weight / sqrt(running_var + eps),   shift = bias - running_mean * scale,

identical in ``train()`` and ``eval()``: nothing is learned and no statistic
moves, whatever mode the model is put in. That is the point: with a plain
batch norm, ``requires_grad=False`` freezes γ and β but not the running
statistics, and ``model.train()`` silently re-enables their updates (a
per-module ``.eval()`` does not survive it). :func:`freeze_batchnorm` swaps
every batch norm of a model for a frozen one, so neither trap applies.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab import functional as BF
from bnlab.nn._interop import TorchLeaf
from bnlab.nn._replace import replace_modules

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze_batchnorm", "unfreeze_batchnorm"]

FROZEN_CONVENTIONS = ("torch", "detectron2")


class _FrozenBatchNorm(TorchLeaf, nn.Module):
    """Batch norm with fixed statistics and affine (see the module docstring for the formula).

    Buffers (no parameters): ``weight``, ``bias``, ``running_mean``,
    ``running_var`` and ``num_batches_tracked``, the same state-dict keys as
    batch norm, so a batch-norm checkpoint loads directly (and back).

    ``convention`` sets only the initial ``running_var``: ``"torch"`` starts at
    1 (like a fresh BatchNorm, so a fresh layer scales by 1/sqrt(1 + eps));
    ``"detectron2"`` starts at ``1 - eps``, so a fresh layer is exactly the
    identity. Loaded statistics are used as they are in both. (Weights moved
    between the two with the *initial* values differ by sqrt(1 + eps/var).)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, convention: str = "torch", device=None, dtype=None):
        super().__init__()
        if convention not in FROZEN_CONVENTIONS:
            raise ValueError(f"convention must be one of {FROZEN_CONVENTIONS}, got {convention!r}")
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.convention = num_features, eps, convention
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        initial_var = 1.0 - eps if convention == "detectron2" else 1.0
        self.register_buffer("running_var", torch.full((num_features,), initial_var, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return BF.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # Checkpoints from torchvision/detectron2 frozen layers carry no counter (0 from the meta device).
        counter = self.num_batches_tracked
        state_dict.setdefault(prefix + "num_batches_tracked",
                              torch.tensor(0, dtype=torch.long) if counter.is_meta else counter.clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        return text + (f", convention={self.convention!r}" if self.convention != "torch" else "")


# The checks and messages of torch's BatchNorm1d/2d/3d (written out, as torch does, for TorchScript).
class FrozenBatchNorm1d(_FrozenBatchNorm):
    __doc__ = _FrozenBatchNorm.__doc__

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = _FrozenBatchNorm.__doc__

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = _FrozenBatchNorm.__doc__

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


def _frozen_class(bn: _BatchNorm) -> type[_FrozenBatchNorm]:
    if isinstance(bn, nn.BatchNorm1d):
        return FrozenBatchNorm1d
    if isinstance(bn, nn.BatchNorm3d):
        return FrozenBatchNorm3d
    return FrozenBatchNorm2d  # BatchNorm2d, and SyncBatchNorm (most often used on images)


@torch.no_grad()
def _frozen_from(bn: _BatchNorm) -> _FrozenBatchNorm:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot freeze {bn}: it keeps no running statistics (track_running_stats=False)")
    frozen = _frozen_class(bn)(bn.num_features, bn.eps, device=bn.running_mean.device)
    frozen.running_mean.copy_(bn.running_mean)
    frozen.running_var.copy_(bn.running_var)
    if bn.weight is not None:
        frozen.weight.copy_(bn.weight)
    if bn.bias is not None:
        frozen.bias.copy_(bn.bias)
    if bn.num_batches_tracked is not None:
        frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
    return frozen


@torch.no_grad()
def _batchnorm_from(frozen: _FrozenBatchNorm) -> nn.Module:
    from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

    cls = {FrozenBatchNorm1d: BatchNorm1d, FrozenBatchNorm2d: BatchNorm2d, FrozenBatchNorm3d: BatchNorm3d}[type(frozen)]
    bn = cls(frozen.num_features, eps=frozen.eps, device=frozen.running_mean.device)
    for name in ("weight", "bias"):
        getattr(bn, name).copy_(getattr(frozen, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        getattr(bn, name).copy_(getattr(frozen, name))
    return bn


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every batch norm in ``model`` (torch's or bnlab's, any dimension) by a frozen copy.

    Works in place on the children and returns the model (or, if ``model`` is
    itself a batch norm, its frozen replacement). Statistics and affine are
    copied; afterwards ``model.train()`` cannot make them move.

    Raises:
        ValueError: a batch norm without running statistics (nothing to freeze).
    """
    return replace_modules(model, lambda m: isinstance(m, _BatchNorm), _frozen_from)


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Turn frozen batch norms back into trainable :class:`bnlab.nn.BatchNorm1d/2d/3d` with the same state."""
    return replace_modules(model, lambda m: isinstance(m, _FrozenBatchNorm), _batchnorm_from)
