"""Swapping batch norms inside a model: the tree walk and the state copy that freezing, SyncBatchNorm
conversion and ``bnlab.tools.convert`` share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["replace_modules", "copy_norm_state", "factory_kwargs"]

_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def replace_modules(module: nn.Module, should_replace: Callable[[nn.Module], bool],
                    replacement: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Every submodule ``should_replace`` picks swapped for ``replacement(it)``, in place; returns
    ``module`` (or its replacement, if ``module`` itself is picked). Replaced modules are not entered."""
    if should_replace(module):
        return replacement(module)
    for name, child in module.named_children():
        new = replace_modules(child, should_replace, replacement)
        if new is not child:
            setattr(module, name, new)
    return module


@torch.no_grad()
def copy_norm_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """``target`` with ``source``'s affine, running statistics, counter, ``requires_grad`` and mode;
    returns ``target``. What one of them lacks (no affine, no statistics) is skipped."""
    for name in _STATE:
        a, b = getattr(source, name, None), getattr(target, name, None)
        if a is not None and b is not None:
            b.copy_(a)
            if isinstance(b, nn.Parameter):
                b.requires_grad_(a.requires_grad)
    return target.train(source.training)


def factory_kwargs(module: nn.Module) -> dict:
    """``device`` and ``dtype`` of a norm layer's tensors, for building its replacement alike."""
    like = next((t for t in (getattr(module, "weight", None), getattr(module, "running_mean", None))
                 if t is not None), None)
    return {"device": None if like is None else like.device, "dtype": None if like is None else like.dtype}
