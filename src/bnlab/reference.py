"""Batch normalization written out step by step in NumPy float64: the teaching oracle.

Nothing here is fast, and nothing is mutated: every function takes its state
and returns a new one. Every intermediate of the forward pass has a name, and
the backward pass walks them back one by one, so a learner can print any of
them and a test can compare any of them. It is deliberately independent of the
rest of bnlab (it does not import torch), which is what makes it an oracle.

    >>> import numpy as np
    >>> from bnlab import reference as ref
    >>> x = np.random.default_rng(0).normal(size=(8, 3))
    >>> state = ref.RunningStats.initial(3)
    >>> y, cache, state = ref.batch_norm_forward(x, np.ones(3), np.zeros(3), state, training=True)
    >>> bool(np.allclose(y.mean(axis=0), 0.0))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "RunningStats",
    "ForwardCache",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_backward_fused",
    "Comparison",
    "compare",
]


@dataclass(frozen=True)
class RunningStats:
    """Moving averages of one batch-norm layer (an immutable value)."""

    mean: np.ndarray
    var: np.ndarray
    num_batches_tracked: int = 0

    @classmethod
    def initial(cls, num_features: int) -> RunningStats:
        """Mean 0, variance 1: what every framework starts from."""
        return cls(np.zeros(num_features), np.ones(num_features), 0)


@dataclass(frozen=True)
class ForwardCache:
    """Every intermediate of one forward pass, named as in the paper's Algorithm 1."""

    x: np.ndarray
    batch_mean: np.ndarray  # mu_B, per channel
    centered: np.ndarray  # x - mu
    batch_var: np.ndarray  # sigma_B^2 (biased: divided by n)
    inv_std: np.ndarray  # 1 / sqrt(var + eps), per channel
    x_hat: np.ndarray  # centered * inv_std
    gamma: np.ndarray
    y: np.ndarray  # gamma * x_hat + beta
    reduce_axes: tuple[int, ...]
    count: int  # n, values per channel
    training: bool


def _channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def batch_norm_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    state: RunningStats,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    convention: str = "torch",
    axis: int = 1,
) -> tuple[np.ndarray, ForwardCache, RunningStats]:
    """One forward pass; returns ``(y, cache, new_state)``.

    In training the batch statistics normalize ``x`` and are folded into the
    running statistics; in inference the running statistics normalize ``x``
    and ``new_state is state``.

    ``convention="torch"``: ``new = (1 - momentum) * old + momentum * batch``
    with the *unbiased* batch variance (``momentum=None``: cumulative average).
    ``convention="keras"``: ``new = momentum * old + (1 - momentum) * batch``
    with the *biased* batch variance.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
    channel = _channel_shape(x.ndim, axis)
    count = x.size // x.shape[axis]
    gamma = np.asarray(gamma, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)

    if training:
        batch_mean = x.mean(axis=reduce_axes)
        centered = x - batch_mean.reshape(channel)
        batch_var = (centered**2).mean(axis=reduce_axes)
    else:
        batch_mean, batch_var = state.mean, state.var
        centered = x - batch_mean.reshape(channel)
    inv_std = 1.0 / np.sqrt(batch_var + eps)
    x_hat = centered * inv_std.reshape(channel)
    y = gamma.reshape(channel) * x_hat + beta.reshape(channel)

    new_state = state
    if training:
        tracked = state.num_batches_tracked + 1
        if convention == "torch":
            weight_new = 1.0 / tracked if momentum is None else momentum
            var_to_store = batch_var * count / (count - 1)
        elif convention == "keras":
            weight_new = 1.0 - momentum
            var_to_store = batch_var
        else:
            raise ValueError(f"convention must be 'torch' or 'keras', got {convention!r}")
        new_state = RunningStats(
            mean=(1.0 - weight_new) * state.mean + weight_new * batch_mean,
            var=(1.0 - weight_new) * state.var + weight_new * var_to_store,
            num_batches_tracked=tracked,
        )
    cache = ForwardCache(x, batch_mean, centered, batch_var, inv_std, x_hat, gamma, y, reduce_axes, count, training)
    return y, cache, new_state


def batch_norm_backward(dy: np.ndarray, cache: ForwardCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx, dgamma, dbeta)``, walking the forward intermediates back one at a time."""
    c = cache
    channel = _channel_shape(c.x.ndim, next(a for a in range(c.x.ndim) if a not in c.reduce_axes))
    dy = np.asarray(dy, dtype=np.float64)

    # y = gamma * x_hat + beta
    dbeta = dy.sum(axis=c.reduce_axes)
    dgamma = (dy * c.x_hat).sum(axis=c.reduce_axes)
    dx_hat = dy * c.gamma.reshape(channel)
    if not c.training:
        # mean and var are constants (running statistics): y is affine in x.
        return dx_hat * c.inv_std.reshape(channel), dgamma, dbeta

    # x_hat = centered * inv_std
    dinv_std = (dx_hat * c.centered).sum(axis=c.reduce_axes)
    dcentered = dx_hat * c.inv_std.reshape(channel)
    # inv_std = (var + eps) ** -0.5
    dvar = dinv_std * -0.5 * c.inv_std**3
    # var = mean(centered ** 2)
    dcentered = dcentered + (2.0 / c.count) * c.centered * dvar.reshape(channel)
    # centered = x - mean;  mean = sum(x) / n
    dmean = -dcentered.sum(axis=c.reduce_axes)
    dx = dcentered + dmean.reshape(channel) / c.count
    return dx, dgamma, dbeta


def batch_norm_backward_fused(dy: np.ndarray, cache: ForwardCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same gradients as one closed-form expression (training mode only).

    ``dx = gamma * inv_std / n * (n * dy - sum(dy) - x_hat * sum(dy * x_hat))``
    """
    c = cache
    if not c.training:
        raise ValueError("the fused formula is for training mode; use batch_norm_backward")
    channel = _channel_shape(c.x.ndim, next(a for a in range(c.x.ndim) if a not in c.reduce_axes))
    dy = np.asarray(dy, dtype=np.float64)
    dbeta = dy.sum(axis=c.reduce_axes)
    dgamma = (dy * c.x_hat).sum(axis=c.reduce_axes)
    scale = (c.gamma * c.inv_std / c.count).reshape(channel)
    dx = scale * (c.count * dy - dbeta.reshape(channel) - c.x_hat * dgamma.reshape(channel))
    return dx, dgamma, dbeta


@dataclass(frozen=True)
class Comparison:
    """How closely two arrays agree."""

    name: str
    exact: bool
    approximate: bool
    max_abs_diff: float

    def __str__(self) -> str:
        return (
            f"{self.name:<16s} | exact: {str(self.exact):<5s} | approximate: {str(self.approximate):<5s}"
            f" | maxdiff: {self.max_abs_diff:.3g}"
        )


def compare(name: str, ours, reference, *, rtol: float = 1e-5, atol: float = 1e-6, echo: bool = True) -> Comparison:
    """Compare ``ours`` (array or tensor) with ``reference``; print and return the verdict.

    ``exact`` is bit-for-bit equality after conversion to float64;
    ``approximate`` is ``np.allclose(ours, reference, rtol, atol)``.
    """
    a = _to_numpy(ours)
    b = _to_numpy(reference)
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ, {a.shape} vs {b.shape}")
    result = Comparison(
        name,
        exact=bool(np.array_equal(a, b)),
        approximate=bool(np.allclose(a, b, rtol=rtol, atol=atol)),
        max_abs_diff=float(np.max(np.abs(a - b))) if a.size else 0.0,
    )
    if echo:
        print(result)
    return result


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)
