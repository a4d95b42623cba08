"""What makes bnlab's layers look like ``torch.nn``'s to torch's own tools, and nothing else.

Two of torch's tools decide by *name* rather than by ``isinstance``:

* FX (``torch.fx.symbolic_trace``, ``prepare_fx``'s tracer, torchvision's and Hugging Face's
  tracers) keeps a module as one ``call_module`` node only if ``m.__module__`` starts with
  ``"torch.nn"``; every other module is traced through. :class:`TorchLeaf` answers that check
  per instance (see there for why).
* ``torch.ao.quantization`` (eager ``fuse_modules``, FX ``prepare_fx``, lowering) and
  ``torch.fx.experimental.optimization.fuse`` look modules up by exact type.
  :func:`register_with_torch_tools` adds bnlab's norm layers to torch's tables, next to
  torch's own.

And one thing torch hides: :func:`load_is_strict`, the caller's ``strict`` during ``load_state_dict``.
"""

from __future__ import annotations

import copy
import sys

from torch import nn

__all__ = ["TorchLeaf", "register_with_torch_tools", "load_is_strict"]


class TorchLeaf:
    """Mixin: instances report a ``__module__`` under ``torch.nn`` so that FX treats them as leaves.

    Why this and not another way: FX's rule (``Tracer.is_leaf_module``) reads
    ``m.__module__.startswith("torch.nn")`` on the *instance*, and it is copied verbatim by
    the tracers built on it (quantization's, torchvision's, Hugging Face's), so a custom leaf
    rule would not reach users who call plain ``torch.fx.symbolic_trace``, and patching
    ``Tracer`` globally would miss every subclass that overrides the rule. The forward is
    also traceable by itself (no Python branch on tensor values), but tracing through it
    gives ``call_function`` nodes, which FX passes and quantization do not treat as a norm
    layer. An instance attribute changes that one lookup and nothing else: the class keeps
    its real ``__module__`` (pickle, ``torch.save``, TorchScript and ``torch.compile`` look at
    the class), and the value names the real module after the ``torch.nn`` marker.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.__dict__["__module__"] = f"torch.nn (bnlab: {type(self).__module__})"

    def __setstate__(self, state) -> None:  # modules pickled before the marker existed
        super().__setstate__(state)
        self.__dict__.setdefault("__module__", f"torch.nn (bnlab: {type(self).__module__})")


def _torch_twin(bn: nn.Module) -> nn.Module:
    """A ``torch.nn.BatchNormNd`` that shares ``bn``'s parameters and buffers (no copies): what torch's
    fusers get in its place, since their containers assert exact types."""
    cls = next(c for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) if isinstance(bn, c))
    momentum = None if bn.momentum is None else bn._new_batch_weight(bn.momentum)  # in torch's direction
    twin = cls(bn.num_features, bn.eps, momentum, bn.affine, bn.track_running_stats, device="meta",
               bias=bn.bias is not None)
    twin._parameters.update(bn._parameters)
    twin._buffers.update(bn._buffers)
    return twin.train(bn.training)


def _put_back(fused: nn.Module, twin: nn.Module, bn: nn.Module) -> nn.Module:
    """``fused`` with ``bn`` wherever torch's fuser kept ``twin``."""
    if fused is twin:
        return bn
    for parent in fused.modules():
        for name, child in parent.named_children():
            if child is twin:
                setattr(parent, name, bn)
    return fused


def _bnlab_fuser(torch_fuser):
    """torch's fuser method, made to take bnlab batch norms where it takes torch's.

    The bnlab layer is handed to torch's fuser as a torch twin sharing its tensors, so torch
    folds it (conv/linear + bn in eval mode: only the running statistics count, read from the
    same tensors) or keeps it in a fused container (bn + relu, every QAT fusion), which then gets
    the bnlab layer itself back: same parameters, same behaviour. ``prepare_qat`` rebuilds the
    batch norm of QAT conv/linear containers as torch's own, so there the layer must train like
    torch's (:meth:`~bnlab.nn.BatchNorm2d.trains_like_torch`).
    """
    from torch.ao.nn import intrinsic as nni

    def fuse(is_qat, *modules):
        twins = {i: _torch_twin(m) for i, m in enumerate(modules) if getattr(m, "trains_like_torch", None)}
        fused = torch_fuser(is_qat, *[twins.get(i, m) for i, m in enumerate(modules)])
        for i, twin in twins.items():
            bn = modules[i]
            if is_qat and not bn.trains_like_torch() and not isinstance(fused, (nni.BNReLU2d, nni.BNReLU3d)):
                raise ValueError(
                    f"cannot fuse {bn} for quantization-aware training: prepare_qat replaces the batch norm "
                    "by torch's, which has neither this layer's convention, non-finite guard nor variant "
                    "(renorm, ghost). Fuse a plain convention='torch' BatchNorm, or fuse in eval() mode.")
            fused = _put_back(fused, twin, bn)
        return fused

    return fuse


def _with_bnlab_types(pattern, twins: dict[type, list[type]]) -> list:
    """Every variant of a (possibly nested) pattern with torch norm classes replaced by their bnlab twins
    (the original first)."""
    if isinstance(pattern, tuple):
        variants = [()]
        for part in pattern:
            variants = [v + (p,) for v in variants for p in _with_bnlab_types(part, twins)]
        return variants
    if isinstance(pattern, type) and pattern in twins:
        return [pattern, *twins[pattern]]
    return [pattern]


def register_with_torch_tools(twins: dict[type, list[type]]) -> None:
    """Teach torch's fusion and quantization tools bnlab's norm layers wherever they know torch's.

    ``twins`` maps each ``torch.nn`` norm class to its bnlab subclasses. These tools look
    modules up by exact type, in tables without a public hook; each gets the bnlab classes
    next to torch's, handled the same way:

    * ``torch.fx.experimental.optimization.fuse`` (conv/linear + bn folding on an FX graph):
      its pattern test;

    * eager fusion (``fuse_modules``, ``fuse_modules_qat``): torch's fuser table, with
      :func:`_bnlab_fuser`;
    * FX graph mode (``prepare_fx``, ``prepare_qat_fx``, ``fuse_fx``): every ``BackendConfig``
      (torch's native, fbgemm, x86 and qnnpack ones, and a user's) gets, next to each pattern
      config that names a torch norm class, the same config for each bnlab twin;
    * lowering to quantized modules: FX's ``convert_fx`` (the special-pattern table and its
      node test) and eager ``convert`` (the default static module mappings).

    Registering twice is harmless. The tests compare each path with torch's own result.
    """
    from torch.ao.quantization import fuser_method_mappings as mappings
    from torch.ao.quantization import quantization_mappings
    from torch.ao.quantization.backend_config import BackendConfig
    from torch.ao.quantization.fx import _lower_to_native_backend as lowering
    from torch.fx.experimental import optimization

    table = mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for key, fuser in list(table.items()):
        for variant in _with_bnlab_types(key, twins)[1:]:
            table.setdefault(variant, _bnlab_fuser(fuser))
    for torch_cls, ours in twins.items():
        for cls in ours:
            for mapping in (lowering.SPECIAL_PATTERN_LOWER_MODULE_MAP,
                            quantization_mappings.DEFAULT_STATIC_QUANT_MODULE_MAPPINGS):
                if torch_cls in mapping:
                    mapping.setdefault(cls, mapping[torch_cls])
    if getattr(BackendConfig.set_backend_pattern_config, "bnlab_twins", None) is not None:
        return

    matches = optimization.matches_module_pattern

    def matches_module_pattern(pattern, node, modules):
        return any(matches(variant, node, modules) for variant in _with_bnlab_types(tuple(pattern), twins))

    optimization.matches_module_pattern = matches_module_pattern

    set_config = BackendConfig.set_backend_pattern_config

    def set_backend_pattern_config(self, config):
        set_config(self, config)
        pattern = config.pattern if config.pattern is not None else config._pattern_complex_format
        for variant in _with_bnlab_types(pattern, twins)[1:]:
            twin = copy.copy(config)
            if config.pattern is not None:
                twin.pattern = variant
            else:
                twin._pattern_complex_format = variant
            if config.fuser_method is not None:
                twin.fuser_method = _bnlab_fuser(config.fuser_method)
            set_config(self, twin)
        return self

    set_backend_pattern_config.bnlab_twins = twins
    set_backend_pattern_config.__doc__ = set_config.__doc__
    BackendConfig.set_backend_pattern_config = set_backend_pattern_config

    is_special = lowering.is_special_pattern_node
    bnlab_classes = tuple(cls for torch_cls, ours in twins.items() for cls in ours
                          if torch_cls in lowering.SPECIAL_PATTERN_LOWER_MODULE_MAP)

    def is_special_pattern_node(node, modules):
        is_call_function, is_call_method, is_call_module = is_special(node, modules)
        if node.op == "call_module" and type(modules[str(node.target)]) in bnlab_classes:
            is_call_module = True
        return is_call_function, is_call_method, is_call_module

    lowering.is_special_pattern_node = is_special_pattern_node


def load_is_strict() -> bool:
    """The ``strict`` argument of the ``torch.nn.Module.load_state_dict`` call in progress (True if none).

    torch hands every module's ``_load_from_state_dict`` ``strict=True`` whatever the caller
    asked, and decides only at the end whether missing keys are an error. A layer that
    tolerates a missing key under strict loading but must still list it under
    ``strict=False`` (as torch would) can learn the caller's choice only from that frame.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _LOAD_STATE_DICT_CODE:
            return bool(frame.f_locals.get("strict", True))
        frame = frame.f_back
    return True


_LOAD_STATE_DICT_CODE = nn.Module.load_state_dict.__code__
