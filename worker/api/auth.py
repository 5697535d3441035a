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

All renewals go through one lock, so any number of concurrent callers cause one token
request. The client secret and the tokens never appear in reprs, logs or exception
messages.
"""

from __future__ import annotations

import asyncio
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
    renew_at_s: float


class TokenManager:
    """Client-credentials access tokens for one Integration API client.

    ``session`` is the client's shared :class:`aiohttp.ClientSession`, or a callable
    returning it (the client creates its session lazily inside the running loop).
    ``clock`` is a monotonic clock in seconds; ``sleep`` and ``rng`` pace retries of
    the token endpoint.
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
        self._lock = asyncio.Lock()
        #: Token requests sent (every attempt), for metrics and tests.
        self.requests_sent = 0

    def __repr__(self) -> str:
        return f"TokenManager(client_id={self.client_id!r}, token_url={self.token_url!r})"

    async def access_token(self) -> str:
        """A valid access token, from the cache or from one shared token request."""
        token = self._token
        if token is not None and self._clock() < token.renew_at_s:
            return token.access_token
        async with self._lock:
            # Whoever held the lock before us has probably renewed it already.
            token = self._token
            if token is not None and self._clock() < token.renew_at_s:
                return token.access_token
            if self._refresh_token is not None:
                try:
                    return await self._grant_refresh(self._refresh_token)
                except AuthError as exc:
                    logger.info("refresh-token grant refused (%s); using client credentials", _why(exc))
            return await self._grant_client_credentials()

    async def recover(self, rejected_token: str, tried: MutableSet[Grant]) -> str | None:
        """A new token after the API rejected ``rejected_token`` with 401, or ``None``.

        ``tried`` is the caller's record of grants already used for this request and
        is updated here: the first call makes a refresh-token grant (falling back to
        client credentials if that grant is refused), the next a client-credentials
        grant, and after both it returns ``None`` so the caller can give up. If another
        caller already replaced the rejected token, that token is returned instead and
        still counts as a step, which keeps every request's recovery bounded.
        """
        async with self._lock:
            current = self._token
            if current is not None and current.access_token == rejected_token:
                self._token = current = None
            replaced = current is not None and self._clock() < current.renew_at_s
            if "refresh_token" not in tried:
                tried.add("refresh_token")
                if current is not None and replaced:
                    return current.access_token
                if self._refresh_token is not None:
                    try:
                        return await self._grant_refresh(self._refresh_token)
                    except AuthError as exc:
                        logger.info("refresh-token grant refused (%s); using client credentials", _why(exc))
            if "client_credentials" not in tried:
                tried.add("client_credentials")
                if current is not None and replaced:
                    return current.access_token
                return await self._grant_client_credentials()
            return None

    def invalidate(self) -> None:
        """Forget the cached access token (the refresh token is kept)."""
        self._token = None

    async def _grant_client_credentials(self) -> str:
        form = {
            "client_id": self.client_id,
            "client_secret": self._secret.get_secret_value(),
            "grant_type": "client_credentials",
            "scope": "integ",
        }
        return await self._grant(form, "client_credentials")

    async def _grant_refresh(self, refresh_token: str) -> str:
        form = {"client_id": self.client_id, "grant_type": "refresh_token", "refresh_token": refresh_token}
        try:
            return await self._grant(form, "refresh_token")
        except AuthError:
            # A refused refresh token stays refused; don't offer it again.
            self._refresh_token = None
            raise

    async def _grant(self, form: Mapping[str, str], grant: Grant) -> str:
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
                        return self._accept(body, grant, sent_at_s, request, attempts)
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
            delay_s = self._backoff.next_delay_s(
                attempts, self._clock() - started_s, self._rng, retry_after_s=retry_after_s
            )
            if delay_s is None:
                failure.attempts = attempts
                raise failure
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
            # Renew a little early so no request leaves with a token about to lapse in flight.
            margin_s = min(self._renew_margin_s, self._renew_fraction * expires_in)
            renew_at_s = sent_at_s + expires_in - margin_s
        else:
            # Without a lifetime we keep the token until the API rejects it.
            renew_at_s = math.inf
        self._token = _Token(access, renew_at_s)
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
