"""The root of the project's user errors: what a user's flags, files, data or disk can get wrong.

Every such error is reported as one line, never a traceback. ``option`` names the setting at fault
(``"device"``, ``"onnx"``, ...) without spelling a command-line flag: a front end that reads the
setting from a flag prints ``--<option>`` in front of the message, a server names its field.
"""
from __future__ import annotations

__all__ = ["InputError"]


class InputError(Exception):
    """A user mistake: the message says what was found and what was expected."""

    def __init__(self, message: str = "", option: str | None = None):
        super().__init__(message)
        self.option = option
