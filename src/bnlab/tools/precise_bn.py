"""Precise BN: running statistics re-estimated over many batches instead of an exponential average.

During training a batch norm's running mean and variance are an exponential moving average of
batch statistics taken while the weights kept changing, so early on (or with a slow average such
as Keras' momentum 0.99) they describe a network that no longer exists. Wu & Johnson (2021,
"Rethinking BatchNorm") and fvcore's ``update_bn_stats`` re-estimate them with the weights fixed:

1. put every batch norm in training mode, so each one normalizes with its batch statistics exactly
   as in a training step (later layers see what they see during training);
2. for each batch i of n_i samples, record every layer's batch mean μ_i and (biased) variance σ²_i;
3. the population statistics over all N = Σ n_i samples are

       μ = Σ n_i μ_i / N        σ² = Σ n_i (σ²_i + μ_i²) / N − μ²

   (``estimator="population"``; the variance of the pooled samples, so for the first batch norm the
   result does not depend on how the same samples are split into batches), or the average of the
   batch variances weighted by n_i (``estimator="batch_mean"``, fvcore's default, which leaves out the
   spread of the batch means);
4. store them in the layer's convention (unbiased variance for torch's, biased for Keras'), and put
   every mode back as it was. ``num_batches_tracked`` and momentum are left as they were.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from bnlab.functional.core import bessel_factor

__all__ = ["recompute_bn_stats"]

ESTIMATORS = ("population", "batch_mean")


def _batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _stores_unbiased_variance(norm: nn.Module) -> bool:
    """torch's layers (and bnlab's torch convention) keep the unbiased variance; Keras' keeps the biased one."""
    return getattr(norm, "convention", "torch") != "keras"


class _Moments:
    """Per-channel running sums over the batches one batch norm sees."""

    def __init__(self) -> None:
        self.count = 0
        self.sum_mean: Tensor | float = 0.0
        self.sum_var: Tensor | float = 0.0
        self.sum_square_mean: Tensor | float = 0.0

    def add(self, x: Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // x.shape[1] if x.shape[1] else 0
        if n == 0:  # an empty batch adds nothing
            return
        x = x.detach().double()
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        self.count += n
        self.sum_mean = self.sum_mean + n * mean
        self.sum_var = self.sum_var + n * var
        self.sum_square_mean = self.sum_square_mean + n * mean * mean

    def statistics(self, estimator: str) -> tuple[Tensor, Tensor]:
        mean = self.sum_mean / self.count
        if estimator == "population":
            var = (self.sum_var + self.sum_square_mean) / self.count - mean * mean
        else:
            var = self.sum_var / self.count
        return mean, var.clamp_min(0.0)


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable, num_batches: int | None = None, *,
                       estimator: str = "population") -> int:
    """Replace the running mean and variance of every batch norm in ``model`` by statistics over ``batches``.

    Args:
        model: any module; every ``torch.nn`` or ``bnlab.nn`` batch norm inside it that tracks
            running statistics is re-estimated (including the stacked ones of ``bnlab.models``).
        batches: an iterable of inputs (tensors, or tuples/lists whose first item is the input, as a
            ``DataLoader`` yields), e.g. training batches without augmentation changes.
        num_batches: use at most this many batches (default: all of them).
        estimator: ``"population"`` (the variance of all samples pooled, the default) or
            ``"batch_mean"`` (the average batch variance, fvcore's); see the module docstring.

    Returns:
        The number of batches used.

    The batch norms run in training mode during the passes (the other modules keep their mode, so
    dropout in an eval-mode model stays off); every mode is restored, and the global RNG is left as
    it was. Momentum and ``num_batches_tracked`` are not changed.

    Raises:
        ValueError: an unknown ``estimator``, a model without batch norms that track statistics, or
            no batches.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    norms = _batch_norms(model)
    if not norms:
        raise ValueError("the model has no batch norm that tracks running statistics: nothing to recompute")
    moments = {name: _Moments() for name, _ in norms}
    saved = [(m, m.training, m.running_mean.clone(), m.running_var.clone(),
              None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for _, m in norms]
    hooks = [m.register_forward_pre_hook(lambda mod, args, acc=moments[name]: acc.add(args[0]))
             for name, m in norms]
    used = 0
    try:
        with torch.random.fork_rng(devices=[]):
            for _, m in norms:
                m.train()
            for batch in batches:
                if num_batches is not None and used >= num_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x)
                used += 1
    finally:
        for h in hooks:
            h.remove()
        for m, mode, running_mean, running_var, tracked in saved:  # the passes moved them: undo first
            m.train(mode)
            m.running_mean.copy_(running_mean)
            m.running_var.copy_(running_var)
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
    if used == 0:
        raise ValueError("no batches were given: the running statistics are left as they were")
    unreached = [name for name, _ in norms if moments[name].count == 0]
    if unreached:  # checked before any layer is written: all or nothing
        raise ValueError(f"no values reached {', '.join(unreached)} during the passes (a branch the forward did not "
                         "take, or empty batches): the running statistics are left as they were")
    for name, m in norms:
        mean, var = moments[name].statistics(estimator)
        count = moments[name].count
        if _stores_unbiased_variance(m) and count > 1:
            var = var * bessel_factor(count, 1)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return used
