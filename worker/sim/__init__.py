"""A local, faithful simulator of the Sharetribe Integration API.

This is the surface tests, the demo and plugin authors use::

    from worker.sim import FaultConfig, SimConfig, Simulator, serve

    sim = Simulator(SimConfig(seed=7, rate_limits=None))
    sim.traffic.step(50)                      # 50 legal transitions, right now
    async with serve(sim) as base_url:        # real HTTP on 127.0.0.1, random port
        ...                                   # point a client at base_url with
                                              # sim.config.client_id / client_secret
        sim.faults = FaultConfig(error_rate=0.2)   # misbehave from now on
        sim.expire_tokens()                   # every access token answers 401 now
    assert sim.stats.too_many_requests == 0   # counters of what was answered
    sim.store.transition_log                  # ground truth: every transition applied
    sim.store.delete_user(user_id)            # deletions and bans at chosen moments

Parts:

* :class:`SimConfig` — credentials, token lifetime, page cap, rate limits
  (``None`` = off; the default is the dev marketplace preset), faults, seed,
  live traffic rate, reviews and the traffic's :class:`Activity` (messages,
  deletions, bans; off by default, :data:`LIVELY` in ``flexworker sim`` and the
  demo), clock (a :class:`ManualClock` in tests).
* :class:`Simulator` — owns the :class:`~worker.sim.store.Store`, the
  :class:`~worker.sim.traffic.Traffic` generator, the token authority, the rate
  limiter, the fault injector and the :class:`~worker.sim.faults.SimStats`.
* :func:`serve` — async context manager running the app on a TCP port (live
  traffic runs while it is open when ``traffic_rate > 0``); yields the base URL.
* :func:`run_simulator` — serve until cancelled, printing the URL and
  credentials (the ``flexworker sim`` command).

HTTP routes are listed in :mod:`worker.sim.app` (the API) and
:mod:`worker.sim.admin` (``/_sim/``); undocumented API behaviour the
simulator had to choose is described in :mod:`worker.sim.app` and
:mod:`worker.sim.query`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from aiohttp import web

from worker.api.ratelimit import PRESETS, RateLimits
from worker.sim.app import TokenAuthority, create_app
from worker.sim.clock import ManualClock
from worker.sim.faults import FaultConfig, FaultInjector, RateLimiter, SimStats
from worker.sim.query import DEFAULT_PAGE_CAP
from worker.sim.store import Clock, LoggedTransition, Store, utc_now
from worker.sim.traffic import LIVELY, Activity, Traffic

__all__ = [
    "LIVELY",
    "Activity",
    "FaultConfig",
    "ManualClock",
    "SimConfig",
    "SimStats",
    "Simulator",
    "Store",
    "Traffic",
    "create_app",
    "run_simulator",
    "serve",
]


@dataclass
class SimConfig:
    """Everything a :class:`Simulator` is built from."""

    client_id: str = "sim-client-id"
    client_secret: str = "sim-client-secret"  # noqa: S105 - a public test credential
    #: Access-token lifetime; the real API's is "some minutes".
    token_lifetime_s: float = 300.0
    #: How many items of a query paging can reach.
    page_cap: int = DEFAULT_PAGE_CAP
    #: Per-client-IP buckets like a dev marketplace; ``None`` turns limiting off.
    rate_limits: RateLimits | None = field(default_factory=lambda: PRESETS["dev"])
    faults: FaultConfig = field(default_factory=FaultConfig)
    #: Seeds ids, names, traffic choices and fault draws.
    seed: int = 0
    #: Live traffic in transitions per second while served (0 = none).
    traffic_rate: float = 0.0
    traffic_users: int = 12
    traffic_listings: int = 8
    #: Source of "now" for the store, token expiry and the ``Date`` header: aware UTC
    #: datetimes (a :class:`ManualClock` in tests).
    clock: Clock = utc_now
    #: Refuse query parameters an endpoint does not know (400 validation-disallowed-key).
    strict_params: bool = True
    marketplace_name: str = "Sim Market"
    #: Review transitions write review resources (``review/created``, ``review/updated``).
    #: Off by default: reviews draw ids, so turning them on changes a seed's later ids.
    reviews: bool = False
    #: What traffic does besides transitions (messages, deletions, bans); all off by
    #: default so a seed's traffic stays what it was; :data:`LIVELY` for a demo.
    activity: Activity = field(default_factory=Activity)


class Simulator:
    """One simulated marketplace and the knobs tests turn on it."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config = config or SimConfig()
        self.store = Store(
            seed=config.seed,
            clock=config.clock,
            marketplace_name=config.marketplace_name,
            reviews=config.reviews,
        )
        self.stats = SimStats()
        self.auth = TokenAuthority(
            config.client_id, config.client_secret, config.token_lifetime_s, config.clock
        )
        self.rate_limiter = RateLimiter(config.rate_limits)
        self.fault_injector = FaultInjector(config.faults, self.stats, seed=config.seed)
        self.traffic = Traffic(
            self.store,
            seed=config.seed,
            rate=config.traffic_rate,
            users=config.traffic_users,
            listings=config.traffic_listings,
            activity=config.activity,
        )

    @property
    def faults(self) -> FaultConfig:
        """The fault config in force; assign a new one to change behaviour at once."""
        return self.fault_injector.config

    @faults.setter
    def faults(self, config: FaultConfig) -> None:
        self.fault_injector.config = config

    @property
    def rate_limits(self) -> RateLimits | None:
        """The rate limits in force; assigning resets every client's buckets."""
        return self.rate_limiter.limits

    @rate_limits.setter
    def rate_limits(self, limits: RateLimits | None) -> None:
        self.rate_limiter.limits = limits

    @property
    def grants(self) -> dict[str, int]:
        """Successful token grants so far by ``grant_type``."""
        return dict(self.auth.grants)

    @property
    def transition_log(self) -> list[LoggedTransition]:
        """Every transition applied so far, in order (ground truth)."""
        return list(self.store.transition_log)

    def start_traffic(self, rate: float | None = None) -> None:
        """Start live traffic (at ``rate`` transitions per second if given) in the running loop."""
        if rate is not None:
            self.traffic.rate = rate
        self.traffic.start()

    async def stop_traffic(self) -> None:
        """Stop live traffic; transitions already applied stay."""
        await self.traffic.stop()

    def expire_tokens(self) -> int:
        """Expire every access token now; returns how many were still valid."""
        return self.auth.expire_all()

    @cached_property
    def app(self) -> web.Application:
        """An application for in-process test clients; :func:`serve` builds its own."""
        return create_app(self)


@asynccontextmanager
async def serve(sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``sim`` on a real TCP port (0 = any free one) and yield ``http://host:port``."""
    runner = web.AppRunner(create_app(sim), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound: Any = runner.addresses[0]
        url = f"http://{host}:{bound[1]}"
        if sim.traffic.rate > 0:
            sim.traffic.start()
        try:
            yield url
        finally:
            await sim.traffic.stop()
    finally:
        await runner.cleanup()


async def run_simulator(config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve a simulator until cancelled, after printing where it listens and how to log in."""
    config = config or SimConfig()
    sim = Simulator(config)
    async with serve(sim, host, port) as url:
        print(
            f"flexworker sim listening on {url} client_id={config.client_id} "
            f"client_secret={config.client_secret} seed={config.seed} rate={config.traffic_rate}/s",
            flush=True,
        )
        await asyncio.Event().wait()
