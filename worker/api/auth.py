"""Access tokens for the Integration API: obtained, cached, renewed, recovered after a 401.

:class:`TokenManager` talks to ``POST {base}/v1/auth/token`` (form-encoded, OAuth2
style). It hands out a cached access token and renews it shortly before the
``expires_in`` the server gave, preferring the refresh-token grant so the client
secret travels as rarely as possible.

When the API answers 401 the client asks :meth:`TokenManager.recover` for a new token,
following the official SDK: one refresh-token grant, then (if that grant is refused)
one client-credentials grant, then the caller gives up. Rejected client credentials
(400, 401, 403) raise :class:`~worker.errors.AuthError` at once: a wrong secret never
becomes right by retrying. Transient failures of the token endpoint itself (408,
429, 5xx, connection errors, and a 2xx whose body is cut short or unreadable) are
retried with the :class:`~worker.api.backoff.Backoff` policy: a token request is safe
to repeat. Only a refusal drops the refresh token; a failure that outlasts the
retries says nothing about it.

One renewal runs at a time, and every caller that needs a new token waits for that
one and gets its result, token or error: any number of concurrent callers cause one
run of token requests. A renewal ahead of expiry runs in the background while the
cached token is handed out until it really expires, so a blip of the token endpoint
costs no call anything while the token lasts. A caller stops waiting at its own
deadline (the call's time budget): it gets the renewal's latest failure as soon as
the renewal's next retry would start after that deadline. The client secret and the
tokens never appear in reprs, logs or exception messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, MutableSet
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from pydantic import SecretStr

from worker.api.backoff import Backoff, parse_retry_after
from worker.api.models import parse_error_details
from worker.api.wire import JSON_MIME
from worker.errors import (
    ApiConnectError,
    ApiError,
    ApiErrorDetail,
    ApiTimeoutError,
    AuthError,
    DecodeError,
    HTTPStatusError,
    RequestInfo,
    TransportError,
    status_error,
)

__all__ = ["TOKEN_PATH", "Grant", "TokenManager"]

TOKEN_PATH = "/v1/auth/token"  # noqa: S105 - a URL path, not a password

Grant = Literal["refresh_token", "client_credentials"]

#: The token endpoint's way of saying no to the credentials or the refresh token (OAuth2).
_REFUSED = frozenset({400, 401, 403})
#: Answers that say "not now" rather than "no".
_TRANSIENT = frozenset({408, 429})

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Token:
    access_token: str = field(repr=False)
    #: from here on a renewal runs in the background; the token is still handed out.
    renew_at_s: float
    #: from here on the token is not handed out: callers wait for a renewal.
    expires_at_s: float


@dataclass(frozen=True)
class _Issued:
    """What a renewal got: the token and the grant that gave it."""

    access_token: str = field(repr=False)
    grant: Grant


@dataclass(eq=False)
class _Waiter:
    deadline_s: float
    result: asyncio.Future[_Issued]


class _Renewal:
    """One run of token requests (retries included) whose outcome all its waiters share."""

    def __init__(self, grants: tuple[Grant, ...]) -> None:
        self.grants = grants
        self.waiters: list[_Waiter] = []
        self.task: asyncio.Task[_Issued] | None = None

    def release_before(self, at_s: float, failure: ApiError) -> None:
        """Fail the waiters whose deadline comes before ``at_s``: they cannot wait that long."""
        kept = []
        for waiter in self.waiters:
            if waiter.result.done():
                continue
            if waiter.deadline_s < at_s:
                waiter.result.set_exception(failure)
            else:
                kept.append(waiter)
        self.waiters = kept

    def settle(self, task: asyncio.Task[_Issued]) -> None:
        """Hand the outcome to every waiter still waiting."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if waiter.result.done():
                continue
            if task.cancelled():
                waiter.result.cancel()
            elif (error := task.exception()) is not None:
                waiter.result.set_exception(error)
            else:
                waiter.result.set_result(task.result())


class TokenManager:
    """Client-credentials access tokens for one Integration API client.

    ``session`` is the client's shared :class:`aiohttp.ClientSession`, or a callable
    returning it (the client creates its session lazily inside the running loop).
    ``clock`` is a monotonic clock in seconds; ``sleep`` and ``rng`` pace retries of
    the token endpoint. Call :meth:`aclose` when done, to stop a renewal that runs.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: SecretStr | str,
        base_url: str,
        session: aiohttp.ClientSession | Callable[[], aiohttp.ClientSession],
        timeout: aiohttp.ClientTimeout | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        renew_margin_s: float = 30.0,
        renew_fraction: float = 0.1,
    ) -> None:
        self.client_id = client_id
        self._secret = client_secret if isinstance(client_secret, SecretStr) else SecretStr(client_secret)
        self.token_url = base_url.rstrip("/") + TOKEN_PATH
        self._session = session
        self._timeout = timeout
        self._backoff = backoff or Backoff()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._renew_margin_s = renew_margin_s
        self._renew_fraction = renew_fraction
        self._token: _Token | None = None
        self._refresh_token: str | None = None
        self._renewal: _Renewal | None = None
        # Background renewals that failed in a row, and when the next one may start.
        self._failed_renewals = 0
        self._calm_until_s = -math.inf
        #: Token requests sent (every attempt), for metrics and tests.
        self.requests_sent = 0

    def __repr__(self) -> str:
        return f"TokenManager(client_id={self.client_id!r}, token_url={self.token_url!r})"

    async def access_token(self, *, deadline_s: float = math.inf) -> str:
        """A valid access token: the cached one while it lasts, else a shared renewal's.

        Past the renewal point (shortly before the expiry the server gave) a renewal
        starts in the background and the cached token is still returned; once it has
        expired, callers wait for the renewal and get its token or its error.
        ``deadline_s`` (on ``clock``) is when this caller stops waiting.
        """
        token = self._token
        now_s = self._clock()
        if token is not None and now_s < token.expires_at_s:
            if now_s >= token.renew_at_s and self._renewal is None and now_s >= self._calm_until_s:
                self._start(("refresh_token", "client_credentials"))
            return token.access_token
        renewal = self._renewal or self._start(("refresh_token", "client_credentials"))
        return (await self._wait(renewal, deadline_s)).access_token

    async def recover(
        self, rejected_token: str, tried: MutableSet[Grant], *, deadline_s: float = math.inf
    ) -> str | None:
        """A new token after the API rejected ``rejected_token`` with 401, or ``None``.

        ``tried`` is the caller's record of grants already used for this request and
        is updated here: the first call makes a refresh-token grant (falling back to
        client credentials if that grant is refused), the next a client-credentials
        grant, and after both it returns ``None`` so the caller can give up. If another
        caller already replaced the rejected token, that token is returned instead, and
        a renewal already running is joined rather than doubled; either still counts
        as a step, which keeps every request's recovery bounded.
        """
        current = self._token
        if current is not None and current.access_token == rejected_token:
            self._token = current = None
        usable = current is not None and self._clock() < current.expires_at_s
        steps: tuple[tuple[Grant, tuple[Grant, ...]], ...] = (
            ("refresh_token", ("refresh_token", "client_credentials")),
            ("client_credentials", ("client_credentials",)),
        )
        for step, grants in steps:
            if step in tried:
                continue
            tried.add(step)
            if current is not None and usable:
                return current.access_token
            issued = await self._wait(self._renewal or self._start(grants), deadline_s)
            tried.add(issued.grant)
            return issued.access_token
        return None

    async def aclose(self) -> None:
        """Stop a renewal that runs; its waiters are cancelled."""
        renewal, self._renewal = self._renewal, None
        if renewal is not None and renewal.task is not None and not renewal.task.done():
            renewal.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal.task

    async def idle(self) -> None:
        """Wait until no renewal runs (its outcome is not raised here)."""
        while (renewal := self._renewal) is not None and renewal.task is not None:
            await asyncio.wait({renewal.task})
            await asyncio.sleep(0)  # let its done callback run

    def _start(self, grants: tuple[Grant, ...]) -> _Renewal:
        renewal = _Renewal(grants)
        renewal.task = asyncio.get_running_loop().create_task(self._renew(renewal))
        renewal.task.add_done_callback(lambda task: self._settle(renewal, task))
        self._renewal = renewal
        return renewal

    async def _wait(self, renewal: _Renewal, deadline_s: float) -> _Issued:
        waiter = _Waiter(deadline_s, asyncio.get_running_loop().create_future())
        renewal.waiters.append(waiter)
        return await waiter.result

    async def _renew(self, renewal: _Renewal) -> _Issued:
        if "refresh_token" in renewal.grants and self._refresh_token is not None:
            try:
                return await self._grant_refresh(self._refresh_token, renewal)
            except AuthError as exc:
                logger.info("refresh-token grant refused (%s); using client credentials", _why(exc))
        return await self._grant_client_credentials(renewal)

    def _settle(self, renewal: _Renewal, task: asyncio.Task[_Issued]) -> None:
        if self._renewal is renewal:
            self._renewal = None
        if not task.cancelled() and task.exception() is not None:
            # Keep handing out a still valid token; try again later, not on every call.
            self._failed_renewals += 1
            self._calm_until_s = self._clock() + self._backoff.ceiling_s(self._failed_renewals - 1)
        elif not task.cancelled():
            self._failed_renewals = 0
        renewal.settle(task)

    def invalidate(self) -> None:
        """Forget the cached access token (the refresh token is kept)."""
        self._token = None

    async def _grant_client_credentials(self, renewal: _Renewal) -> _Issued:
        form = {
            "client_id": self.client_id,
            "client_secret": self._secret.get_secret_value(),
            "grant_type": "client_credentials",
            "scope": "integ",
        }
        return await self._grant(form, "client_credentials", renewal)

    async def _grant_refresh(self, refresh_token: str, renewal: _Renewal) -> _Issued:
        form = {"client_id": self.client_id, "grant_type": "refresh_token", "refresh_token": refresh_token}
        try:
            return await self._grant(form, "refresh_token", renewal)
        except AuthError:
            # A refused refresh token stays refused; don't offer it again.
            self._refresh_token = None
            raise

    async def _grant(self, form: Mapping[str, str], grant: Grant, renewal: _Renewal) -> _Issued:
        """Run one grant (with retries of transient failures) and cache its token."""
        request = RequestInfo("POST", TOKEN_PATH)
        started_s = self._clock()
        attempts = 0
        while True:
            attempts += 1
            sent_at_s = self._clock()
            retry_after_s: float | None = None
            try:
                status, retry_after, body = await self._post(form, request)
            except TransportError as exc:
                failure: ApiError = exc
            else:
                if 200 <= status < 300:
                    try:
                        return _Issued(self._accept(body, grant, sent_at_s, request, attempts), grant)
                    except DecodeError as exc:
                        # Most likely cut short without framing; asking again is harmless.
                        failure = exc
                else:
                    details = self._error_details(body, status)
                    if status in _REFUSED:
                        what = "client credentials" if grant == "client_credentials" else "refresh token"
                        raise AuthError(
                            f"{what} rejected by the token endpoint ({_summary(details)})",
                            status=status,
                            errors=details,
                            request=request,
                            attempts=attempts,
                        )
                    failure = status_error(status, details, request=request, attempts=attempts)
                    if status not in _TRANSIENT and status < 500:
                        raise failure  # 404, 405, ...: a wrong URL, not a blip
                    retry_after_s = parse_retry_after(retry_after, now_s=time.time())
            failure.attempts = attempts
            delay_s = self._backoff.next_delay_s(
                attempts, self._clock() - started_s, self._rng, retry_after_s=retry_after_s
            )
            if delay_s is None:
                raise failure
            # Whoever cannot wait that long gets this failure now, not after the wait.
            renewal.release_before(self._clock() + delay_s, failure)
            logger.warning("token request failed (%s); retrying in %.2fs", _why(failure), delay_s)
            await self._sleep(delay_s)

    async def _post(self, form: Mapping[str, str], request: RequestInfo) -> tuple[int, str | None, bytes]:
        session = self._session if isinstance(self._session, aiohttp.ClientSession) else self._session()
        self.requests_sent += 1
        try:
            async with session.post(
                self.token_url,
                data=dict(form),
                headers={"Accept": JSON_MIME},
                timeout=self._timeout or aiohttp.ClientTimeout(total=30),
            ) as resp:
                return resp.status, resp.headers.get("Retry-After"), await resp.read()
        except TimeoutError as exc:
            # aiohttp's own timeout errors are TimeoutErrors too, so this catches all of them.
            raise ApiTimeoutError("token endpoint did not answer in time", request=request) from exc
        except aiohttp.ClientError as exc:
            raise ApiConnectError(
                f"token endpoint unreachable ({type(exc).__name__})", request=request
            ) from exc

    def _accept(
        self, body: bytes, grant: Grant, sent_at_s: float, request: RequestInfo, attempts: int
    ) -> str:
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise DecodeError(
                "token endpoint answered with malformed JSON", request=request, attempts=attempts
            ) from exc
        access = doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(access, str) or not access:
            raise DecodeError(
                "token endpoint answer lacks 'access_token'", request=request, attempts=attempts
            )
        refresh = doc.get("refresh_token")
        if isinstance(refresh, str) and refresh:
            self._refresh_token = refresh
        expires_in = doc.get("expires_in")
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
            # Renew a little early, in the background, so the next token is there before this one lapses.
            margin_s = min(self._renew_margin_s, self._renew_fraction * expires_in)
            renew_at_s = sent_at_s + expires_in - margin_s
            expires_at_s = sent_at_s + expires_in
        else:
            # Without a lifetime we keep the token until the API rejects it.
            renew_at_s = expires_at_s = math.inf
        self._token = _Token(access, renew_at_s, expires_at_s)
        logger.info("access token obtained (grant %s, expires_in %s)", grant, expires_in)
        return access

    def _error_details(self, body: bytes, status: int) -> list[ApiErrorDetail]:
        try:
            doc: Any = json.loads(body)
        except ValueError:
            return []
        details = parse_error_details(doc)
        if not details and isinstance(doc, dict) and isinstance(doc.get("error"), str):
            # OAuth2 error shape: {"error": "invalid_client", "error_description": "..."}
            description = doc.get("error_description")
            details = [
                ApiErrorDetail(
                    status=status,
                    code=doc["error"],
                    title=str(description) if description is not None else "",
                )
            ]
        return [self._scrub(d) for d in details]

    def _scrub(self, detail: ApiErrorDetail) -> ApiErrorDetail:
        # An echoing server must not smuggle our secret into an exception message.
        secret = self._secret.get_secret_value()
        if not secret:
            return detail
        return ApiErrorDetail(
            status=detail.status,
            code=detail.code.replace(secret, "**********"),
            title=detail.title.replace(secret, "**********"),
            details=detail.details.replace(secret, "**********") if detail.details else detail.details,
            source_path=detail.source_path,
        )


def _summary(details: list[ApiErrorDetail]) -> str:
    return "; ".join(f"{d.code}: {d.title}" if d.title else d.code for d in details) or "no error body"


def _why(exc: ApiError) -> str:
    if isinstance(exc, HTTPStatusError):
        return f"{exc.status} {','.join(exc.codes) or 'no code'}"
    return exc.message
