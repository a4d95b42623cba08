"""The errors a user can cause and fix: what the ``bnlab`` command reports as one line (exit code 2);
and the stop that Ctrl-C or SIGTERM asks for.

Anything else that escapes a command is a bug and keeps its traceback. A bottom-layer module
(standard library only), so every layer may raise these and the command can catch them without
importing the layers that raise them.
"""

from __future__ import annotations

import signal

__all__ = ["BnlabError", "UsageError", "StopRequested", "EXTRAS"]

# optional dependencies, by the extra that installs them (pip install 'bnlab[EXTRA]')
EXTRAS = {"tqdm": "lab", "matplotlib": "lab", "ninja": "lab", "fastapi": "web", "uvicorn": "web",
          "starlette": "web", "websockets": "web", "ray": "ray"}


class BnlabError(Exception):
    """Something the user can put right (an argument, a file, a full disk); the message says what and how."""


class UsageError(BnlabError, ValueError):
    """A bad argument, setting or combination of them (a ValueError too, for callers that catch those)."""


class StopRequested(Exception):
    """Training stopped at a step boundary because of Ctrl-C or SIGTERM (``signum``); state was saved."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum
