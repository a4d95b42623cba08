"""``make_norm``: one name for every normalization, used by the model builders and the web app."""

from __future__ import annotations

from torch import nn

__all__ = ["make_norm", "NORM_KINDS", "default_groups"]

NORM_KINDS = ("none", "batch", "layer", "group", "instance", "renorm", "ghost", "frozen")


def default_groups(num_channels: int, preferred: int = 32) -> int:
    """Wu & He's 32 groups when C allows it, else the largest divisor of C not above 32."""
    return max(g for g in range(1, min(preferred, num_channels) + 1) if num_channels % g == 0)


def make_norm(kind: str, num_features: int, *, spatial: bool = False, **options) -> nn.Module:
    """A normalization layer for ``num_features`` channels.

    Args:
        kind: one of ``none, batch, layer, group, instance, renorm, ghost, frozen``.
        num_features: C.
        spatial: False for ``(N, C)`` inputs (after a linear layer), True for
            ``(N, C, H, W)`` (after a convolution).
        options: passed to the layer (e.g. ``momentum``, ``convention``,
            ``num_groups``, ``virtual_batch_size``, ``r_max``).

    ``layer`` on spatial inputs is ``GroupNorm(1, C)``: layer norm over
    (C, H, W) with per-channel affine, as is usual for convolutions (a plain
    ``LayerNorm`` would need H and W up front). ``group`` defaults to
    :func:`default_groups`. ``instance`` needs spatial inputs.
    """
    from bnlab.nn import alternatives as alt
    from bnlab.nn import batchnorm as bn
    from bnlab.nn import frozen, variants

    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; choose one of {list(NORM_KINDS)}")
    if kind == "none":
        return nn.Identity()
    if kind == "layer":
        if spatial:
            return alt.GroupNorm(1, num_features, **_only(options, "eps", "affine"))
        return alt.LayerNorm(num_features, **_only(options, "eps", "elementwise_affine", "bias"))
    if kind == "group":
        groups = options.pop("num_groups", None) or default_groups(num_features)
        return alt.GroupNorm(groups, num_features, **_only(options, "eps", "affine"))
    if kind == "instance":
        if not spatial:
            raise ValueError("instance norm needs spatial dims (H, W); an (N, C) input has none")
        return alt.InstanceNorm2d(num_features, **options)
    classes = {
        "batch": (bn.BatchNorm1d, bn.BatchNorm2d),
        "renorm": (variants.BatchRenorm1d, variants.BatchRenorm2d),
        "ghost": (variants.GhostBatchNorm1d, variants.GhostBatchNorm2d),
        "frozen": (frozen.FrozenBatchNorm1d, frozen.FrozenBatchNorm2d),
    }[kind]
    return classes[spatial](num_features, **options)


def _only(options: dict, *allowed: str) -> dict:
    unknown = set(options) - set(allowed)
    if unknown:
        raise TypeError(f"unexpected options {sorted(unknown)}; this kind accepts {list(allowed)}")
    return options
