"""Move batch norms between bnlab, torch.nn and Keras without changing what they compute.

Two facts every conversion has to get right (see the table in the README):

* **momentum points the other way.** torch's ``momentum`` is the weight of the *new* batch
  (default 0.1); Keras' is the weight of the *old* average (default 0.99). The same moving
  average is ``m_torch = 1 − m_keras``.
* **the stored variance differs by n/(n−1).** torch stores the unbiased batch variance in
  ``running_var``, Keras the biased one in ``moving_variance``. Inference reads the stored value
  as it is, so copying it keeps inference outputs identical; the next training updates then follow
  the new framework's rule.

``eps`` (Keras ``epsilon``) is copied; the defaults differ (1e-5 and 1e-3), which is why a converted
layer keeps the source's value rather than the target's default.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnlab.nn._replace import copy_norm_state, factory_kwargs, replace_modules

__all__ = ["convert_batchnorm", "KerasBatchNorm", "from_keras", "to_keras", "keras_momentum_to_torch",
           "torch_momentum_to_keras"]


def keras_momentum_to_torch(momentum: float) -> float:
    """Keras' ``momentum`` (weight of the old average) as torch's (weight of the new batch)."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"a momentum is in [0, 1], got {momentum}")
    return 1.0 - momentum


def torch_momentum_to_keras(momentum: float) -> float:
    """torch's ``momentum`` (weight of the new batch) as Keras' (weight of the old average)."""
    return keras_momentum_to_torch(momentum)


def _torch_classes() -> dict[type, int]:
    return {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _bnlab_classes() -> dict[int, type]:
    import bnlab.nn as bnn

    return {1: bnn.BatchNorm1d, 2: bnn.BatchNorm2d, 3: bnn.BatchNorm3d}


def _to_bnlab(module: nn.Module, convention: str | None) -> nn.Module:
    """A ``torch.nn.BatchNormNd`` as ``bnlab.nn``'s, in the given convention (its momentum turned to match)."""
    target_convention = convention or "torch"
    momentum = module.momentum
    if target_convention == "keras" and momentum is not None:
        momentum = torch_momentum_to_keras(momentum)
    cls = _bnlab_classes()[_torch_classes()[type(module)]]
    return copy_norm_state(module, cls(module.num_features, eps=module.eps, momentum=momentum,
                                       affine=module.affine, track_running_stats=module.track_running_stats,
                                       convention=target_convention, **factory_kwargs(module)))


def _to_torch(module: nn.Module) -> nn.Module:
    """A plain ``bnlab.nn`` batch norm as ``torch.nn``'s; what torch cannot represent is a ValueError."""
    import bnlab.nn as bnn

    if isinstance(module, (bnn.BatchRenorm1d, bnn.BatchRenorm2d, bnn.BatchRenorm3d, bnn.GhostBatchNorm1d,
                           bnn.GhostBatchNorm2d)):
        raise ValueError(f"{type(module).__name__} has no torch.nn equivalent (its training step differs); "
                         "freeze it (bnlab.nn.freeze_batchnorm) or convert only plain batch norms")
    dims = next((d for cls, d in _torch_classes().items() if isinstance(module, cls)), None)
    if dims is None:
        raise ValueError(f"{type(module).__name__} has no single torch.nn.BatchNormNd class; for a "
                         "SyncBatchNorm, call bnlab.nn.revert_sync_batchnorm first")
    if module.affine and module.bias is None:
        raise ValueError("a bnlab batch norm without a learned β (bias=False) has no torch.nn equivalent")
    if module.skip_nonfinite_update:
        warnings.warn("torch.nn.BatchNorm has no skip_nonfinite_update: a non-finite batch will reach the "
                      "running statistics of the converted layer", UserWarning, stacklevel=5)
    momentum = module.momentum
    if module.convention == "keras" and momentum is not None:
        momentum = keras_momentum_to_torch(momentum)
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return copy_norm_state(module, cls(module.num_features, eps=module.eps, momentum=momentum, affine=module.affine,
                                       track_running_stats=module.track_running_stats, **factory_kwargs(module)))


def convert_batchnorm(model: nn.Module, to: str = "bnlab", *, convention: str | None = None,
                      inplace: bool = False) -> nn.Module:
    """Every ``torch.nn.BatchNormNd`` of ``model`` swapped for ``bnlab.nn``'s (``to="bnlab"``), or every plain
    ``bnlab.nn.BatchNormNd`` for torch's (``to="torch"``), keeping weights, buffers, ``num_batches_tracked``,
    ``requires_grad`` and train/eval mode: outputs are identical before and after.

    ``convention="keras"`` (with ``to="bnlab"``) makes the new layers Keras-convention, with the momentum
    turned to Keras' direction so the moving mean follows the same average (``running_var`` is copied as
    it is, and from the next update on it follows Keras' biased rule; see the module docstring). Going to torch, a Keras-convention layer's momentum is turned back.

    Raises:
        ValueError: an unknown target or convention, or a layer torch cannot represent (batch renorm,
            ghost batch norm, ``bias=False``).
    """
    if to not in ("bnlab", "torch"):
        raise ValueError(f"to must be 'bnlab' or 'torch', got {to!r}")
    if convention not in (None, "torch", "keras") or (convention is not None and to == "torch"):
        raise ValueError("convention is 'torch' or 'keras', and only for to='bnlab'")
    from bnlab.nn.batchnorm import _BatchNorm as BnlabBatchNorm

    target = model if inplace else copy.deepcopy(model)
    if to == "bnlab":
        return replace_modules(target, lambda m: type(m) in _torch_classes(), lambda m: _to_bnlab(m, convention))
    return replace_modules(target, lambda m: isinstance(m, BnlabBatchNorm), _to_torch)


@dataclass
class KerasBatchNorm:
    """A Keras ``BatchNormalization`` layer's state: its weights (``None`` for the ones ``center=False`` or
    ``scale=False`` leave out) and its hyper-parameters, in Keras' conventions."""

    moving_mean: np.ndarray
    moving_variance: np.ndarray
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    momentum: float = 0.99
    epsilon: float = 1e-3

    @classmethod
    def of(cls, layer) -> KerasBatchNorm:
        """From a built Keras 3 ``keras.layers.BatchNormalization`` (read through its public attributes, the
        variables' ``path`` names; Keras is not imported here)."""
        weights = {w.path.rsplit("/", 1)[-1]: np.asarray(w.numpy() if hasattr(w, "numpy") else w)
                   for w in layer.weights}
        return cls(weights["moving_mean"], weights["moving_variance"], weights.get("gamma"), weights.get("beta"),
                   float(layer.momentum), float(layer.epsilon))

    def weights(self) -> list[np.ndarray]:
        """In ``layer.set_weights`` order: gamma (if scale), beta (if center), moving_mean, moving_variance."""
        return [w for w in (self.gamma, self.beta) if w is not None] + [self.moving_mean, self.moving_variance]


def from_keras(keras_state, layer: nn.Module) -> nn.Module:
    """Load a Keras batch norm (a :class:`KerasBatchNorm`, or a built ``keras.layers.BatchNormalization``)
    into ``layer``, a ``torch.nn`` or ``bnlab.nn`` batch norm of either convention, in place: the same
    inference output, and training that continues the same moving average (momentum turned to the
    layer's direction, epsilon copied)."""
    state = keras_state if isinstance(keras_state, KerasBatchNorm) else KerasBatchNorm.of(keras_state)
    c = layer.num_features
    if state.moving_mean.shape != (c,):
        raise ValueError(f"the Keras layer has {state.moving_mean.shape[0]} channels, {type(layer).__name__} {c}")
    if state.gamma is not None and layer.weight is None:
        raise ValueError("the Keras layer learns γ (scale=True); the target has affine=False")
    keras_layer = getattr(layer, "convention", "torch") == "keras"
    with torch.no_grad():
        def put(tensor, values, default):
            if tensor is not None:
                tensor.copy_(torch.as_tensor(values if values is not None else default, dtype=tensor.dtype))
        put(layer.weight, state.gamma, np.ones(c))
        if layer.bias is not None:
            put(layer.bias, state.beta, np.zeros(c))
        elif state.beta is not None and np.any(state.beta != 0):
            raise ValueError("the Keras layer learns β (center=True); the target has no bias")
        put(layer.running_mean, state.moving_mean, None)
        put(layer.running_var, state.moving_variance, None)
    layer.eps = state.epsilon
    layer.momentum = state.momentum if keras_layer else keras_momentum_to_torch(state.momentum)
    return layer


def to_keras(layer: nn.Module) -> KerasBatchNorm:
    """A ``torch.nn`` or ``bnlab.nn`` batch norm as Keras' state (``layer.set_weights(state.weights())`` with
    ``momentum=state.momentum, epsilon=state.epsilon``): the same inference output in Keras."""
    if layer.running_mean is None:
        raise ValueError("a batch norm without running statistics has nothing for Keras' moving averages")
    if layer.momentum is None:
        warnings.warn("momentum=None (a cumulative average) has no Keras equivalent; exporting torch's default 0.1 "
                      "(Keras 0.9)", UserWarning, stacklevel=2)
    momentum = layer.momentum if layer.momentum is not None else 0.1
    keras_layer = getattr(layer, "convention", "torch") == "keras"

    def array(t):
        return None if t is None else t.detach().cpu().double().numpy().astype(np.float32)

    return KerasBatchNorm(array(layer.running_mean), array(layer.running_var), array(layer.weight),
                          array(layer.bias), momentum if keras_layer else torch_momentum_to_keras(momentum),
                          float(layer.eps))
