"""The WebSocket protocol: every message the browser may send, validated before anything acts on it.

Messages are JSON objects with a ``type``. A message that is not valid JSON, is
larger than :data:`MAX_MESSAGE_BYTES`, has an unknown type, an unknown or
missing key, a value of the wrong type or out of its range is answered with
``{"type": "error", "message": ...}`` and changes nothing. The full protocol,
both directions, is in ``docs/web-protocol.md``.

Browser → server:

========== ================================================== ===========================================
type       keys                                               effect
========== ================================================== ===========================================
settings   ``values``: a partial :data:`SETTINGS` object       change controls (see ``LIVE``: applied to the
                                                              running networks; others rebuild them)
command    ``action``: ``start`` | ``pause`` | ``reset``       run, pause, or rebuild from the settings
view       ``view``: a :data:`VIEWS` name, ``id``: int,        compute one view's data for this session's
           ``params``: that view's parameters                  networks; answered with the same ``id``
ping       ``id``: int                                        answered with ``pong`` (latency checks)
========== ================================================== ===========================================
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from bnlab.nn.factory import NORM_KINDS

__all__ = ["MAX_MESSAGE_BYTES", "SETTINGS", "LIVE", "VIEWS", "ProtocolError", "default_settings",
           "parse_message", "check_settings"]

MAX_MESSAGE_BYTES = 4096
GHOST_SIZE = 32  # the ghost-batch size of the app's ghost batch norm


class ProtocolError(ValueError):
    """A message the server refuses; its text is sent back to the page."""


@dataclass(frozen=True)
class Field:
    """One allowed value: a choice among ``choices``, or a number in ``[low, high]`` (``integer``: int)."""

    default: object
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    integer: bool = False

    def check(self, name: str, value):
        if self.choices:
            if not isinstance(value, str) or value not in self.choices:
                raise ProtocolError(f"{name} must be one of {list(self.choices)}, got {value!r}")
            return value
        # bool is an int in Python; a checkbox sent where a number belongs is an error, not 0/1
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{name} must be a number, got {value!r}")
        if self.integer and not (isinstance(value, int) or float(value).is_integer()):
            raise ProtocolError(f"{name} must be an integer, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int with hundreds of digits
            number = math.inf
        if not math.isfinite(number) or not self.low <= number <= self.high:
            raise ProtocolError(f"{name} must be in [{self.low:g}, {self.high:g}], got {value!r}")
        return int(value) if self.integer else float(value)


# The training controls. Names and ranges are the page's; ``norm`` is the kind the second network uses.
SETTINGS: dict[str, Field] = {
    "dataset": Field("mnist", choices=("mnist", "fashion")),
    "arch": Field("mlp", choices=("mlp", "cnn")),
    "depth": Field(3, low=1, high=6, integer=True),
    "width": Field(100, low=4, high=512, integer=True),
    "activation": Field("sigmoid", choices=("sigmoid", "tanh", "relu")),
    "norm": Field("batch", choices=NORM_KINDS),
    "placement": Field("before", choices=("before", "after")),
    "bn_momentum": Field(0.1, low=0.0, high=1.0),
    "eps": Field(1e-5, low=1e-8, high=1.0),
    "dropout": Field(0.0, low=0.0, high=0.9),
    "lr": Field(0.5, low=1e-4, high=10.0),
    "optimizer": Field("sgd", choices=("sgd", "adam")),
    "batch_size": Field(60, low=2, high=1024, integer=True),
    "init": Field("normal", choices=("normal", "torch", "glorot")),
    "init_scale": Field(1.0, low=1e-3, high=10.0),
    "seed": Field(0, low=0, high=2**31 - 1, integer=True),
}
# Applied to the networks as they train; any other setting rebuilds both networks from the seed.
LIVE = frozenset({"bn_momentum", "eps", "dropout", "lr", "optimizer", "batch_size"})

# Each view's parameters (all required, so a reply never depends on a hidden default).
VIEWS: dict[str, dict[str, Field]] = {
    # View 1: BN step by step on one feature of a batch, from a live layer or a synthetic distribution.
    "bn_step": {
        "source": Field("synthetic", choices=("synthetic", "live")),
        "batch_size": Field(32, low=2, high=1024, integer=True),
        "gamma": Field(1.0, low=-100.0, high=100.0),  # wide enough for γ = √(σ²+ε) of a live layer
        "beta": Field(0.0, low=-100.0, high=100.0),
        "eps": Field(1e-5, low=1e-8, high=10.0),
        "mean": Field(2.0, low=-10.0, high=10.0),
        "spread": Field(1.5, low=0.01, high=10.0),
        "skew": Field(0.0, low=-0.99, high=0.99),
        "outliers": Field(0.0, low=0.0, high=0.5),
        "layer": Field(0, low=0, high=5, integer=True),
        "unit": Field(0, low=0, high=511, integer=True),
        "seed": Field(0, low=0, high=2**31 - 1, integer=True),
    },
    # View 3: batch vs running statistics, and eval vs train mode accuracy against the evaluation batch size.
    "train_vs_eval": {"layer": Field(0, low=0, high=5, integer=True)},
    # View 4: loss surface of both networks around their weights, with the recent optimizer path.
    "landscape": {
        "radius": Field(1.0, low=0.05, high=3.0),
        "points": Field(15, low=5, high=25, integer=True),
        "seed": Field(0, low=0, high=2**31 - 1, integer=True),
    },
}

_ACTIONS = ("start", "pause", "reset")
_KEYS = {"settings": {"type", "values"}, "command": {"type", "action"}, "view": {"type", "view", "id", "params"},
         "ping": {"type", "id"}}
_ID = Field(0, low=0, high=2**53, integer=True)


def default_settings() -> dict:
    return {name: f.default for name, f in SETTINGS.items()}


def _check_object(fields: dict[str, Field], values, what: str, *, partial: bool) -> dict:
    if not isinstance(values, dict):
        raise ProtocolError(f"{what} must be an object")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ProtocolError(f"unknown {what} key {unknown[0]!r}; allowed: {sorted(fields)}")
    missing = sorted(set(fields) - set(values))
    if missing and not partial:
        raise ProtocolError(f"{what} misses {missing[0]!r}")
    return {name: fields[name].check(name, value) for name, value in values.items()}


def check_settings(values, current: dict | None = None) -> dict:
    """``current`` updated with the validated partial ``values``; also checks combinations."""
    changes = _check_object(SETTINGS, values, "settings", partial=True)
    merged = {**(current or default_settings()), **changes}
    if merged["norm"] == "instance" and merged["arch"] != "cnn":
        raise ProtocolError("instance norm normalizes over an image's height and width: choose the CNN for it")
    if merged["norm"] == "ghost" and merged["batch_size"] > GHOST_SIZE and merged["batch_size"] % GHOST_SIZE:
        raise ProtocolError(f"ghost batch norm splits each batch into ghost batches of {GHOST_SIZE}: "
                            f"choose a batch size of at most {GHOST_SIZE} or a multiple of it")
    return merged


def parse_message(text: str | bytes) -> dict:
    """The validated message, with ``params`` / ``values`` converted (ints as int, numbers as float)."""
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message too large ({len(text)} bytes; at most {MAX_MESSAGE_BYTES})")
    try:
        message = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or message.get("type") not in _KEYS:
        raise ProtocolError(f"a message is an object whose type is one of {sorted(_KEYS)}")
    kind = message["type"]
    keys = set(message)
    if keys != _KEYS[kind]:
        extra, missing = sorted(keys - _KEYS[kind]), sorted(_KEYS[kind] - keys)
        raise ProtocolError(f"{kind}: " + (f"unknown key {extra[0]!r}" if extra else f"missing key {missing[0]!r}"))
    if kind == "settings":
        # combinations are checked against the session's current settings by the job
        return {"type": kind, "values": _check_object(SETTINGS, message["values"], "settings", partial=True)}
    if kind == "command":
        if message["action"] not in _ACTIONS:
            raise ProtocolError(f"action must be one of {list(_ACTIONS)}, got {message['action']!r}")
        return {"type": kind, "action": message["action"]}
    if kind == "ping":
        return {"type": kind, "id": _ID.check("id", message["id"])}
    view = message["view"]
    if not isinstance(view, str) or view not in VIEWS:
        raise ProtocolError(f"view must be one of {sorted(VIEWS)}, got {view!r}")
    return {"type": kind, "view": view, "id": _ID.check("id", message["id"]),
            "params": _check_object(VIEWS[view], message["params"], f"{view} params", partial=False)}
