"""The simulator store's refusals, under flexworker's one exception root.

The HTTP layer maps them onto the API's answers: :class:`MissingResourceError` is a
404 ``not-found``, :class:`InvalidArgumentError` a 400 ``validation-invalid-value``.
"""

from __future__ import annotations

from worker.errors import FlexworkerError

__all__ = ["InvalidArgumentError", "MissingResourceError", "SimStoreError"]


class SimStoreError(FlexworkerError):
    """Base of the store's refusals."""


class MissingResourceError(SimStoreError, LookupError):
    """No resource of that type has that id."""


class InvalidArgumentError(SimStoreError, ValueError):
    """An argument makes no sense (a time before the last transition, a stranger as sender, ...)."""
