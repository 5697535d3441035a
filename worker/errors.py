"""The one exception tree of flexworker.

Every failure the package raises on purpose derives from :class:`FlexworkerError`;
errors from libraries (aiohttp, pydantic, transit) are wrapped at the boundary with
``raise X from exc`` so callers only ever catch ours::

    FlexworkerError
     ├── ConfigError                 a setting is missing or invalid
     ├── StoreError                  Redis failed (queue, cursors, lease, records)
 ├── PollError                   a poll cycle could not go on
 │    ├── LeaseHeldError         another poller holds this namespace's lease
 │    ├── LeaseLostError         the lease was lost mid-cycle; progress stops at the last checkpoint
 │    └── CursorChangedError     an operator set the cursor mid-cycle; the cycle gives way
     ├── ApiError                    the Integration API could not be used
     │    ├── TransportError         no usable HTTP answer (after retries)
     │    │    ├── ApiConnectError   connection refused, reset or dropped
     │    │    └── ApiTimeoutError   no answer in time
     │    ├── CommandOutcomeUnknownError  a command was sent; whether it took effect is unknown
     │    ├── CallBudgetError        the call's budget ran out before its next request could start
     │    ├── PagingLimitError       a walk over a query cannot reach every item it matches
     │    ├── DecodeError            an answer arrived but its body is unusable
     │    │    └── ResourceError     a resource lacks a field we require
     │    └── HTTPStatusError        a non-2xx answer (after retries where they apply)
     │         ├── AuthError         401/403 that re-authenticating did not fix
     │         ├── NotFoundError     404
     │         ├── RateLimitedError  429
     │         ├── ServerError       5xx
     │         └── BadRequestError   any other 4xx (validation, conflicts, ...)
     ├── HandlerError                raised by handlers to steer delivery (``worker.plugin`` re-exports)
     │    ├── RetryLater             transient: try again, no sooner than ``after_s``
     │    └── PermanentError         no retry: straight to the dead-letter queue
     │         └── StepUncertainError  a step started but its result was never recorded
     └── HandlerStartupError         a handler's ``startup()`` failed

``ApiError`` carries the request it belongs to (method, path, query parameters —
never headers or bodies, which hold tokens and secrets).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ApiConnectError",
    "ApiError",
    "ApiErrorDetail",
    "ApiTimeoutError",
    "AuthError",
    "BadRequestError",
    "CallBudgetError",
    "CommandOutcomeUnknownError",
    "ConfigError",
    "CursorChangedError",
    "DecodeError",
    "FlexworkerError",
    "HTTPStatusError",
    "HandlerError",
    "HandlerStartupError",
    "LeaseHeldError",
    "LeaseLostError",
    "NotFoundError",
    "PagingLimitError",
    "PermanentError",
    "PollError",
    "RateLimitedError",
    "RequestInfo",
    "ResourceError",
    "RetryLater",
    "ServerError",
    "StepUncertainError",
    "StoreError",
    "TransportError",
    "status_error",
]


class FlexworkerError(Exception):
    """Root of every error flexworker raises."""


class ConfigError(FlexworkerError):
    """A setting is missing or invalid; the message is one line naming it."""


class StoreError(FlexworkerError):
    """Redis (queue, cursors, lease, records) failed or could not be reached."""


class PollError(FlexworkerError):
    """A poll cycle could not go on; what it queued and checkpointed stays."""


class LeaseHeldError(PollError):
    """Another poller holds the lease of this namespace."""


class LeaseLostError(PollError):
    """The lease was lost mid-cycle; nothing after the last checkpoint was written."""


class CursorChangedError(PollError):
    """An operator set or cleared the cursor during the cycle, which gives way to it."""


class HandlerError(FlexworkerError):
    """Base of the exceptions a handler raises to tell delivery what to do next."""


class RetryLater(HandlerError):
    """Try this event again later, no sooner than ``after_s`` seconds (it uses up an attempt)."""

    def __init__(self, after_s: float, message: str = "") -> None:
        super().__init__(message or f"retry requested in {after_s:g} s")
        self.after_s = max(0.0, float(after_s))


class PermanentError(HandlerError):
    """Retrying cannot help: the event goes straight to the dead-letter queue."""


class StepUncertainError(PermanentError):
    """A step started in an earlier attempt but never recorded its result.

    Its side effect may or may not have happened, and the handler gave no way to
    find out (``if_uncertain``), so a person decides: the event is dead-lettered.
    """


class HandlerStartupError(FlexworkerError):
    """A handler's ``startup()`` failed; the worker does not start."""


@dataclass(frozen=True)
class RequestInfo:
    """What a failed call asked for; safe to log (no headers, no bodies)."""

    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return f"{self.method} {self.path}"
        query = "&".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.method} {self.path}?{query}"


@dataclass(frozen=True)
class ApiErrorDetail:
    """One entry of the API's ``errors`` envelope."""

    status: int
    code: str
    title: str
    details: str | None = None
    source_path: tuple[str, ...] = ()


class ApiError(FlexworkerError):
    """Base of every Integration API failure."""

    def __init__(self, message: str, *, request: RequestInfo | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.attempts = attempts

    def __str__(self) -> str:
        where = f" ({self.request})" if self.request else ""
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"{self.message}{where}{tries}"


class TransportError(ApiError):
    """No usable HTTP answer arrived."""


class ApiConnectError(TransportError):
    """The connection was refused, reset or dropped mid-answer."""


class ApiTimeoutError(TransportError):
    """The API did not answer within the configured timeout."""


class CommandOutcomeUnknownError(ApiError):
    """A command left, and nobody can tell whether it took effect.

    A gateway answered 502 or 504 (the upstream may have applied it), the API
    answered 500, the connection broke after the request was sent, no answer came
    in time, or a 2xx answer could not be read (then it did take effect). Sending
    it again could apply it twice, or turn an applied transition into a 409, so
    the client never does. Inside :meth:`~worker.plugin.HandlerContext.step` the
    step is left *uncertain*: the next attempt asks ``if_uncertain``. Anywhere
    else it is a transient failure like any other. ``status`` is the HTTP status
    when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request: RequestInfo | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message, request=request, attempts=attempts)
        self.status = status


class CallBudgetError(ApiError):
    """No request could start within the call's time budget (``api_retry_max_total_s``).

    The client-side rate limit or a token renewal would have kept the first request
    waiting past it. Nothing was sent; it is transient. (Once a request was sent
    and failed, running out of budget raises that failure instead.)
    """


class PagingLimitError(ApiError):
    """A query matches more items than paging reaches, and the walk cannot go on.

    Raised rather than stopping short: a walk that ended silently at the API's page
    cap would lose data without anybody knowing.
    """


class DecodeError(ApiError):
    """An answer arrived but its body could not be decoded or validated."""


class ResourceError(DecodeError):
    """A resource in an answer lacks a field the product requires."""


class HTTPStatusError(ApiError):
    """The API answered with a non-2xx status."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        errors: Sequence[ApiErrorDetail] = (),
        request: RequestInfo | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message, request=request, attempts=attempts)
        self.status = status
        self.errors = tuple(errors)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(e.code for e in self.errors)

    @property
    def titles(self) -> tuple[str, ...]:
        return tuple(e.title for e in self.errors)


class AuthError(HTTPStatusError):
    """Credentials were rejected even after re-authenticating."""


class NotFoundError(HTTPStatusError):
    """The resource does not exist."""


class RateLimitedError(HTTPStatusError):
    """Still rate limited after the retry budget ran out."""


class ServerError(HTTPStatusError):
    """The API failed (5xx) after the retry budget ran out."""


class BadRequestError(HTTPStatusError):
    """The API refused the request (4xx other than 401/403/404/429)."""


def status_error(
    status: int,
    errors: Sequence[ApiErrorDetail],
    *,
    request: RequestInfo | None = None,
    attempts: int = 1,
) -> HTTPStatusError:
    """Build the right :class:`HTTPStatusError` subclass for ``status``."""
    cls: type[HTTPStatusError]
    if status in (401, 403):
        cls = AuthError
    elif status == 404:
        cls = NotFoundError
    elif status == 429:
        cls = RateLimitedError
    elif status >= 500:
        cls = ServerError
    else:
        cls = BadRequestError
    summary = "; ".join(f"{e.code}: {e.title}" for e in errors) or "no error body"
    return cls(
        f"Integration API answered {status} ({summary})",
        status=status,
        errors=errors,
        request=request,
        attempts=attempts,
    )
