"""What a handler's exception means for delivery, and how it is written down.

:func:`classify` sorts an exception into *transient* (retry with backoff) or
*permanent* (dead-letter now); the rules are listed in :mod:`worker.plugin`.
:func:`describe` turns it into a one-line :class:`ErrorRecord` for the delivery
record and the dead-letter queue: type, message and the raising line, never a
traceback or a pydantic error's input values (which hold personal data).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from datetime import datetime

import aiohttp
import pydantic
from pydantic import BaseModel

from worker.api.backoff import parse_retry_after
from worker.errors import (
    CallBudgetError,
    CommandOutcomeUnknownError,
    HTTPStatusError,
    PermanentError,
    RateLimitedError,
    RetryLater,
    ServerError,
    TransportError,
)

__all__ = ["MESSAGE_MAX_CHARS", "ErrorRecord", "Verdict", "classify", "describe"]

#: A stored error message is cut to this many characters.
MESSAGE_MAX_CHARS = 500


@dataclass(frozen=True)
class Verdict:
    """What to do after a failed attempt."""

    permanent: bool
    #: the least wait before a retry (``RetryLater``, ``Retry-After``), if any.
    at_least_s: float | None = None


class ErrorRecord(BaseModel):
    """One failed attempt, as stored (one line, no traceback)."""

    at: datetime
    attempt: int
    type: str
    message: str
    #: ``file:line in function`` of the innermost frame that raised, if known.
    where: str = ""


def _retry_after(exc: aiohttp.ClientResponseError, now_s: float) -> float | None:
    headers = exc.headers
    value = headers.get("Retry-After") if headers is not None else None
    return parse_retry_after(value, now_s=now_s)


def classify(exc: BaseException, *, now_s: float) -> Verdict:
    """Transient or permanent; ``now_s`` (Unix time) resolves ``Retry-After`` dates."""
    if isinstance(exc, PermanentError | pydantic.ValidationError):
        return Verdict(permanent=True)
    if isinstance(exc, RetryLater):
        return Verdict(permanent=False, at_least_s=exc.after_s)
    if isinstance(
        exc, (RateLimitedError, ServerError, TransportError, CommandOutcomeUnknownError, CallBudgetError)
    ):
        return Verdict(permanent=False)
    if isinstance(exc, HTTPStatusError):
        return Verdict(permanent=400 <= exc.status < 500)
    if isinstance(exc, aiohttp.ClientResponseError):
        if exc.status == 429 or exc.status >= 500:
            return Verdict(permanent=False, at_least_s=_retry_after(exc, now_s))
        return Verdict(permanent=400 <= exc.status < 500)
    # Network errors, timeouts, and anything unexpected: a bug may be a flaky dependency.
    return Verdict(permanent=False)


def _message(exc: BaseException) -> str:
    if isinstance(exc, pydantic.ValidationError):
        # str() of a ValidationError quotes the offending input; name the places only.
        problems = [
            f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        text = f"{exc.error_count()} validation error(s) for {exc.title}: " + "; ".join(problems)
    elif isinstance(exc, aiohttp.ClientResponseError):
        # Its str() includes the full URL, whose query may carry personal data.
        text = f"{exc.status} {exc.message}".strip()
    else:
        text = str(exc)
    line = " ".join(text.split())
    if len(line) > MESSAGE_MAX_CHARS:
        line = line[: MESSAGE_MAX_CHARS - 1] + "…"
    return line


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if not frames:
        return ""
    frame = frames[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"


def describe(exc: BaseException, *, attempt: int, at: datetime, message: str | None = None) -> ErrorRecord:
    """The one-line record of ``exc`` (``message`` overrides the exception's own)."""
    return ErrorRecord(
        at=at,
        attempt=attempt,
        type=type(exc).__name__,
        message=message if message is not None else _message(exc),
        where=_where(exc),
    )
