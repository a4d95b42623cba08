"""What makes bnlab's layers look like ``torch.nn``'s to torch's own tools, and nothing else.

Two of torch's tools decide by *name* rather than by ``isinstance``:

* FX (``torch.fx.symbolic_trace``, ``prepare_fx``'s tracer, torchvision's and Hugging Face's
  tracers) keeps a module as one ``call_module`` node only if ``m.__module__`` starts with
  ``"torch.nn"``; every other module is traced through. :class:`TorchLeaf` answers that check
  per instance (see there for why).
* ``torch.ao.quantization.fuse_modules`` looks fuser methods up by exact type.
  :func:`register_fusers` adds bnlab's batch norms to torch's table, next to torch's own.

And one thing torch hides: :func:`load_is_strict`, the caller's ``strict`` during ``load_state_dict``.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["TorchLeaf", "register_fusers", "load_is_strict"]


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


def _torch_stand_in(bn: nn.Module) -> nn.Module:
    """A ``torch.nn.BatchNormNd`` configured like ``bn`` (on the meta device: it holds no data), for
    torch's fusers, whose containers assert exact types and are given ``bn`` back right after."""
    cls = next(c for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) if isinstance(bn, c))
    stand_in = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta",
                   bias=bn.bias is not None)
    return stand_in.train(bn.training)


def _bnlab_fuser(torch_fuser, bn_index: int, folds_in_eval: bool, qat_rebuilds_bn: bool):
    """torch's fuser method, made to take a bnlab batch norm.

    Where torch folds the batch norm away (conv/linear + bn in eval mode) only the running
    statistics count, which torch's fuser reads from any batch norm. Where torch keeps it in a
    fused container (bn + relu; every QAT fusion), the container is built around a torch stand-in
    and then given the bnlab layer back: same parameters, same behaviour. ``prepare_qat`` later
    rebuilds the batch norm of a QAT conv/linear container as torch's own, so there the layer must
    train like torch's.
    """

    def fuse(is_qat, *modules):
        if folds_in_eval and not is_qat:
            return torch_fuser(is_qat, *modules)
        bn = modules[bn_index]
        if is_qat and qat_rebuilds_bn and not bn.trains_like_torch():
            raise ValueError(
                f"cannot fuse {bn} for quantization-aware training: prepare_qat replaces the batch norm "
                "by torch's, which has neither this layer's convention, non-finite guard nor variant "
                "(renorm, ghost). Fuse a plain convention='torch' BatchNorm, or fuse in eval() mode."
            )
        stand_in = list(modules)
        stand_in[bn_index] = _torch_stand_in(bn)
        fused = torch_fuser(is_qat, *stand_in)
        fused[bn_index] = bn
        return fused

    return fuse


def register_fusers(bn1d: list[type], bn2d: list[type], bn3d: list[type]) -> None:
    """Add bnlab's batch norms to ``torch.ao.quantization``'s table of fuser methods.

    Each bnlab class gets the patterns torch registers for its ``torch.nn`` base class:
    conv1d/2d/3d + bn (+ relu), linear + bn1d, bn2d/3d + relu, for ``fuse_modules`` and
    ``fuse_modules_qat`` (see :func:`_bnlab_fuser` for how).
    """
    from torch.ao.nn import intrinsic as nni
    from torch.ao.quantization import fuser_method_mappings as mappings

    table = mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD  # torch's own registry; there is no public hook
    conv_bn = _bnlab_fuser(mappings.fuse_conv_bn, 1, True, True)
    conv_bn_relu = _bnlab_fuser(mappings.fuse_conv_bn_relu, 1, True, True)
    for conv, bns in ((nn.Conv1d, bn1d), (nn.Conv2d, bn2d), (nn.Conv3d, bn3d)):
        for bn in bns:
            table[(conv, bn)] = conv_bn
            table[(conv, bn, nn.ReLU)] = conv_bn_relu
    linear_bn = _bnlab_fuser(mappings.fuse_linear_bn, 1, True, True)
    for bn in bn1d:
        table[(nn.Linear, bn)] = linear_bn
    for bns, container in ((bn2d, nni.BNReLU2d), (bn3d, nni.BNReLU3d)):
        bn_relu = _bnlab_fuser(mappings._sequential_wrapper2(container), 0, False, False)
        for bn in bns:
            table[(bn, nn.ReLU)] = bn_relu


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
