"""Where a source starts, run after run: CronJob runs, restarts, a switch of source.

Each run is ``run_poller(once=True)`` against the served simulator and a private
redis-server, as ``flexworker poll --once`` runs it; what is queued is read from Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.e2e import Harness
from worker.events import SourceName
from worker.ops.redis_server import RedisServer
from worker.service import run_poller
from worker.sim import SimConfig, Simulator, serve


@pytest.fixture
async def harness(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Harness]:
    sim = Simulator(SimConfig(seed=8, rate_limits=None))
    async with serve(sim) as base_url:
        yield Harness(sim, base_url, redis_server.url, tmp_path)


async def poll_once(harness: Harness, source: SourceName, **kw: Any) -> None:
    report = await run_poller(harness.settings(), asyncio.Event(), once=True, source=source, **kw)
    assert report is not None and report.complete


async def queued(harness: Harness) -> set[str]:
    client = aioredis.Redis.from_url(harness.redis_url)
    try:
        return {key.decode() for key in await client.zrange("flexworker:test:queue", 0, -1)}
    finally:
        await client.aclose()


async def test_events_source_cron_runs_lose_nothing_between_them(harness: Harness) -> None:
    # No cursor and no --since: the first run fixes the start, and every later run reads from it.
    await poll_once(harness, "events")
    for _ in range(3):
        harness.sim.traffic.step(5)
        await poll_once(harness, "events")
    assert await queued(harness) == set(harness.expected())
    assert len(harness.expected()) == 15


async def test_a_switch_to_the_events_source_starts_where_the_transactions_source_left_off(
    harness: Harness,
) -> None:
    harness.sim.traffic.step(5)
    await poll_once(harness, "transactions", since=harness.sim.store.now() - timedelta(minutes=1))
    harness.sim.traffic.step(5)  # made after the last transactions cycle, before the switch
    await poll_once(harness, "events")
    harness.sim.traffic.step(5)
    await poll_once(harness, "events")
    assert await queued(harness) == set(harness.expected())
    assert len(harness.expected()) == 15


async def test_a_switch_back_to_the_transactions_source_starts_where_the_events_source_left_off(
    harness: Harness,
) -> None:
    await poll_once(harness, "events")
    harness.sim.traffic.step(5)
    await poll_once(harness, "events")
    harness.sim.traffic.step(5)
    await poll_once(harness, "transactions")
    assert await queued(harness) == set(harness.expected())
    assert len(harness.expected()) == 10
