"""Train K models of one architecture as one: same batches, independent weights, one fused step.

:class:`StackedModel` takes K ``nn.Sequential`` models built by
:func:`~bnlab.models.spec.build_model` (one per seed) and runs them together:

* activations are laid out ``(B, K, C)`` for vectors and ``(B, K*C, H, W)`` for
  images, so model k's channels are a contiguous block;
* the input is either shared (``(B, ...)``: every model sees the same batch, as
  at evaluation) or per model (``(B, K, ...)``: model k's own batch, as in
  training where each seed draws its own batch order). A shared input makes the
  first linear/conv layer one wide matmul (or conv) with the K weight matrices
  concatenated; a per-model input makes it a batched matmul (grouped conv);
* later linear layers are one batched matmul over K; later convolutions are
  one grouped convolution with ``groups=K``;
* batch norm over ``(B, K*C)`` (or ``(B, K*C, H, W)``) is per (model,
  channel): exactly the statistics K separate models would have, and one
  running buffer of size K*C holds all K models' running statistics.

Model k of a stacked run therefore computes what model k alone would, up to
float32 summation order. Only dropout differs: its random masks are drawn for
the stack at once, so with dropout a stacked model is equal in distribution,
not bitwise, to a separate run.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.functional import scale_shift
from bnlab.nn.frozen import _FrozenBatchNorm

__all__ = ["StackedModel"]

_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity, nn.MaxPool2d)
_NORMS = (_BatchNorm, _FrozenBatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


class StackedLinear(nn.Module):
    """K linear layers: ``(B, in) -> (B, K, out)`` (shared input) or ``(B, K, in) -> (B, K, out)``.

    ``shared_input`` chooses the weight layout for the input the layer mostly sees
    (the other kind of input works too, at the cost of one weight copy per call).

    Weights are stored input-major, ``(in, K, out)`` when the input is shared and
    ``(K, in, out)`` otherwise, so that the forward pass is ``x @ W`` and the
    shared layer's K weight blocks are one matrix, with no transpose anywhere
    (measured: speed-neutral against the ``(K, out, in)`` layout of ``nn.Linear``).
    """

    def __init__(self, layers: list[nn.Linear], shared_input: bool):
        super().__init__()
        self.shared_input = shared_input
        weights = torch.stack([l.weight.detach().t() for l in layers])  # (K, in, out)
        if shared_input:
            weights = weights.transpose(0, 1)  # (in, K, out)
        self.weight = nn.Parameter(weights.contiguous())
        has_bias = layers[0].bias is not None
        # registered even when absent (as nn.Linear does), so `bias` is always looked up in _parameters
        self.register_parameter("bias", nn.Parameter(torch.stack([l.bias.detach() for l in layers]).clone())
                                if has_bias else None)
        self.compute_weight: Tensor | None = None  # see _training_weight
        self.compute_weight_version = -1
        self._wide_cache: dict | None = None  # see _wide_weight

    def forward(self, x: Tensor) -> Tensor:
        weight = _training_weight(self)
        if x.dim() == 2:  # one input for all K models
            if self.shared_input:
                inp, k, out = weight.shape
                wide = weight.view(inp, k * out)
            else:  # a per-model first layer evaluated on a shared batch (the test set)
                k, inp, out = weight.shape
                wide = self._wide_weight(weight)
            y = x @ wide if self.bias is None else torch.addmm(self.bias.view(k * out), x, wide)
            return y.view(len(x), k, out)
        if self.shared_input:
            weight = weight.transpose(0, 1)  # (K, in, out), strided
        xk = x.transpose(0, 1)  # (K, B, in)
        if self.bias is None:
            y = torch.bmm(xk, weight)
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), xk, weight)
        return y.transpose(0, 1).contiguous()  # (B, K, out): the next norm views it as (B, K*out)

    def _wide_weight(self, weight: Tensor) -> Tensor:
        """``(K, in, out)`` as one ``(in, K*out)`` matrix, in the dtype the matmul will use.

        Inside :meth:`StackedModel.reusing_weights` (an evaluation going through the test set in
        chunks, weights fixed) the copy is made once and reused; otherwise it is made per call.
        (Version counters cannot tell when to remake it: torch's fused optimizers update weights
        without bumping them.)"""
        k, inp, out = weight.shape
        if self._wide_cache is None:
            return weight.transpose(0, 1).reshape(inp, k * out)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
        if dtype not in self._wide_cache:
            self._wide_cache[dtype] = weight.transpose(0, 1).reshape(inp, k * out).to(dtype)
        return self._wide_cache[dtype]

    def unstacked(self, k: int) -> dict[str, Tensor]:
        w = self.weight[:, k] if self.shared_input else self.weight[k]
        d = {"weight": w.t()}
        if self.bias is not None:
            d["bias"] = self.bias[k]
        return d


class StackedConv2d(nn.Module):
    """K convolutions as one: shared input ``(B, in, H, W)`` or grouped ``(B, K*in, H, W)``; out ``(B, K*out, H', W')``."""

    def __init__(self, layers: list[nn.Conv2d], shared_input: bool):
        super().__init__()
        proto = layers[0]
        if proto.groups != 1 or proto.padding_mode != "zeros":
            raise TypeError("only groups=1, zero-padded convolutions can be stacked")
        self.shared_input = shared_input
        self.k = len(layers)
        self.stride, self.padding, self.dilation = proto.stride, proto.padding, proto.dilation
        self.weight = nn.Parameter(torch.stack([l.weight.detach() for l in layers]).clone())  # (K, out, in, kh, kw)
        has_bias = proto.bias is not None
        self.register_parameter("bias", nn.Parameter(torch.stack([l.bias.detach() for l in layers]).clone())
                                if has_bias else None)
        self.compute_weight: Tensor | None = None  # see _training_weight
        self.compute_weight_version = -1

    def forward(self, x: Tensor) -> Tensor:
        k, out = self.weight.shape[:2]
        weight = _training_weight(self)
        weight = weight.reshape(k * out, *weight.shape[2:])
        bias = None if self.bias is None else self.bias.reshape(k * out)
        groups = 1 if x.shape[1] == weight.shape[1] else k  # a shared input has `in` channels, else K*in
        return nn.functional.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def unstacked(self, k: int) -> dict[str, Tensor]:
        d = {"weight": self.weight[k]}
        if self.bias is not None:
            d["bias"] = self.bias[k]
        return d


def _training_weight(layer: nn.Module) -> Tensor:
    """The weight a stacked layer computes with: its parameter, or, when training under autocast, the
    bf16 copy that a master-weight optimizer (``bnlab.train.mixed_precision``) keeps in step with it,
    so that the matmuls skip autocast's per-step cast. Evaluation, and any forward outside autocast,
    read the parameter itself. A parameter changed behind the optimizer's back (``load_state_dict``,
    an in-place edit) has a new version counter: the copy is re-rounded from it before use."""
    shadow = layer.compute_weight
    if (shadow is None or not layer.training or not torch.is_autocast_enabled("cpu")
            or torch.get_autocast_dtype("cpu") != shadow.dtype):
        return layer.weight
    if layer.weight._version != layer.compute_weight_version:
        with torch.no_grad():
            shadow.copy_(layer.weight)
        layer.compute_weight_version = layer.weight._version
    return shadow


class StackedNorm(nn.Module):
    """K normalization layers as one over ``(B, K, C)`` or ``(B, K*C, H, W)``.

    Channel-wise norms (the batch-norm family, frozen batch norm, instance norm,
    group norm) become one layer of K*C channels (group norm: K*G groups, so
    no group straddles two models). Layer norm over the features of each
    model keeps the ``(B, K, C)`` layout and a ``(K, C)`` affine.
    """

    _PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        proto = layers[0]
        self.k = len(layers)
        self.layer_norm = isinstance(proto, nn.LayerNorm)
        if self.layer_norm:
            if len(proto.normalized_shape) != 1:
                raise TypeError("only layer norm over the last dim can be stacked")
            self.c, self.eps = proto.normalized_shape[0], proto.eps
            self.weight = _stack_param([l.weight for l in layers])
            self.bias = _stack_param([l.bias for l in layers])
            return
        self.c = proto.num_channels if isinstance(proto, nn.GroupNorm) else proto.num_features
        self.norm = copy.deepcopy(proto)  # same class and options (convention, eps, momentum, ...)
        if isinstance(proto, nn.GroupNorm):
            self.norm.num_groups, self.norm.num_channels = self.k * proto.num_groups, self.k * self.c
        else:
            self.norm.num_features = self.k * self.c
        for name in self._PER_CHANNEL:
            value = getattr(proto, name, None)
            if value is None:
                continue
            stacked = torch.cat([getattr(l, name).detach() for l in layers]).clone()
            if isinstance(value, nn.Parameter):
                setattr(self.norm, name, nn.Parameter(stacked))
            else:
                self.norm.register_buffer(name, stacked)

    def forward(self, x: Tensor) -> Tensor:
        if self.layer_norm:  # (B, K, C): per (sample, model) over C
            y = nn.functional.layer_norm(x, (self.c,), None, None, self.eps)
            if self.weight is not None:
                y = y * self.weight
            return y + self.bias if self.bias is not None else y
        if x.dim() == 3:  # (B, K, C)
            b = len(x)
            return self.norm(x.reshape(b, self.k * self.c)).view(b, self.k, self.c)
        return self.norm(x)

    def unstacked(self, k: int) -> dict[str, Tensor]:
        if self.layer_norm:
            return {name: getattr(self, name)[k] for name in ("weight", "bias") if getattr(self, name) is not None}
        block = slice(k * self.c, (k + 1) * self.c)
        d = {name: getattr(self.norm, name)[block] for name in self._PER_CHANNEL
             if getattr(self.norm, name, None) is not None}
        if getattr(self.norm, "num_batches_tracked", None) is not None:
            d["num_batches_tracked"] = self.norm.num_batches_tracked
        return d


def _stack_param(tensors: list[Tensor | None]) -> nn.Parameter | None:
    if tensors[0] is None:
        return None
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


class StackedFlatten(nn.Module):
    """``(B, K*C, H, W) -> (B, K, C*H*W)``: model k's features in its own block, in (C, H, W) order."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(len(x), self.k, -1)


class StackedModel(nn.Module):
    """K ``nn.Sequential`` models of identical architecture, trained as one.

    ``forward(x)`` takes a batch shared by all models, ``(B, ...)``, and
    ``forward(x, per_model=True)`` one batch per model, ``(B, K, ...)``; both return
    logits ``(B, K, classes)``. ``shared_input`` says which of the two training
    will use, to lay the first layer's weights out for it.
    :meth:`write_back` copies the trained state into the K original modules.
    """

    def __init__(self, models: list[nn.Sequential], shared_input: bool = True):
        super().__init__()
        if not models:
            raise ValueError("need at least one model")
        self.k = len(models)
        self._source_models = models  # plain list: not registered as submodules
        if self.k == 1:
            # Nothing to stack: train the model itself, without batched-matmul overhead.
            self.layers = models[0]
            return
        layers: list[nn.Module] = []
        shared = shared_input  # until the first layer with weights: the layout training feeds it
        self._first_weighted = None
        for index, group in enumerate(zip(*[list(m) for m in models], strict=True)):
            proto = group[0]
            if any(type(m) is not type(proto) for m in group):
                raise TypeError(f"layer {index}: models differ in architecture ({[type(m).__name__ for m in group]})")
            if isinstance(proto, (nn.Linear, nn.Conv2d)):
                stacked_type = StackedLinear if isinstance(proto, nn.Linear) else StackedConv2d
                layers.append(stacked_type(list(group), shared))
                if self._first_weighted is None:
                    self._first_weighted = index
                shared = False
            elif isinstance(proto, _NORMS):
                if self._first_weighted is None:
                    raise TypeError("a norm before the first linear/conv layer cannot be stacked")
                layers.append(StackedNorm(list(group)))
            elif isinstance(proto, nn.Flatten):
                layers.append(nn.Flatten() if self._first_weighted is None else StackedFlatten(self.k))
            elif isinstance(proto, _ELEMENTWISE):
                layers.append(copy.deepcopy(proto))
            else:
                raise TypeError(f"layer {index}: cannot stack {type(proto).__name__}")
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor, per_model: bool = False) -> Tensor:
        if self.k == 1:
            return self.layers(x[:, 0] if per_model else x).unsqueeze(1)
        if not per_model:
            return self.layers(x)
        # (B, K, ...): the layers before the first weighted one (a flatten) act per model,
        # and a first convolution takes model k's image as its channel block k.
        for index, layer in enumerate(self.layers):
            if index < self._first_weighted:
                x = x.flatten(2) if isinstance(layer, nn.Flatten) else layer(x)
                continue
            if index == self._first_weighted and isinstance(layer, StackedConv2d):
                x = x.flatten(1, 2)
            x = layer(x)
        return x

    @contextlib.contextmanager
    def reusing_weights(self):
        """Within this block the weights do not change (an evaluation): layers may reuse what they
        derive from them, such as the first layer's wide copy for a shared input."""
        layers = [m for m in self.modules() if isinstance(m, StackedLinear)]
        for layer in layers:
            layer._wide_cache = {}
        try:
            yield
        finally:
            for layer in layers:
                layer._wide_cache = None

    @torch.no_grad()
    def inference_copy(self, dtype: torch.dtype = torch.float32) -> StackedModel:
        """A copy for evaluating on a shared input, built once per evaluation: cheaper, same function.

        Every batch norm that directly follows a linear layer or convolution and, in eval mode,
        normalizes with running statistics (BN, batch renorm, ghost BN, frozen BN, either
        convention) is a fixed per-channel ``y = x * scale + shift``
        (:func:`bnlab.functional.scale_shift`); it is folded into that layer (``W * scale``,
        ``b * scale + shift``) and removed. Every weight is cast to ``dtype`` here, once, rather than
        by autocast on every call, and the first layer of a per-model stack gets its wide
        ``(in, K*out)`` layout. The copy computes what ``self.eval()`` does up to rounding (the fold
        reassociates one multiply; ``dtype`` rounds the weights), shares no parameter with ``self``
        and does not follow later training. Other layers (activations, dropout, the other norms)
        are shared with ``self``: call it in eval mode.
        """
        layers = list(self.layers)
        copied, index = [], 0
        while index < len(layers):
            layer = layers[index]
            norm = _foldable_norm(layers[index + 1]) if index + 1 < len(layers) and _is_weighted(layer) else None
            if _is_weighted(layer):
                layer = _inference_layer(layer, norm, dtype, first=self.k > 1 and index == self._first_weighted)
            copied.append(layer)
            index += 2 if norm is not None else 1
        inference = copy.copy(self)
        inference._modules = {"layers": nn.Sequential(*copied)}
        return inference

    @torch.no_grad()
    def write_back(self) -> list[nn.Sequential]:
        """Copy parameters and buffers of model k into the k-th source model; return them."""
        if self.k == 1:
            return self._source_models  # trained in place
        for stacked, *originals in zip(self.layers, *[list(m) for m in self._source_models]):
            if not hasattr(stacked, "unstacked"):
                continue
            for k, original in enumerate(originals):
                for name, value in stacked.unstacked(k).items():
                    getattr(original, name).copy_(value)
        return self._source_models


def _is_weighted(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Linear, nn.Conv2d, StackedLinear, StackedConv2d))


def _foldable_norm(layer: nn.Module) -> nn.Module | None:
    """The batch norm inside ``layer`` if, in eval mode, it is a fixed per-channel affine map, else None."""
    norm = layer.norm if isinstance(layer, StackedNorm) and not layer.layer_norm else layer
    if isinstance(norm, (_BatchNorm, _FrozenBatchNorm)) and norm.running_mean is not None \
            and norm.running_var is not None:
        return norm
    return None


def _output_channel_shapes(layer: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """How a vector over the layer's output channels (model-major when stacked) views against its
    weight and its bias."""
    w = layer.weight
    if isinstance(layer, StackedLinear):  # (in, K, out) or (K, in, out)
        k, out = w.shape[1 if layer.shared_input else 0], w.shape[2]
        return ((1, k, out) if layer.shared_input else (k, 1, out)), (k, out)
    if isinstance(layer, StackedConv2d):  # (K, out, in, kh, kw)
        return (*w.shape[:2], 1, 1, 1), tuple(w.shape[:2])
    return (w.shape[0], *[1] * (w.dim() - 1)), (w.shape[0],)  # nn.Linear / nn.Conv2d: (out, in, ...)


def _inference_layer(layer: nn.Module, norm: nn.Module | None, dtype: torch.dtype, first: bool) -> nn.Module:
    """A shallow copy of a weighted ``layer`` with its own weight and bias: ``norm`` folded in, cast to ``dtype``."""
    weight, bias = layer.weight, layer.bias
    if norm is not None:
        weight_view, bias_shape = _output_channel_shapes(layer)
        scale, shift = scale_shift(norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
        weight = weight * scale.view(weight_view)
        bias = shift.view(bias_shape) if bias is None else bias * scale.view(bias_shape) + shift.view(bias_shape)
    copied = copy.copy(layer)
    if isinstance(layer, (StackedLinear, StackedConv2d)):
        copied.compute_weight = None  # no bf16 training shadow: the copy computes with its own weight
    if isinstance(layer, StackedLinear):
        copied._wide_cache = None
        if first and not layer.shared_input:  # the layout a shared input multiplies with directly
            weight, copied.shared_input = weight.transpose(0, 1), True
    copied._parameters = {"weight": weight.to(dtype, memory_format=torch.contiguous_format, copy=True),
                          "bias": None if bias is None else bias.to(dtype, copy=True)}
    return copied


def per_model_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of each of the K models: ``(B, K, classes)`` and targets ``(B,)`` shared or
    ``(B, K)`` per model ``-> (K,)``."""
    b, k, _ = logits.shape
    target = target.unsqueeze(1).expand(b, k) if target.dim() == 1 else target
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return losses.mean(dim=0)
