"""``KEY=VALUE`` overrides of a preset's model and training config: the user's own question.

Every field of :class:`~bnlab.models.ModelSpec` and :class:`~bnlab.train.TrainConfig`
can be set by name, except the few that have their own option (``norm`` is what
``--variants`` varies; ``dataset`` and ``bf16`` have flags). Values are parsed by
the field's type (``hidden=512,256``, ``bias_before_norm=false``,
``norm_momentum=none``) and then validated by the config classes themselves, so
an override can never build a config that a preset could not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from bnlab.errors import UsageError
from bnlab.models.spec import ModelSpec
from bnlab.train.config import TrainConfig

__all__ = ["parse_settings", "apply_settings", "settable_fields"]

# fields with an option of their own, so that one thing is set in one place
_OWN_OPTION = {"norm": "--variants", "dataset": "--dataset", "bf16": "--bf16"}


def settable_fields() -> dict[str, tuple[str, str, object]]:
    """``{name: (part, type, default)}`` for every settable field; ``part`` is ``model`` or ``train``."""
    out = {}
    for part, cls in (("model", ModelSpec), ("train", TrainConfig)):
        for f in dataclasses.fields(cls):
            if f.name in _OWN_OPTION:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.name] = (part, str(f.type), default)
    return out



def _valid_keys() -> str:
    fields = settable_fields()
    return "; ".join(f"{part}: " + ", ".join(k for k, (p, _, _) in fields.items() if p == part)
                     for part in ("model", "train"))


def _parse_value(key: str, kind: str, text: str):
    def fail(expected: str):
        raise UsageError(f"--set {key}={text}: expected {expected}")

    stripped = text.strip()
    if "None" in kind and stripped.lower() in ("none", "null", ""):
        return None
    if kind.startswith("tuple"):
        parts = [p for p in stripped.strip("()[]").replace(" ", "").split(",") if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            fail("comma-separated integers, e.g. 512,256")
    if kind.startswith("bool"):
        lowered = stripped.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        fail("true or false")
    if kind.startswith("int"):
        try:
            return int(stripped)
        except ValueError:
            fail("an integer")
    if kind.startswith("float"):
        try:
            return float(stripped)
        except ValueError:
            fail("a number")
    return stripped


def parse_settings(pairs: Iterable[str]) -> dict[str, object]:
    """``["lr=0.5", "activation=sigmoid"]`` -> ``{"lr": 0.5, "activation": "sigmoid"}``, typed by field."""
    fields = settable_fields()
    settings: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        if key in _OWN_OPTION:
            raise UsageError(f"--set {key}: use {_OWN_OPTION[key]} for that")
        if key not in fields:
            raise UsageError(f"--set: unknown key {key!r}; valid keys are {_valid_keys()}")
        settings[key] = _parse_value(key, fields[key][1], text)
    return settings


def apply_settings(spec: ModelSpec, cfg: TrainConfig, settings: dict[str, object]) -> tuple[ModelSpec, TrainConfig]:
    """The preset's ``spec`` and ``cfg`` with ``settings`` applied (validated by the config classes)."""
    fields = settable_fields()
    model = {k: v for k, v in settings.items() if fields[k][0] == "model"}
    train = {k: v for k, v in settings.items() if fields[k][0] == "train"}
    # a training length given one way replaces the preset's, given the other way
    if "steps" in train and "epochs" not in train:
        train["epochs"] = None
    if "epochs" in train and "steps" not in train:
        train["steps"] = None
    try:
        return spec.with_(**model), cfg.with_(**train)
    except ValueError as exc:
        raise UsageError(f"--set: {exc}") from None
