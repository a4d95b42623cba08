"""Small, dependency-free statistics for multi-seed results: means with Student-t confidence intervals."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from collections.abc import Sequence

__all__ = ["Interval", "mean_ci", "welch_diff", "t_quantile", "first_step_reaching"]


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with a two-sided confidence interval (``low``, ``high``)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        return {**asdict(self), "half_width": self.half_width}

    @classmethod
    def from_dict(cls, d: dict) -> Interval:
        """The interval :meth:`to_dict` wrote (JSON's null read back as NaN)."""
        def number(v):
            return math.nan if v is None else float(v)
        return cls(number(d["mean"]), number(d["low"]), number(d["high"]), int(d["n"]), float(d.get("level", 0.95)))


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and the Student-t interval ``mean ± t_{(1+level)/2, n-1} · s / sqrt(n)``.

    With one value the interval is the point itself (n says so); with none, NaN.
    """
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, mean, mean, 1, level)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile((1 + level) / 2, n - 1) * math.sqrt(var / n)
    return Interval(mean, mean - half, mean + half, n, level)


def welch_diff(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """``mean(a) - mean(b)`` with Welch's t interval (unequal variances); ``n`` is min(len(a), len(b)).

    With fewer than two values on a side there is no interval: low = high = the difference.
    """
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    ma, mb = math.fsum(a) / na, math.fsum(b) / nb
    diff = ma - mb
    if na < 2 or nb < 2:
        return Interval(diff, diff, diff, min(na, nb), level)
    va = math.fsum((x - ma) ** 2 for x in a) / (na - 1) / na
    vb = math.fsum((x - mb) ** 2 for x in b) / (nb - 1) / nb
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(diff, diff, diff, min(na, nb), level)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = t_quantile((1 + level) / 2, max(1, math.floor(df))) * se
    return Interval(diff, diff - half, diff + half, min(na, nb), level)


def _t_cdf(t: float, df: int) -> float:
    """Student-t CDF through the regularized incomplete beta function."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) * result / a


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF).

    Cached: a report asks for the same few quantiles hundreds of times (one per curve point),
    and each costs 200 evaluations of the CDF."""
    if not 0 < p < 1 or df < 1:
        raise ValueError("need 0 < p < 1 and df >= 1")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def first_step_reaching(series: Sequence[tuple[int, float]], threshold: float) -> int | None:
    """The first recorded step whose value is >= ``threshold`` (None if it never gets there)."""
    for step, value in series:
        if value is not None and value >= threshold:
            return step
    return None
