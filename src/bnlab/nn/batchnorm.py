"""Drop-in ``torch.nn.BatchNorm1d/2d/3d`` with a choice of framework convention.

The modules subclass torch's own ``BatchNormNd`` so that everything written
for torch's batch norm (state dicts, ``isinstance`` checks, fusion utilities,
``convert_sync_batchnorm``, ``torch.func.replace_all_batch_norm_modules_``)
keeps working. ``__init__`` adds the convention; ``forward`` is torch's, step for
step, with the convention's momentum, and dispatches to
:func:`bnlab.functional.batch_norm`, which for torch's semantics is
``torch.nn.functional.batch_norm`` itself. So TorchScript, FX, ``torch.export``,
``torch.compile``, ONNX export, quantization and ``__torch_function__`` modes see
what they see for ``torch.nn`` (tests/test_torch_*.py); :mod:`bnlab.nn._interop`
covers the tools that decide by type or module name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from bnlab import functional as BF
from bnlab.nn._interop import TorchLeaf, load_is_strict

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "CONVENTIONS"]


@dataclass(frozen=True)
class Convention:
    """How a framework defines batch norm's hyper-parameters and running variance.

    Attributes:
        eps: default epsilon.
        momentum: default momentum, in this convention's own direction.
        momentum_weights_new_batch: True when ``momentum`` is the weight of the
            new batch (PyTorch), False when it is the weight of the old average
            (Keras, TF, Flax).
        running_var_correction: 1 stores the unbiased batch variance in the
            moving variance (PyTorch), 0 the biased one (Keras).
    """

    eps: float
    momentum: float
    momentum_weights_new_batch: bool
    running_var_correction: int


CONVENTIONS: dict[str, Convention] = {
    "torch": Convention(eps=1e-5, momentum=0.1, momentum_weights_new_batch=True, running_var_correction=1),
    "keras": Convention(eps=1e-3, momentum=0.99, momentum_weights_new_batch=False, running_var_correction=0),
}


class _ConventionDefault:
    """Marks an argument left to the convention's default (so an explicit 1e-5 is honoured)."""

    def __repr__(self) -> str:
        return "<convention default>"


CONVENTION_DEFAULT = _ConventionDefault()

_DOC = r"""Batch normalization over a {input_desc}, as in Ioffe & Szegedy (2015).

    .. math::
        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \gamma + \beta

    Statistics are per channel (dim 1), over the batch{spatial}. :math:`\gamma`
    (``weight``) starts at 1 and :math:`\beta` (``bias``) at 0.

    **During training** (``module.train()``), :math:`\mathrm{{E}}[x]` and
    :math:`\mathrm{{Var}}[x]` are the mean and the *biased* variance (divide by
    n, the number of values per channel) of the current batch, and each call
    updates the running statistics. With ``convention="torch"`` (default)::

        running_mean = (1 - momentum) * running_mean + momentum * batch_mean
        running_var  = (1 - momentum) * running_var  + momentum * batch_var * n / (n - 1)

    i.e. ``momentum`` (default 0.1) is the weight of the *new* batch and the
    stored variance is the *unbiased* estimate. ``momentum=None`` replaces the
    exponential average by the cumulative average of all batches seen
    (factor ``1 / num_batches_tracked``). With ``convention="keras"``::

        running_mean = momentum * running_mean + (1 - momentum) * batch_mean
        running_var  = momentum * running_var  + (1 - momentum) * batch_var

    i.e. ``momentum`` (default 0.99) is the weight of the *old* average, the
    stored variance is *biased*, and ``eps`` defaults to 1e-3, exactly as
    ``keras.layers.BatchNormalization``. Buffer and parameter names stay
    torch's in both conventions.

    ``num_batches_tracked`` counts training-mode calls, as in torch: it also
    counts an empty batch (which leaves the running statistics untouched) and
    a batch skipped by ``skip_nonfinite_update``, so state dicts match
    torch's call for call. Under ``momentum=None`` such a batch still counts
    in the ``1 / num_batches_tracked`` factor of later batches.

    **During inference** (``module.eval()``), the running statistics are used
    in place of the batch statistics and nothing is updated, so the output of
    one sample no longer depends on the rest of the batch. With
    ``track_running_stats=False`` there are no running statistics and batch
    statistics are used in both modes.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for numerical stability. Default: 1e-5
            (torch) or 1e-3 (keras).
        momentum: see above; ``None`` for a cumulative average. Default: 0.1
            (torch) or 0.99 (keras).
        affine: learn :math:`\gamma` and :math:`\beta`. Default: True.
        track_running_stats: keep running statistics for inference. Default: True.
        convention: ``"torch"`` or ``"keras"``, see above.
        bias: with ``affine``, also learn :math:`\beta` (False: scale only,
            like Keras' ``center=False``). Default: True.
        skip_nonfinite_update: when True, a batch whose statistics are NaN or
            Inf (an fp16 overflow, a corrupt sample) leaves the running
            statistics as they were instead of poisoning them for good.

    Shape:
        - Input: {shapes}
        - Output: same shape (and memory format) as the input.

    Raises:
        ValueError: as torch: the wrong number of input dims; in training mode
            only one value per channel (e.g. a final batch of size 1: use
            ``drop_last=True``) or ``eps <= 0``; in eval mode ``eps < 0``.

    Note:
        ``momentum`` is stored in the layer's own convention. Tools that write
        torch-style momentum into batch-norm layers (fvcore's precise-BN sets
        it to 1.0; ``convert_sync_batchnorm`` copies it) assume
        ``convention="torch"``.

    Example::

        >>> bn = bnlab.nn.BatchNorm{n}d(16)
        >>> y = bn(torch.randn({example}))
    """


class _BatchNorm(TorchLeaf, _TorchBatchNorm):
    # constants for TorchScript, which then compiles only the convention's branch
    __constants__ = [*_TorchBatchNorm.__constants__, "convention", "skip_nonfinite_update"]

    def __init__(
        self,
        num_features: int,
        eps: float | _ConventionDefault = CONVENTION_DEFAULT,
        momentum: float | None | _ConventionDefault = CONVENTION_DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        convention: str = "torch",
        skip_nonfinite_update: bool = False,
        bias: bool = True,
    ) -> None:
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
        rules = CONVENTIONS[convention]
        eps = rules.eps if eps is CONVENTION_DEFAULT else eps
        momentum = rules.momentum if momentum is CONVENTION_DEFAULT else momentum
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.convention = convention
        self.skip_nonfinite_update = skip_nonfinite_update

    def trains_like_torch(self) -> bool:
        """Whether a training step is exactly ``torch.nn.BatchNormNd``'s (torch convention, no guard,
        no variant): then tools that rebuild the layer as torch's (QAT fusion) lose nothing."""
        is_variant = type(self)._normalize is not _BatchNorm._normalize  # renorm, ghost
        return self.convention == "torch" and not self.skip_nonfinite_update and not is_variant

    def _new_batch_weight(self, momentum: float) -> float:
        """``momentum`` in torch's direction: the weight the next batch gets (spelled out, not looked up
        in CONVENTIONS, so that TorchScript compiles it; a test ties the two together)."""
        if self.convention == "keras":
            return 1.0 - momentum
        return momentum

    def _running_var_correction(self) -> int:
        if self.convention == "keras":
            return 0
        return 1

    def forward(self, input: Tensor) -> Tensor:
        # torch's forward step for step (so TorchScript, FX, ONNX, torch.export and
        # __torch_function__ modes meet the same code), with the convention's momentum.
        self._check_input_dim(input)
        new_batch_weight = 0.0
        if self.momentum is not None:
            new_batch_weight = self._new_batch_weight(self.momentum)
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative average
                    new_batch_weight = 1.0 / float(self.num_batches_tracked)
        # As torch: without buffers (e.g. after replace_all_batch_norm_modules_)
        # even eval mode has to use batch statistics.
        if self.training:
            use_batch_stats = True
        else:
            use_batch_stats = (self.running_mean is None) and (self.running_var is None)
        update_buffers = not self.training or self.track_running_stats
        return self._normalize(
            input,
            self.running_mean if update_buffers else None,
            self.running_var if update_buffers else None,
            use_batch_stats,
            new_batch_weight,
        )

    def _normalize(self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   use_batch_stats: bool, new_batch_weight: float) -> Tensor:
        """The normalization proper; variants (renorm, ghost) override only this."""
        return self._batch_norm(input, running_mean, running_var, use_batch_stats, new_batch_weight)

    def _batch_norm(self, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    use_batch_stats: bool, new_batch_weight: float) -> Tensor:
        return BF.batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            new_batch_weight,
            self.eps,
            self._running_var_correction(),
            self.skip_nonfinite_update,
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torch tolerates a missing counter only in pre-1.2 (version < 2) checkpoints;
        # converted and hand-built checkpoints lack it too, so bnlab loads them all. As torch does
        # for old checkpoints, the counter keeps its value (0 when it is on the meta device, so a
        # meta-initialized model loaded with assign=True ends up with real tensors only);
        # running stats stay required. load_state_dict(strict=False) still lists the key as missing,
        # as torch would (torch passes strict=True here whatever the caller chose: see load_is_strict).
        key = prefix + "num_batches_tracked"
        filled = self.track_running_stats and self.num_batches_tracked is not None and key not in state_dict
        if filled:
            counter = self.num_batches_tracked
            state_dict[key] = torch.tensor(0, dtype=torch.long) if counter.is_meta else counter.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        version = local_metadata.get("version", None)
        if filled and version is not None and version >= 2 and not load_is_strict():
            missing_keys.append(key)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.convention != "torch":
            text += f", convention={self.convention!r}"
        if self.skip_nonfinite_update:
            text += ", skip_nonfinite_update=True"
        return text


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    __doc__ = _DOC.format(
        input_desc="2D or 3D input (a batch of vectors or of sequences)",
        spatial=" (and the length L for 3D input)",
        shapes="(N, C) or (N, C, L)",
        n=1,
        example="32, 16",
    )


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    __doc__ = _DOC.format(
        input_desc="4D input (a batch of images)",
        spatial=", height and width",
        shapes="(N, C, H, W), contiguous or channels_last",
        n=2,
        example="8, 16, 28, 28",
    )


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    __doc__ = _DOC.format(
        input_desc="5D input (a batch of volumes or videos)",
        spatial=", depth, height and width",
        shapes="(N, C, D, H, W)",
        n=3,
        example="4, 16, 8, 14, 14",
    )
