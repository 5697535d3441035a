"""Asyncio client for the Sharetribe Integration API, on one shared aiohttp session.

Every call goes ``{base}/v1/integration_api/{resource}/{action}``: GETs are queries,
POSTs are commands. Before *every* attempt a call takes a token from the matching
client-side bucket (:mod:`worker.api.ratelimit`), so retries are paced like first tries,
then a bearer token from :class:`~worker.api.auth.TokenManager`.

Retry decisions (transient failures, paced by :class:`~worker.api.backoff.Backoff` with
full jitter; ``Retry-After`` is honoured as a minimum wait):

- **Queries** are safe to repeat, so they retry 408, 429, 500, 502, 503 and 504,
  every connection failure (refused, reset, dropped, truncated body), every timeout,
  and a 2xx whose body cannot be decoded: a body cut short without framing (no
  length, connection closed) looks exactly like malformed JSON.
- **Commands** may already have taken effect, so they retry only where the request
  surely did not: 408, 429, 503 and failures to connect at all (refused, connect
  timeout). Where it may have (a gateway's 502 or 504, whose upstream may have
  applied it; a 500; a connection broken after sending; a read timeout; a 2xx
  whose body cannot be read, though it did apply) they raise
  :class:`~worker.errors.CommandOutcomeUnknownError` at once and never send it
  again: a repeated Flex transition that landed the first time comes back 409
  ``transaction-invalid-transition``, and a command that is not naturally
  idempotent would run twice. ``ctx.step`` leaves such a step uncertain.
- **401** is not a transient failure: the token manager refreshes the token once,
  then re-authenticates once, and a third 401 raises :class:`~worker.errors.AuthError`.
- Everything else (400, 402, 403, 404, 409, ...) raises at once.
- A 2xx whose resources lack required fields raises :class:`~worker.errors.ResourceError`
  without retrying: the same data would come back.

``Backoff.max_attempts`` caps the attempts that failed transiently; the ``attempts``
on an error counts every request sent, 401 recoveries included.
``Backoff.max_total_s`` is the budget of the whole call, from the moment it is made
to the start of its last attempt: waits for the rate-limit bucket, for a token
renewal and between retries all count. A wait that would end past it is not begun
(a bucket wait), or cut short (a token renewal's waiter is let go): the call raises
its last failure, or :class:`~worker.errors.CallBudgetError` if no request could
start at all. So a call ends within the budget plus one request's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeVar, Unpack, overload

import aiohttp
from pydantic import SecretStr

from worker.api import wire
from worker.api.auth import Grant, TokenManager
from worker.api.backoff import Backoff, parse_retry_after
from worker.api.models import (
    Event,
    Listing,
    Marketplace,
    Page,
    RejectedItem,
    Resource,
    ResourceRef,
    Transaction,
    User,
    parse_document,
    parse_error_details,
    parse_page,
)
from worker.api.params import (
    FieldSets,
    Id,
    Names,
    TransactionFilters,
    encode_params,
    shape_params,
    transaction_query_params,
)
from worker.api.ratelimit import RateLimits, TokenBucket, preset
from worker.api.walk import walk_transactions
from worker.errors import (
    ApiConnectError,
    ApiError,
    ApiErrorDetail,
    ApiTimeoutError,
    AuthError,
    CallBudgetError,
    CommandOutcomeUnknownError,
    ConfigError,
    DecodeError,
    RequestInfo,
    status_error,
)

__all__ = [
    "API_PREFIX",
    "DEFAULT_BASE_URL",
    "MAX_CONNECTIONS",
    "ClientSettings",
    "IntegrationClient",
    "TransactionFilters",
    "encode_params",
    "transaction_query_params",
]

DEFAULT_BASE_URL = "https://flex-integ-api.sharetribe.com"
API_PREFIX = "/v1/integration_api/"
#: Sharetribe's SDKs never open more than this many connections per client.
MAX_CONNECTIONS = 10

#: Statuses that say the request was not acted on: safe to send again, even a command.
_NOT_DONE = frozenset({408, 429, 503})
_RETRY_QUERIES = _NOT_DONE | {500, 502, 504}

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=Resource)


class ClientSettings(Protocol):
    """The settings :meth:`IntegrationClient.from_settings` reads (read-only view)."""

    @property
    def sharetribe_client_id(self) -> str: ...
    @property
    def sharetribe_client_secret(self) -> SecretStr: ...
    @property
    def sharetribe_api_base_url(self) -> str: ...
    @property
    def rate_limit(self) -> Literal["dev", "prod", "off"]: ...
    @property
    def http_timeout_s(self) -> float: ...
    @property
    def http_connect_timeout_s(self) -> float: ...
    @property
    def http_max_connections(self) -> int: ...
    @property
    def api_retry_max_attempts(self) -> int: ...
    @property
    def api_retry_base_s(self) -> float: ...
    @property
    def api_retry_cap_s(self) -> float: ...
    @property
    def api_retry_max_total_s(self) -> float: ...
    @property
    def api_format(self) -> Literal["json", "transit"]: ...
    @property
    def api_page_cap(self) -> int: ...


@dataclass(frozen=True)
class _Answer:
    body: Any
    request: RequestInfo
    attempts: int
    #: the server's clock when it answered (its ``Date`` header), if it sent one that parses.
    served_at: datetime | None = None


@dataclass
class _Failure:
    """A failed attempt: what to raise if we stop, and whether we may go on."""

    error: ApiError
    retryable: bool
    retry_after_s: float | None = None


class IntegrationClient:
    """Calls the Integration API with auth, client-side rate limiting and retries.

    Use as ``async with IntegrationClient(...) as client:`` or call :meth:`aclose`.
    ``session`` is used as given (and left open) if passed; otherwise one is created
    on first use with ``TCPConnector(limit=max_connections)`` and closed by
    :meth:`aclose`. ``rate_limits=None`` disables client-side pacing. ``clock`` is a
    monotonic clock in seconds, ``wall_clock`` Unix time (for ``Retry-After`` dates
    when the answer has no ``Date``), ``sleep`` and ``rng`` drive every wait.
    """

    def __init__(
        self,
        client_id: str,
        client_secret: SecretStr | str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        rate_limits: RateLimits | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        max_connections: int = MAX_CONNECTIONS,
        backoff: Backoff | None = None,
        page_cap: int = 10_000,
        session: aiohttp.ClientSession | None = None,
        accept: str = wire.JSON_MIME,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if not client_id:
            raise ConfigError("client_id is empty")
        if not 1 <= max_connections <= MAX_CONNECTIONS:
            raise ConfigError(f"max_connections must be 1..{MAX_CONNECTIONS}, got {max_connections}")
        if not (timeout_s > 0 and connect_timeout_s > 0):
            raise ConfigError("timeout_s and connect_timeout_s must be positive")
        if accept not in (wire.JSON_MIME, wire.TRANSIT_MIME):
            raise ConfigError(f"accept must be {wire.JSON_MIME} or {wire.TRANSIT_MIME}, got {accept!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must be an http(s) URL, got {base_url!r}")
        if page_cap < 1:
            raise ConfigError(f"page_cap must be at least 1, got {page_cap}")
        self.base_url = base_url.rstrip("/")
        self.accept = accept
        self.backoff = backoff or Backoff()
        #: items one query can reach by paging (the API's cap on deep paging).
        self.page_cap = page_cap
        self._max_connections = max_connections
        # total bounds one attempt end to end; sock_connect keeps a dead host from eating all of it.
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._queries = TokenBucket(rate_limits.queries, clock=clock) if rate_limits else None
        self._commands = TokenBucket(rate_limits.commands, clock=clock) if rate_limits else None
        self.tokens = TokenManager(
            client_id=client_id,
            client_secret=client_secret,
            base_url=self.base_url,
            session=self._get_session,
            timeout=self._timeout,
            backoff=self.backoff,
            clock=clock,
            sleep=sleep,
            rng=self._rng,
        )

    @classmethod
    def from_settings(cls, settings: ClientSettings, **overrides: Any) -> Self:
        """A client configured from settings; keyword ``overrides`` win (tests inject clocks)."""
        kwargs: dict[str, Any] = {
            "client_id": settings.sharetribe_client_id,
            "client_secret": settings.sharetribe_client_secret,
            "base_url": settings.sharetribe_api_base_url,
            "rate_limits": preset(settings.rate_limit),
            "timeout_s": settings.http_timeout_s,
            "connect_timeout_s": settings.http_connect_timeout_s,
            "max_connections": settings.http_max_connections,
            "backoff": Backoff(
                base_s=settings.api_retry_base_s,
                cap_s=settings.api_retry_cap_s,
                max_attempts=settings.api_retry_max_attempts,
                max_total_s=settings.api_retry_max_total_s,
            ),
            "accept": wire.TRANSIT_MIME if settings.api_format == "transit" else wire.JSON_MIME,
            "page_cap": settings.api_page_cap,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self) -> str:
        return f"IntegrationClient(base_url={self.base_url!r}, client_id={self.tokens.client_id!r})"

    async def __aenter__(self) -> Self:
        self._get_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session if this client created it; the client is unusable afterwards."""
        self._closed = True
        await self.tokens.aclose()
        if self._session is not None and self._owns_session:
            await self._session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("IntegrationClient is closed")
        if self._session is None:
            # Created lazily: aiohttp sessions belong to the loop they are created in.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._max_connections))
        return self._session

    # -- low level -----------------------------------------------------------------

    async def get(self, path: str, params: Mapping[str, object] | None = None) -> Any:
        """Run query ``path`` (``"resource/action"``); return the body in JSON form."""
        return (await self._call("GET", path, params, None)).body

    async def post(
        self, path: str, body: Mapping[str, Any], params: Mapping[str, object] | None = None
    ) -> Any:
        """Run command ``path`` with ``body``; return the answer in JSON form."""
        return (await self._call("POST", path, params, body)).body

    # -- typed calls ---------------------------------------------------------------

    async def marketplace_show(self) -> Marketplace:
        """The marketplace this client is authorised for."""
        return self._one(Marketplace, await self._call("GET", "marketplace/show", None, None))

    async def users_show(
        self, id: Id, *, include: Names | None = None, fields: FieldSets | None = None
    ) -> User:
        """One user, with ``email`` and full profile data."""
        params = {"id": id, **shape_params(include, fields)}
        return self._one(User, await self._call("GET", "users/show", params, None))

    async def listings_show(
        self, id: Id, *, include: Names | None = None, fields: FieldSets | None = None
    ) -> Listing:
        """One listing."""
        params = {"id": id, **shape_params(include, fields)}
        return self._one(Listing, await self._call("GET", "listings/show", params, None))

    async def transactions_show(
        self, id: Id, *, include: Names | None = None, fields: FieldSets | None = None
    ) -> Transaction:
        """One transaction; ``include=("customer", "provider", "listing")`` resolves them."""
        params = {"id": id, **shape_params(include, fields)}
        return self._one(Transaction, await self._call("GET", "transactions/show", params, None))

    async def transactions_query(
        self,
        *,
        page: int | None = None,
        per_page: int | None = None,
        **filters: Unpack[TransactionFilters],
    ) -> Page[Transaction]:
        """One page of transactions matching ``filters`` (see :class:`TransactionFilters`)."""
        params = transaction_query_params(filters)
        params.update(page=page, perPage=per_page)
        answer = await self._call("GET", "transactions/query", params, None)
        return self._page(Transaction, answer)

    def iter_transactions(
        self,
        *,
        per_page: int = 100,
        on_rejected: Callable[[RejectedItem], None] | None = None,
        **filters: Unpack[TransactionFilters],
    ) -> AsyncIterator[Transaction]:
        """Every transaction matching ``filters``, each once, in the order asked.

        Past the page cap (:attr:`page_cap`) a walk sorted by ``createdAt`` goes on by
        ``createdAt`` windows; any other sort raises
        :class:`~worker.errors.PagingLimitError` there (see
        :func:`worker.api.walk.walk_transactions`). Items that cannot be read go to
        ``on_rejected`` (default: logged).
        """
        return walk_transactions(
            self, filters, per_page=per_page, page_cap=self.page_cap, on_rejected=on_rejected
        )

    async def events_query(
        self,
        *,
        start_after_sequence_id: int | None = None,
        created_at_start: datetime | None = None,
        event_types: Names | None = None,
        resource_id: Id | None = None,
        related_resource_id: Id | None = None,
        per_page: int | None = None,
    ) -> Page[Event]:
        """Events in ascending ``sequenceId`` order; a full page means more are waiting."""
        params = {
            "startAfterSequenceId": start_after_sequence_id,
            "createdAtStart": created_at_start,
            "eventTypes": event_types,
            "resourceId": resource_id,
            "relatedResourceId": related_resource_id,
            "perPage": per_page,
        }
        return self._page(Event, await self._call("GET", "events/query", params, None))

    @overload
    async def transactions_transition(
        self,
        id: Id,
        transition: str,
        params: Mapping[str, Any] | None = None,
        *,
        expand: Literal[True] = True,
    ) -> Transaction: ...
    @overload
    async def transactions_transition(
        self, id: Id, transition: str, params: Mapping[str, Any] | None = None, *, expand: Literal[False]
    ) -> ResourceRef: ...
    async def transactions_transition(
        self, id: Id, transition: str, params: Mapping[str, Any] | None = None, *, expand: bool = True
    ) -> Transaction | ResourceRef:
        """Run an operator ``transition``; the expanded transaction, or only its reference."""
        body = {"id": _uuid(id), "transition": transition, "params": dict(params or {})}
        answer = await self._call("POST", "transactions/transition", {"expand": expand}, body)
        return self._one(Transaction, answer) if expand else self._ref(answer)

    @overload
    async def transactions_update_metadata(
        self, id: Id, metadata: Mapping[str, Any], *, expand: Literal[True] = True
    ) -> Transaction: ...
    @overload
    async def transactions_update_metadata(
        self, id: Id, metadata: Mapping[str, Any], *, expand: Literal[False]
    ) -> ResourceRef: ...
    async def transactions_update_metadata(
        self, id: Id, metadata: Mapping[str, Any], *, expand: bool = True
    ) -> Transaction | ResourceRef:
        """Merge ``metadata`` into the transaction's metadata (emits ``transaction/updated``)."""
        body = {"id": _uuid(id), "metadata": dict(metadata)}
        answer = await self._call("POST", "transactions/update_metadata", {"expand": expand}, body)
        return self._one(Transaction, answer) if expand else self._ref(answer)

    # -- parsing -------------------------------------------------------------------

    @staticmethod
    def _one(model: type[R], answer: _Answer) -> R:
        try:
            return parse_document(model, answer.body)
        except DecodeError as exc:
            raise _unreadable(exc, answer) from exc

    @staticmethod
    def _page(model: type[R], answer: _Answer) -> Page[R]:
        try:
            page = parse_page(model, answer.body)
        except DecodeError as exc:
            raise type(exc)(exc.message, request=answer.request, attempts=answer.attempts) from exc
        for item in page.rejected:
            logger.warning("%s: item %d set aside: %s", answer.request, item.index, item.reason)
        page.served_at = answer.served_at
        return page

    @staticmethod
    def _ref(answer: _Answer) -> ResourceRef:
        body = answer.body
        data = body.get("data") if isinstance(body, dict) else None
        try:
            return ResourceRef.model_validate(data)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            error = DecodeError("answer's 'data' is not a resource reference")
            raise _unreadable(error, answer) from exc

    # -- the request loop ----------------------------------------------------------

    async def _call(
        self,
        method: Literal["GET", "POST"],
        path: str,
        params: Mapping[str, object] | None,
        body: Mapping[str, Any] | None,
    ) -> _Answer:
        query = encode_params(params or {})
        request = RequestInfo(method, API_PREFIX + path.strip("/"), query)
        is_query = method == "GET"
        bucket = self._queries if is_query else self._commands
        payload = wire.encode(body, self.accept) if body is not None else None
        tried: set[Grant] = set()
        attempts = 0
        failures = 0
        started_s = self._clock()
        # The budget bounds the whole call: bucket, token and backoff waits alike.
        deadline_s = started_s + self.backoff.max_total_s
        last_error: ApiError | None = None
        while True:
            if bucket is not None and not await bucket.take(sleep=self._sleep, latest_s=deadline_s):
                raise self._out_of_budget(request, attempts, last_error, "for the client-side rate limit")
            token = await self.tokens.access_token(deadline_s=deadline_s)
            attempts += 1
            outcome = await self._attempt(request, token, payload, attempts)
            if isinstance(outcome, _Answer):
                return outcome
            if isinstance(outcome.error, AuthError) and outcome.error.status == 401:
                if await self.tokens.recover(token, tried, deadline_s=deadline_s) is not None:
                    logger.info("%s: access token rejected; retrying with a new one", request)
                    continue
                raise AuthError(
                    "Integration API still answers 401 after refreshing the token and re-authenticating "
                    f"({_codes(outcome.error)})",
                    status=401,
                    errors=outcome.error.errors,
                    request=request,
                    attempts=attempts,
                )
            failures += 1
            delay_s = None
            if outcome.retryable:
                delay_s = self.backoff.next_delay_s(
                    failures, self._clock() - started_s, self._rng, retry_after_s=outcome.retry_after_s
                )
            outcome.error.attempts = attempts
            if delay_s is None:
                raise outcome.error
            last_error = outcome.error
            reason = outcome.error.message
            logger.warning("%s: attempt %d failed (%s); retry in %.2fs", request, attempts, reason, delay_s)
            await self._sleep(delay_s)

    def _out_of_budget(
        self, request: RequestInfo, attempts: int, last_error: ApiError | None, waiting: str
    ) -> ApiError:
        if last_error is not None:
            return last_error  # what went wrong is what the caller wants to know
        budget_s = self.backoff.max_total_s
        return CallBudgetError(
            f"the call's next request could not start within its {budget_s:g} s budget: "
            f"it would have waited {waiting}",
            request=request,
            attempts=attempts,
        )

    async def _attempt(
        self, request: RequestInfo, token: str, payload: bytes | None, attempts: int
    ) -> _Answer | _Failure:
        is_query = request.method == "GET"
        headers = {
            "Accept": self.accept,
            "Authorization": f"bearer {token}",
            "User-Agent": "flexworker",
        }
        if payload is not None:
            headers["Content-Type"] = self.accept
        try:
            async with self._get_session().request(
                request.method,
                self.base_url + request.path,
                params=dict(request.params),
                data=payload,
                headers=headers,
                timeout=self._timeout,
            ) as resp:
                status = resp.status
                body = await resp.read()
                resp_headers = resp.headers
        except aiohttp.ConnectionTimeoutError as exc:
            # Never connected, so nothing was sent: safe to retry even a command.
            message = "timed out connecting to the Integration API"
            error: ApiError = ApiTimeoutError(message, request=request)
            return self._transport_failure(error, exc, retryable=True)
        except aiohttp.ClientConnectorError as exc:
            message = f"cannot connect to the Integration API ({exc.os_error})"
            error = ApiConnectError(message, request=request)
            return self._transport_failure(error, exc, retryable=True)
        except aiohttp.InvalidURL as exc:
            error = ApiConnectError(f"invalid Integration API URL ({exc})", request=request)
            return self._transport_failure(error, exc, retryable=False)
        except TimeoutError as exc:
            if is_query:
                error = ApiTimeoutError("the Integration API did not answer in time", request=request)
            else:
                error = _outcome_unknown("no answer came in time", request)
            return self._transport_failure(error, exc, retryable=is_query)
        except aiohttp.ClientPayloadError as exc:
            if is_query:
                error = ApiConnectError("the Integration API's answer was cut short", request=request)
            else:
                error = _outcome_unknown("the answer was cut short", request)
            return self._transport_failure(error, exc, retryable=is_query)
        except aiohttp.ClientError as exc:
            what = f"connection to the Integration API failed ({type(exc).__name__})"
            if is_query:
                error = ApiConnectError(what, request=request)
            else:
                error = _outcome_unknown(f"the {what.removeprefix('the ')} after it was sent", request)
            return self._transport_failure(error, exc, retryable=is_query)

        content_type = resp_headers.get("Content-Type", "")
        if 200 <= status < 300:
            mime = _mime_of(content_type, self.accept)
            try:
                return _Answer(wire.decode(body, mime), request, attempts, _server_time(resp_headers))
            except wire.WireFormatError as exc:
                what = (
                    f"Integration API answered {status} with a body that is not valid {mime} "
                    f"(Content-Type {content_type or 'missing'!r}, {len(body)} bytes): {exc}"
                )
                error = (
                    DecodeError(what, request=request)
                    if is_query
                    else _outcome_unknown(f"{what}; the command took effect", request, status=status)
                )
                error.__cause__ = exc
                return _Failure(error, retryable=is_query)

        details: list[ApiErrorDetail] = []
        # 5xx bodies are not guaranteed to be valid; the status says enough then.
        with contextlib.suppress(wire.WireFormatError, ValueError, TypeError):
            details = parse_error_details(wire.decode(body, _mime_of(content_type, self.accept)))
        status_exc = status_error(status, details, request=request)
        if not is_query and status >= 500 and status not in _NOT_DONE:
            # A gateway's 502/504 or the API's 500: the command may have been applied upstream.
            unknown = _outcome_unknown(status_exc.message, request, status=status)
            unknown.__cause__ = status_exc
            return _Failure(unknown, retryable=False)
        retryable = status in (_RETRY_QUERIES if is_query else _NOT_DONE)
        retry_after_s = self._retry_after_s(resp_headers) if retryable else None
        return _Failure(status_exc, retryable=retryable, retry_after_s=retry_after_s)

    @staticmethod
    def _transport_failure(error: ApiError, exc: BaseException, *, retryable: bool) -> _Failure:
        # The failure may be raised much later, from the retry loop; keep the library error as its cause.
        error.__cause__ = exc
        return _Failure(error, retryable=retryable)

    def _retry_after_s(self, headers: Mapping[str, str]) -> float | None:
        value = headers.get("Retry-After")
        if value is None:
            return None
        # The server's own clock makes an HTTP-date Retry-After immune to our clock skew.
        served_at = _server_time(headers)
        now_s = served_at.timestamp() if served_at is not None else self._wall_clock()
        return parse_retry_after(value, now_s=now_s)


def _server_time(headers: Mapping[str, str]) -> datetime | None:
    """The answer's ``Date`` as an aware UTC datetime; None when absent or unreadable."""
    value = headers.get("Date")
    if not value:
        return None
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    # RFC 9110 dates are GMT; a naive parse means "-0000", which is UTC too.
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _outcome_unknown(
    what: str, request: RequestInfo, *, status: int | None = None
) -> CommandOutcomeUnknownError:
    return CommandOutcomeUnknownError(
        f"command outcome unknown, not sent again: {what}", status=status, request=request
    )


def _unreadable(exc: DecodeError, answer: _Answer) -> ApiError:
    """A 2xx answer that cannot be read: for a command, it did take effect all the same."""
    if answer.request.method != "GET":
        unknown = _outcome_unknown(f"{exc.message}; the command took effect", answer.request, status=200)
        unknown.attempts = answer.attempts
        return unknown
    error: ApiError = type(exc)(exc.message, request=answer.request, attempts=answer.attempts)
    return error


def _mime_of(content_type: str, fallback: str) -> str:
    lowered = content_type.lower()
    if "transit" in lowered:
        return wire.TRANSIT_MIME
    if "json" in lowered:
        return wire.JSON_MIME
    return fallback


def _uuid(value: Id) -> Id:
    # A real UUID lets the Transit writer tag it (~u), as Flex expects in command bodies.
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            return value
    return value


def _codes(error: ApiError) -> str:
    codes = getattr(error, "codes", ())
    return ", ".join(codes) or "no error code"
