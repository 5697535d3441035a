"""Rate limiting, fault injection and answer counting for the simulated API.

Three aiohttp middlewares, outermost first:

* :class:`SimStats` counts every answer under ``/v1/`` by status and every injected
  fault by kind, so tests can assert things like "the simulator answered no 429".
* :class:`RateLimiter` enforces per-client-IP token buckets on
  ``/v1/integration_api/``: GET requests take from the *queries* bucket, POST
  requests from the *commands* bucket; an empty bucket answers 429
  ``too-many-requests`` (no ``Retry-After``, as on the real API).
* :class:`FaultInjector` misbehaves on purpose, per a :class:`FaultConfig`: added
  latency, 500/502/503 answers (half of them with a non-JSON body), connections
  dropped without an answer, bodies cut short of their ``Content-Length``, and 200
  answers whose body does not parse. Drops and 5xx happen *before* the request is
  handled (nothing changed); truncated and malformed bodies happen *after* (a
  command took effect but its answer is lost), and only to 2xx answers.

Both the rate limits and the fault config can be swapped at runtime. Nothing here
touches ``/_sim/``. Fault draws come from a seeded RNG, one draw per request.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from aiohttp import web

from worker.api.ratelimit import RateLimits, TokenBucket
from worker.api.wire import JSON_MIME, encode
from worker.errors import ConfigError
from worker.sim.envelope import error_response, error_tree

__all__ = [
    "API_PREFIX",
    "AUTH_PREFIX",
    "FAULT_KINDS",
    "FaultConfig",
    "FaultInjector",
    "RateLimiter",
    "SimStats",
]

API_PREFIX = "/v1/integration_api/"
AUTH_PREFIX = "/v1/auth/"
FAULT_KINDS = ("error", "drop", "truncated", "malformed")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Set on a request whose connection was dropped: it has no status to count.
_DROPPED = web.RequestKey("sim.dropped", bool)


@dataclass(frozen=True)
class FaultConfig:
    """How often and how the simulator misbehaves. Rates are shares of requests in [0, 1]."""

    error_rate: float = 0.0
    latency_s: float = 0.0
    drop_rate: float = 0.0
    truncated_rate: float = 0.0
    malformed_rate: float = 0.0
    #: Also misbehave on ``/v1/auth/`` (token grants and revocation).
    include_auth: bool = False

    def __post_init__(self) -> None:
        rates = {f: getattr(self, f) for f in ("error_rate", "drop_rate", "truncated_rate", "malformed_rate")}
        for name, value in rates.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"fault {name} must be between 0 and 1, got {value}")
        if sum(rates.values()) > 1.0:
            raise ConfigError("fault rates add up to more than 1")
        if self.latency_s < 0:
            raise ConfigError(f"fault latency_s must not be negative, got {self.latency_s}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, changes: Mapping[str, Any]) -> FaultConfig:
        """A copy with ``changes`` (field names) applied; unknown names raise :class:`ConfigError`."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ConfigError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        try:
            # JSON numbers may arrive as int; the dataclass wants floats.
            typed: dict[str, Any] = {
                k: bool(v) if k == "include_auth" else float(v) for k, v in changes.items()
            }
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"fault settings must be numbers: {exc}") from exc
        return replace(self, **typed)


class SimStats:
    """Counters of what the simulator answered under ``/v1/``."""

    def __init__(self) -> None:
        self.answers: Counter[int] = Counter()
        self.faults: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()

    @property
    def too_many_requests(self) -> int:
        """How many 429 answers were sent."""
        return self.answers[429]

    @property
    def faults_injected(self) -> int:
        """Faults that changed an answer (errors, drops, truncations, malformed bodies); latency aside."""
        return sum(self.faults[kind] for kind in FAULT_KINDS)

    def reset(self) -> None:
        self.answers.clear()
        self.faults.clear()
        self.requests.clear()

    def to_json(self) -> dict[str, Any]:
        return {
            "answers": {str(k): v for k, v in sorted(self.answers.items())},
            "faults": dict(self.faults),
            "requests": dict(self.requests),
            "faultsInjected": self.faults_injected,
            "tooManyRequests": self.too_many_requests,
        }

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        self.requests[f"{request.method} {request.path}"] += 1
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self.answers[exc.status] += 1
            raise
        if not request.get(_DROPPED):
            self.answers[response.status] += 1
        return response


class RateLimiter:
    """Per-client-IP token buckets in front of the Integration API (``None`` limits: off).

    Every address's bucket counts as started when the limits took effect (construction
    or assignment of :attr:`limits`), not at the address's first request: a client
    cannot start pacing itself before the server is up, so a client using the same
    buckets is never ahead of the server. (Started lazily, the server's bucket would be
    younger than the client's by the time of the client's token grant and first
    request, and a client pacing at the refill rate would see 429s.)
    """

    def __init__(self, limits: RateLimits | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._since_s = clock()
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    @property
    def limits(self) -> RateLimits | None:
        return self._limits

    @limits.setter
    def limits(self, limits: RateLimits | None) -> None:
        # New limits start every client with fresh buckets, as of now.
        self._limits = limits
        self._since_s = self._clock()
        self._buckets.clear()

    def _bucket(self, client: str, kind: str) -> TokenBucket:
        assert self._limits is not None
        bucket = self._buckets.get((client, kind))
        if bucket is None:
            spec = self._limits.queries if kind == "queries" else self._limits.commands
            bucket = TokenBucket(spec, clock=self._clock, started_at_s=self._since_s)
            self._buckets[(client, kind)] = bucket
        return bucket

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._limits is None or not request.path.startswith(API_PREFIX):
            return await handler(request)
        kind = "commands" if request.method == "POST" else "queries"
        if self._bucket(request.remote or "unknown", kind).try_take() > 0:
            return error_response(
                request, 429, "too-many-requests", details=f"{kind} limit reached for this client address"
            )
        return await handler(request)


class FaultInjector:
    """Injects the faults a :class:`FaultConfig` asks for; swap ``config`` at any time."""

    def __init__(self, config: FaultConfig, stats: SimStats, *, seed: int | str = 0) -> None:
        self.config = config
        self.stats = stats
        self._rng = random.Random(f"faults:{seed}")

    def _applies(self, path: str) -> bool:
        return path.startswith(API_PREFIX) or (self.config.include_auth and path.startswith(AUTH_PREFIX))

    def _draw(self, config: FaultConfig) -> str | None:
        roll = self._rng.random()
        for kind, rate in (
            ("error", config.error_rate),
            ("drop", config.drop_rate),
            ("truncated", config.truncated_rate),
            ("malformed", config.malformed_rate),
        ):
            if roll < rate:
                return kind
            roll -= rate
        return None

    def _server_error(self, request: web.Request) -> web.Response:
        status = self._rng.choice((500, 502, 503))
        if self._rng.random() < 0.5:
            # Real 5xx bodies come from proxies as often as from the API: no envelope promised.
            return web.Response(
                status=status, text=f"<html><body><h1>{status}</h1></body></html>", content_type="text/html"
            )
        code = {500: "internal-server-error", 502: "bad-gateway", 503: "service-unavailable"}[status]
        # Always JSON: a failing server does not negotiate formats.
        return web.Response(status=status, body=encode(error_tree(status, code)), content_type=JSON_MIME)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self._applies(request.path):
            return await handler(request)
        config = self.config
        if config.latency_s > 0:
            self.stats.faults["latency"] += 1
            await asyncio.sleep(config.latency_s)
        kind = self._draw(config)
        if kind == "error":
            self.stats.faults["error"] += 1
            return self._server_error(request)
        if kind == "drop":
            self.stats.faults["drop"] += 1
            request[_DROPPED] = True
            if request.transport is not None:
                request.transport.abort()
            # Never sent: the connection is gone. aiohttp still wants a response object.
            return web.Response(status=503)
        response = await handler(request)
        if kind is None or not 200 <= response.status < 300 or not isinstance(response, web.Response):
            return response
        body = bytes(response.body) if isinstance(response.body, bytes | bytearray) else b""
        if len(body) < 2:
            return response
        if kind == "malformed":
            self.stats.faults["malformed"] += 1
            # Half a document plus stray closers never parses as JSON or Transit.
            return web.Response(
                status=response.status,
                body=body[: len(body) // 2] + b"}]]",
                content_type=response.content_type,
            )
        self.stats.faults["truncated"] += 1
        cut = web.StreamResponse(status=response.status)
        cut.content_type = response.content_type
        cut.content_length = len(body)
        await cut.prepare(request)
        await cut.write(body[: len(body) // 2])
        if request.transport is not None:
            # close() flushes what was written, then hangs up before the rest.
            request.transport.close()
        return cut
