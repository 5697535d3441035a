"""Where a source starts, run after run: CronJob runs, restarts, a switch of source.

Each run is ``run_poller(once=True)`` against the served simulator and a private
redis-server, as ``flexworker poll --once`` runs it; what is queued is read from Redis.
The simulated API's clock stands a minute behind the host's (the host runs fast), and
between runs a quarter of an hour passes after the traffic, as between CronJob runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.e2e import Harness
from worker.events import SourceName
from worker.ops.redis_server import RedisServer
from worker.service import run_poller
from worker.sim import SimConfig, Simulator, serve
from worker.sim.clock import ManualClock


@pytest.fixture
async def harness(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Harness]:
    clock = ManualClock(datetime.now(UTC) - HOST_AHEAD)
    sim = Simulator(SimConfig(seed=8, rate_limits=None, clock=clock))
    async with serve(sim) as base_url:
        yield Harness(sim, base_url, redis_server.url, tmp_path)


HOST_AHEAD = timedelta(minutes=1)


def traffic(harness: Harness, transitions: int) -> None:
    """Transitions now, then a quarter of an hour until the next run."""
    harness.sim.traffic.step(transitions)
    clock = harness.sim.config.clock
    assert isinstance(clock, ManualClock)
    clock.advance(15 * 60)


async def poll_once(harness: Harness, source: SourceName, **kw: Any) -> None:
    report = await run_poller(harness.settings(), asyncio.Event(), once=True, source=source, **kw)
    assert report is not None and report.complete


async def queued(harness: Harness) -> set[str]:
    client = aioredis.Redis.from_url(harness.redis_url)
    try:
        # Job ids are the namespace prefix and the event key.
        jobs = await client.zrange("flexworker:test:queue", 0, -1)
        return {job.decode().removeprefix("flexworker:test:") for job in jobs}
    finally:
        await client.aclose()


async def test_the_first_start_takes_the_api_clock_not_the_hosts(harness: Harness) -> None:
    # The host runs a minute ahead: a start from its clock would step over the first minute.
    await poll_once(harness, "transactions")
    harness.sim.traffic.step(5)
    await poll_once(harness, "transactions")
    assert await queued(harness) == set(harness.expected())
    assert len(harness.expected()) == 5


async def test_events_source_cron_runs_lose_nothing_between_them(harness: Harness) -> None:
    # No cursor and no --since: the first run fixes the start, and every later run reads from it.
    await poll_once(harness, "events")
    for _ in range(3):
        traffic(harness, 5)
        await poll_once(harness, "events")
    assert await queued(harness) == set(harness.expected())
    assert len(harness.expected()) == 15


async def test_a_switch_to_the_events_source_starts_where_the_transactions_source_left_off(
    harness: Harness,
) -> None:
    since = harness.sim.store.now() - timedelta(minutes=1)
    traffic(harness, 5)
    await poll_once(harness, "transactions", since=since)
    traffic(harness, 5)  # made after the last transactions cycle, before the switch
    await poll_once(harness, "events")
    traffic(harness, 5)
    await poll_once(harness, "events")
    assert await queued(harness) == set(harness.expected())
    assert len(harness.expected()) == 15


async def test_a_switch_back_to_the_transactions_source_starts_where_the_events_source_left_off(
    harness: Harness,
) -> None:
    await poll_once(harness, "events")
    traffic(harness, 5)
    await poll_once(harness, "events")
    traffic(harness, 5)
    await poll_once(harness, "transactions")
    assert await queued(harness) == set(harness.expected())
    assert len(harness.expected()) == 10
