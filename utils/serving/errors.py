"""The service's refusals beyond a plain bad input (``UsageError``, HTTP 400): each maps to its
own HTTP status in ``utils/serving/web.py``."""
from __future__ import annotations

from utils.errors import UsageError

__all__ = ["LimitError", "NotFound", "Gone"]


class LimitError(UsageError):
    """A request beyond a limit (HTTP 413)."""


class NotFound(UsageError):
    """No such job, image or profile for this client (HTTP 404)."""


class Gone(UsageError):
    """A job that existed and is no longer kept (HTTP 410)."""
