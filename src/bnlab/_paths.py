"""Where bnlab keeps files of its own: the one place the XDG base-directory rule is written.

The bottom layer of the package: it imports only the standard library, so the library
(``bnlab.functional``), the lab and the interfaces may all use it.

The rule, for an entry ``name`` with an override variable ``env``:

1. ``$env``, if set and not empty (a leading ``~`` is expanded): the entry's path itself;
2. else ``$XDG_CACHE_HOME/bnlab/<name>`` (caches) or ``$XDG_DATA_HOME/bnlab/<name>``
   (data to keep), if that variable is set and not empty;
3. else ``~/.cache/bnlab/<name>`` or ``~/.local/share/bnlab/<name>``.

Every variable is read at call time, so a changed environment takes effect at the next call.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["user_cache_path", "user_data_path"]


def _override(env: str | None) -> Path | None:
    value = os.environ.get(env) if env else None
    return Path(value).expanduser() if value else None


def user_cache_path(name: str, env: str | None = None) -> Path:
    """``$env``, else ``$XDG_CACHE_HOME/bnlab/<name>``, else ``~/.cache/bnlab/<name>``.

    For what can be rebuilt or downloaded again (compiled kernels, datasets). ``name`` may be a
    directory or a file name; ``$env`` names that entry itself, not its parent.
    """
    override = _override(env)
    if override is not None:
        return override
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnlab" / name


def user_data_path(name: str, env: str | None = None) -> Path:
    """``$env``, else ``$XDG_DATA_HOME/bnlab/<name>``, else ``~/.local/share/bnlab/<name>``.

    For what must be kept (the run store). ``name`` may be a directory or a file name; ``$env``
    names that entry itself, not its parent.
    """
    override = _override(env)
    if override is not None:
        return override
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "bnlab" / name
