"""Model specifications (plain data) and the builder that turns one into an ``nn.Sequential``.

A :class:`ModelSpec` says everything the experiments vary: widths, activation,
which normalization and where it goes relative to the activation, dropout and
its position, whether the bias before a norm is kept, and the initialization.
Builders produce plain ``nn.Sequential`` models of standard layers, so any
torch tool works on them, and :mod:`bnlab.models.fused` can stack K of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

import bnlab.nn as bnn

__all__ = ["ModelSpec", "build_model", "ACTIVATIONS", "NORMS"]

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
NORMS = bnn.NORM_KINDS
_BATCH_STAT_NORMS = ("batch", "renorm", "ghost")  # the kinds with a convention (momentum direction)
_MEAN_SUBTRACTING = ("batch", "renorm", "ghost", "layer", "group", "instance")  # make a preceding bias redundant


@dataclass(frozen=True)
class ModelSpec:
    """What to build.

    Attributes:
        arch: ``"mlp"`` (input flattened to 784) or ``"cnn"`` (input ``(1, 28, 28)``).
        hidden: MLP hidden widths, or the CNN's dense widths after the convolutions.
        conv_channels: CNN 3x3 "valid" convolutions, each followed by 2x2 max-pooling.
        activation: ``relu``, ``sigmoid`` or ``tanh``.
        norm: a :data:`bnlab.nn.NORM_KINDS` name (``none``, ``batch``, ``layer``,
            ``group``, ``instance``, ``renorm``, ``ghost``, ``frozen``). ``instance``
            needs a CNN and applies to its convolution blocks only.
        norm_convention: ``torch`` or ``keras`` for the batch-statistics kinds
            (see :class:`bnlab.nn.BatchNorm1d`).
        norm_groups: group count for ``group`` (0: :func:`bnlab.nn.default_groups`).
        virtual_batch_size: ghost-batch size for ``ghost``.
        placement: ``before`` (linear → norm → activation, as Ioffe & Szegedy and
            the seeds recommend) or ``after`` (linear → activation → norm).
        dropout: dropout rate after each hidden block (0 disables it).
        dropout_position: ``after_norm`` (… → norm → act → dropout) or
            ``before_norm`` (dropout placed right before the norm).
        bias_before_norm: keep the linear/conv bias in front of a norm (its
            effect is cancelled by the mean subtraction; seeds 000/003 keep it).
        init: ``torch`` (torch's default), ``glorot`` (Keras' glorot_uniform, zero
            bias) or ``normal`` (N(0, init_scale²), zero bias).
        init_scale: standard deviation for ``init="normal"``.
        norm_momentum: the running-average momentum of the batch-statistics kinds, in
            their convention (None: the convention's default, 0.1 for torch, 0.99 for keras).
        norm_eps: the ε added to the variance (None: the layer's default).
        norm_output: also normalize the logits (seed 000 warns against it).
        classes: number of outputs.
    """

    arch: str = "mlp"
    hidden: tuple[int, ...] = (512, 256)
    conv_channels: tuple[int, ...] = ()
    activation: str = "relu"
    norm: str = "none"
    norm_convention: str = "torch"
    placement: str = "before"
    dropout: float = 0.0
    dropout_position: str = "after_norm"
    bias_before_norm: bool = True
    init: str = "torch"
    init_scale: float = 0.01
    norm_output: bool = False
    classes: int = 10
    norm_groups: int = 0
    virtual_batch_size: int = 32
    norm_momentum: float | None = None
    norm_eps: float | None = None

    def __post_init__(self):
        _check_choice("arch", self.arch, ("mlp", "cnn"))
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_convention", self.norm_convention, tuple(bnn.CONVENTIONS))
        _check_choice("placement", self.placement, ("before", "after"))
        _check_choice("dropout_position", self.dropout_position, ("after_norm", "before_norm"))
        _check_choice("init", self.init, ("torch", "glorot", "normal"))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm == "instance" and self.arch != "cnn":
            raise ValueError("instance norm needs spatial dims: use it with arch='cnn'")
        if self.arch == "cnn" and not self.conv_channels:
            raise ValueError("a cnn needs at least one entry in conv_channels")
        if self.norm_momentum is not None and not 0.0 <= self.norm_momentum <= 1.0:
            raise ValueError(f"norm_momentum must be in [0, 1], got {self.norm_momentum}")
        if self.norm_eps is not None and not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if any(w < 1 for w in (*self.hidden, *self.conv_channels)):
            raise ValueError("widths and channel counts must be positive")

    def with_(self, **changes) -> ModelSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"], d["conv_channels"] = list(self.hidden), list(self.conv_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        d["hidden"] = tuple(d.get("hidden", ()))
        d["conv_channels"] = tuple(d.get("conv_channels", ()))
        return cls(**d)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _norm(spec: ModelSpec, features: int, spatial: bool) -> nn.Module:
    options: dict = {}
    if spec.norm in _BATCH_STAT_NORMS:
        options["convention"] = spec.norm_convention
    if spec.norm == "group" and spec.norm_groups:
        options["num_groups"] = spec.norm_groups
    if spec.norm == "ghost":
        options["virtual_batch_size"] = spec.virtual_batch_size
    if spec.norm == "instance":
        options["affine"] = True  # a learnable scale and shift, like every other kind here
    if spec.norm_momentum is not None and spec.norm in _BATCH_STAT_NORMS:
        options["momentum"] = spec.norm_momentum
    if spec.norm_eps is not None:
        options["eps"] = spec.norm_eps
    return bnn.make_norm(spec.norm, features, spatial=spatial, **options)


def _block(spec: ModelSpec, layer: nn.Module, features: int, spatial: bool) -> list[nn.Module]:
    """linear/conv, then norm and activation in the chosen order, then dropout where asked."""
    act = ACTIVATIONS[spec.activation]()
    if spec.norm == "none":
        parts = [layer, act]
        norm_at = None
    else:
        norm = _norm(spec, features, spatial)
        parts = [layer, norm, act] if spec.placement == "before" else [layer, act, norm]
        norm_at = parts.index(norm)
    if spec.dropout > 0:
        drop = nn.Dropout(spec.dropout)
        if spec.dropout_position == "before_norm" and norm_at is not None:
            parts.insert(norm_at, drop)
        else:
            parts.append(drop)
    return parts


def build_model(spec: ModelSpec, *, seed: int | None = None) -> nn.Sequential:
    """Build the model; with ``seed``, its initialization depends on nothing else, and the global
    random state is left as it was (the layers draw from it, seeded, inside a fork)."""
    if seed is None:
        return _build(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(spec)


def _build(spec: ModelSpec) -> nn.Sequential:
    layers: list[nn.Module] = []
    keep_bias = spec.norm not in _MEAN_SUBTRACTING or spec.bias_before_norm or spec.placement == "after"
    if spec.arch == "mlp":
        layers.append(nn.Flatten())
        width = 28 * 28
    else:
        channels, side = 1, 28
        for out in spec.conv_channels:
            conv = nn.Conv2d(channels, out, 3, bias=keep_bias)
            layers += _block(spec, conv, out, spatial=True)
            layers.append(nn.MaxPool2d(2))
            channels, side = out, (side - 2) // 2
        layers.append(nn.Flatten())
        width = channels * side * side
    # Instance norm has nothing to normalize over after a dense layer: those blocks go without.
    dense_spec = spec.with_(norm="none") if spec.norm == "instance" else spec
    dense_bias = keep_bias or dense_spec.norm == "none"
    for hidden in spec.hidden:
        layers += _block(dense_spec, nn.Linear(width, hidden, bias=dense_bias), hidden, spatial=False)
        width = hidden
    layers.append(nn.Linear(width, spec.classes))
    if spec.norm_output and spec.norm not in ("none", "instance"):
        layers.append(_norm(spec, spec.classes, spatial=False))
    model = nn.Sequential(*layers)
    _initialize(model, spec)
    return model


def _initialize(model: nn.Module, spec: ModelSpec) -> None:
    if spec.init == "torch":
        return
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if spec.init == "glorot":
                nn.init.xavier_uniform_(m.weight)  # = Keras glorot_uniform (fan_in + fan_out)
            else:
                nn.init.normal_(m.weight, 0.0, spec.init_scale)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

