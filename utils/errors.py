"""The user errors of the library, under the one root :class:`model.InputError`.

A front end catches ``InputError`` alone and reports it as one line (``utils/cli.py:fail``); a
server answers it with a status and the message. Model errors (``CheckpointError``,
``WeightsError``, ``ConfigError``) share the root.
"""
from __future__ import annotations

import re

from model import InputError

__all__ = ["InputError", "UsageError", "DataError", "OutputError"]


class UsageError(InputError, ValueError):
    """A setting or an input that cannot be used, found before any model work where possible."""


class DataError(InputError, ValueError):
    """A data root, meta file, data file or dataset source that is missing or malformed.

    ``problems`` holds one line per missing or malformed item (the whole message when there is
    one problem)."""

    def __init__(self, message: str = "", problems: list[str] | None = None,
                 option: str | None = None):
        # Raised in a DataLoader worker, it comes back as DataError("Caught DataError in DataLoader
        # worker process N.\nOriginal Traceback ...\nutils.errors.DataError: <message>"): the
        # user gets <message> alone, as from the main process.
        if message.startswith("Caught DataError"):
            message = re.split(r"^\S*DataError: ", message, flags=re.M)[-1].rstrip("\n")
        super().__init__(message, option)
        self.problems = list(problems) if problems else [message]


class OutputError(InputError, OSError):
    """An output that could not be written (a full disk, a folder made read-only mid-run)."""
