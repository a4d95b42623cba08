"""Fold batch norm into the layer before it, for inference.

In eval mode a batch norm is a fixed per-channel affine map, ``y = x·s + t`` with
``s = γ / sqrt(running_var + ε)`` and ``t = β − running_mean·s``
(:func:`bnlab.functional.core.scale_shift`). When it directly follows a Linear or a convolution
whose output nothing else reads, the map folds into that layer's weights: ``W' = s·W`` (per output
channel) and ``b' = s·b + t``, and the batch norm disappears. The folded model computes the same
function to float32 round-off, with one pass over the activations fewer per batch norm.

What folds: ``torch.nn`` and ``bnlab.nn`` batch norms (any convention; batch renorm and ghost batch
norm are plain batch norm at inference; frozen batch norm) that keep running statistics, after
``Linear``, ``Conv1d/2d/3d`` (grouped and depthwise too) or ``ConvTranspose1d/2d/3d``. What is left in
place, and listed with the reason: a batch norm without running statistics (it normalizes with the
batch even in eval mode), one whose input is not such a layer, or whose input layer's output is read
elsewhere too (a residual branch).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from bnlab.functional.core import scale_shift

__all__ = ["fold_batchnorm", "FoldReport"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d)


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: ``folded`` maps each removed batch norm to the layer it went
    into; ``kept`` maps each batch norm left in place to the reason."""

    folded: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norm(s), kept {len(self.kept)}"]
        lines += [f"  {bn} -> {layer}" for bn, layer in self.folded.items()]
        lines += [f"  kept {bn}: {reason}" for bn, reason in self.kept.items()]
        return "\n".join(lines)


def _is_batch_norm(module: nn.Module) -> bool:
    from bnlab.nn.frozen import _FrozenBatchNorm

    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _FrozenBatchNorm))


def _why_not_foldable(bn: nn.Module, layer: nn.Module | None) -> str | None:
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): it normalizes with each batch even in eval mode"
    if layer is None:
        return ("its input is not the output of a Linear or convolution that only it reads (or one of the two "
                "modules is called more than once)")
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != bn.running_mean.numel():
        return f"{type(layer).__name__} has {channels} output channels, the batch norm {bn.running_mean.numel()}"
    return None


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn``'s inference map into ``layer`` in place (float64 arithmetic, cast back)."""
    weight = getattr(bn, "weight", None)
    bias = getattr(bn, "bias", None)
    scale, shift = scale_shift(bn.running_mean.double(), bn.running_var.double(),
                               None if weight is None else weight.detach().double(),
                               None if bias is None else bias.detach().double(), bn.eps)
    w = layer.weight.double()
    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # weight (in, out/groups, *k): output channel g·(out/groups) + j lives at [g-th block of in, j]
        groups, per_group = layer.groups, w.shape[1]
        view = w.view(groups, w.shape[0] // groups, per_group, *w.shape[2:])
        view = view * scale.view(groups, 1, per_group, *[1] * (w.dim() - 2))
        new_weight = view.view_as(w)
    else:  # Linear (out, in), Conv (out, in/groups, *k)
        new_weight = w * scale.view(-1, *[1] * (w.dim() - 1))
    old_bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    new_bias = old_bias * scale + shift
    layer.weight.copy_(new_weight.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _pairs_by_fx(model: nn.Module) -> dict[str, str | None] | None:
    """``{batch norm name: the foldable layer feeding it, or None}`` from a torch.fx trace, or None when the
    model does not trace."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to the module structure
        return None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not _is_batch_norm(modules[node.target]):
            continue
        source = node.args[0] if node.args else None
        ok = (isinstance(source, torch.fx.Node) and source.op == "call_module"
              and isinstance(modules.get(source.target), _WEIGHTED) and len(source.users) == 1
              and calls[source.target] == 1 and calls[node.target] == 1)  # a shared module cannot absorb two maps
        pairs[node.target] = source.target if ok else None
    return pairs


def _pairs_by_structure(model: nn.Module) -> dict[str, str | None]:
    """The same from the module tree: a batch norm right after a weighted layer in an ``nn.Sequential``."""
    pairs = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for i, (child_name, child) in enumerate(children):
            if _is_batch_norm(child):
                full = f"{name}.{child_name}" if name else child_name
                before = children[i - 1] if i > 0 else None
                ok = before is not None and isinstance(before[1], _WEIGHTED)
                pairs[full] = (f"{name}.{before[0]}" if name else before[0]) if ok else None
    for name, module in model.named_modules():  # batch norms outside any Sequential: not provably foldable
        if _is_batch_norm(module) and name not in pairs:
            pairs[name] = None
    return pairs


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, FoldReport]:
    """An inference model with every foldable batch norm folded into the layer before it.

    Args:
        model: in eval mode (``model.eval()``): folding bakes the running statistics in, which is only
            what the model computes at inference.
        inplace: change ``model`` itself instead of a deep copy.

    Returns:
        ``(folded model, report)``: each removed batch norm is replaced by ``nn.Identity``; the
        :class:`FoldReport` says where each went, and why any was kept.

    The batch norm → layer pairs come from a ``torch.fx`` trace (any traceable model, whatever its
    nesting), or, for a model that does not trace, from adjacent modules in ``nn.Sequential`` containers.

    Raises:
        ValueError: a model (or a batch norm in it) in training mode.
    """
    training = [name or "(the model)" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"fold_batchnorm needs a model in eval mode; in training mode: {', '.join(training[:3])}"
                         f"{' ...' if len(training) > 3 else ''}. Call model.eval() first: folding uses the running "
                         "statistics, which only eval mode uses")
    target = model if inplace else copy.deepcopy(model)
    pairs = _pairs_by_fx(target)
    if pairs is None:
        pairs = _pairs_by_structure(target)
    report = FoldReport()
    for bn_name, layer_name in pairs.items():
        bn = target.get_submodule(bn_name)
        layer = target.get_submodule(layer_name) if layer_name is not None else None
        reason = _why_not_foldable(bn, layer)
        if reason is not None:
            report.kept[bn_name] = reason
            continue
        _fold_into(layer, bn)
        _set(target, bn_name, nn.Identity())
        report.folded[bn_name] = layer_name
    return target, report
