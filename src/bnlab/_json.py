"""JSON that every parser accepts: the one place bnlab turns NaN and infinities into ``null``.

Python's ``json.dumps`` writes non-finite floats as bare ``NaN``/``Infinity`` tokens, which strict
parsers (and every language but Python's) reject, and its ``default`` hook is never called for
floats. A bottom-layer module (standard library only), so every layer may use it.
"""

from __future__ import annotations

import json
import math

__all__ = ["strict_json", "dumps"]


def strict_json(value):
    """``value`` with NaN and infinities (in any nested dict, list or tuple) as ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """``json.dumps`` of :func:`strict_json` of ``value``; raises if anything non-finite is left."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)
