"""End to end: simulator → poller → Redis/arq → worker → jsonl, against ground truth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
import redis.asyncio as aioredis

from handlers.jsonl import read_jsonl
from tests.e2e import Harness
from worker.api.ratelimit import BucketSpec, RateLimits
from worker.ops.redis_server import RedisServer
from worker.sim import FaultConfig, SimConfig, Simulator, serve

#: Five queries a second with a burst of three: a poller without client-side limits runs into 429s.
TIGHT_LIMITS = RateLimits(
    queries=BucketSpec(initial=3, refill_amount=1, refill_interval_s=0.2, capacity=3),
    commands=BucketSpec(initial=3, refill_amount=1, refill_interval_s=0.2, capacity=3),
)


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(seed=3, rate_limits=None)


@pytest.fixture
async def harness(sim_config: SimConfig, redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Harness]:
    sim = Simulator(sim_config)
    async with serve(sim) as base_url:
        h = Harness(sim, base_url, redis_server.url, tmp_path)
        try:
            yield h
        finally:
            await sim.stop_traffic()
            for task in h.tasks:
                task.cancel()
            await asyncio.gather(*h.tasks, return_exceptions=True)


async def stop_all(h: Harness, stop: asyncio.Event) -> None:
    stop.set()
    results = await asyncio.wait_for(asyncio.gather(*h.tasks, return_exceptions=True), timeout=15)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    h.tasks.clear()


async def stop_one(h: Harness, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Stop one service task (a poller being restarted or replaced) and forget it."""
    stop.set()
    await asyncio.wait_for(task, timeout=15)
    h.tasks.remove(task)


async def run_traffic(h: Harness, rate: float, until_transitions: int, *, timeout_s: float = 30.0) -> None:
    """Live traffic until the simulator has applied ``until_transitions`` in all."""
    h.sim.start_traffic(rate)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(h.sim.transition_log) < until_transitions:
        assert asyncio.get_running_loop().time() < deadline, "traffic too slow"
        await asyncio.sleep(0.02)
    await h.sim.stop_traffic()


async def test_live_traffic_is_delivered_exactly_once(harness: Harness) -> None:
    h = harness
    stop = asyncio.Event()
    since = datetime.now(UTC)
    h.start_poller(stop, since=since)
    h.start_worker(stop)
    await run_traffic(h, rate=1000, until_transitions=2000)
    await h.wait_delivered(since)
    await stop_all(h, stop)
    h.assert_exactly_once(since)
    ats = [t.created_at for t in h.sim.transition_log]
    assert len(ats) - len(set(ats)) > 50, "traffic should put many transitions in one millisecond"


async def test_restarted_poller_resumes_from_its_cursor(harness: Harness) -> None:
    h = harness
    since = datetime.now(UTC)
    worker_stop = asyncio.Event()
    h.start_worker(worker_stop)
    first = asyncio.Event()
    poller = h.start_poller(first, since=since)
    await run_traffic(h, rate=500, until_transitions=300)
    await h.wait_delivered(since)
    await stop_one(h, first, poller)
    # The marketplace moves on while no poller runs.
    await run_traffic(h, rate=500, until_transitions=700)
    second = asyncio.Event()
    # A different --since must not matter now: the stored cursor wins.
    h.start_poller(second, since=datetime.now(UTC))
    await h.wait_delivered(since)
    second.set()
    await stop_all(h, worker_stop)
    h.assert_exactly_once(since)


async def test_ties_in_one_millisecond(harness: Harness) -> None:
    h = harness
    h.sim.traffic.setup()
    store = h.sim.store
    at = store.now() + timedelta(seconds=1)
    listings = h.sim.traffic.listings
    customers = h.sim.traffic.users
    since = at - timedelta(seconds=1)
    stop = asyncio.Event()
    h.start_poller(stop, since=since)
    h.start_worker(stop)
    for i in range(250):
        listing = listings[i % len(listings)]
        customer = next(u for u in customers if u.id != listing.author_id)
        store.initiate_transaction(listing.id, customer.id, "transition/inquire", at=at)
    await h.wait_delivered(since)
    await stop_all(h, stop)
    h.assert_exactly_once(since)
    assert len({t.created_at for t in h.sim.transition_log if t.created_at >= since}) == 1


@pytest.mark.parametrize("source", ["transactions", "events"])
async def test_each_source_delivers_everything(harness: Harness, source: str) -> None:
    h = harness
    since = datetime.now(UTC)
    stop = asyncio.Event()
    h.start_poller(stop, source=source, since=since)  # type: ignore[arg-type]
    h.start_worker(stop)
    await run_traffic(h, rate=800, until_transitions=800)
    await h.wait_delivered(since)
    await stop_all(h, stop)
    h.assert_exactly_once(since)


async def test_switching_source_delivers_no_duplicates(harness: Harness) -> None:
    h = harness
    since = datetime.now(UTC)
    worker_stop = asyncio.Event()
    h.start_worker(worker_stop)
    transactions_stop = asyncio.Event()
    poller = h.start_poller(transactions_stop, source="transactions", since=since)
    await run_traffic(h, rate=500, until_transitions=300)
    await h.wait_delivered(since)
    await stop_one(h, transactions_stop, poller)
    # The events source starts where the operator says: overlapping what was delivered.
    events_stop = asyncio.Event()
    h.start_poller(events_stop, source="events", since=since)
    await run_traffic(h, rate=500, until_transitions=600)
    await h.wait_delivered(since)
    events_stop.set()
    await stop_all(h, worker_stop)
    h.assert_exactly_once(since)


async def test_two_pollers_one_lease(harness: Harness) -> None:
    h = harness
    since = datetime.now(UTC)
    worker_stop = asyncio.Event()
    h.start_worker(worker_stop)
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    poller_a = h.start_poller(stop_a, since=since)
    h.start_poller(stop_b, since=since)
    await run_traffic(h, rate=500, until_transitions=300)
    await h.wait_delivered(since)
    # Exactly one of them holds the lease; stopping it hands over to the other.
    client = aioredis.Redis.from_url(h.redis_url)
    try:
        holder_before = await client.get("flexworker:test:lease:poller")
        assert holder_before is not None
        await stop_one(h, stop_a, poller_a)
        await run_traffic(h, rate=500, until_transitions=600)
        await h.wait_delivered(since, timeout_s=30)
        holder_after = await client.get("flexworker:test:lease:poller")
        assert holder_after is not None
    finally:
        await client.aclose()
    stop_b.set()
    await stop_all(h, worker_stop)
    h.assert_exactly_once(since)


@pytest.mark.parametrize("sim_config", [SimConfig(seed=5, rate_limits=None, page_cap=50)])
async def test_backlog_deeper_than_page_cap(harness: Harness) -> None:
    h = harness
    now = h.sim.store.now()
    since = now - timedelta(days=3)
    h.sim.traffic.build_history(400, start=now - timedelta(days=2), end=now - timedelta(minutes=1))
    stop = asyncio.Event()
    h.start_poller(stop, since=since)
    h.start_worker(stop)
    await h.wait_delivered(since)
    await stop_all(h, stop)
    h.assert_exactly_once(since)
    assert len(h.expected(since)) > 400
    assert len(h.sim.store.transactions) > 5 * 50  # far beyond what paging reaches


@pytest.mark.parametrize(
    "sim_config",
    [SimConfig(seed=9, rate_limits=TIGHT_LIMITS, token_lifetime_s=0.5)],
)
async def test_api_faults_lose_nothing(harness: Harness) -> None:
    h = harness
    h.sim.faults = FaultConfig(
        error_rate=0.15, drop_rate=0.05, truncated_rate=0.05, malformed_rate=0.05, latency_s=0.002
    )
    since = datetime.now(UTC)
    stop = asyncio.Event()
    h.start_poller(stop, since=since, rate_limit="off")
    h.start_worker(stop)
    import time as _t

    t0 = _t.monotonic()
    await run_traffic(h, rate=400, until_transitions=600)
    print("TIMING traffic", _t.monotonic() - t0)
    await h.wait_delivered(since, timeout_s=60)
    print("TIMING delivered", _t.monotonic() - t0)
    await stop_all(h, stop)
    print("TIMING stopped", _t.monotonic() - t0)
    h.assert_exactly_once(since)
    faults = h.sim.stats.faults
    assert sum(faults.values()) > 10, faults
    assert h.sim.stats.too_many_requests > 0, h.sim.stats.to_json()
    assert h.sim.grants.get("refresh_token", 0) + h.sim.grants.get("client_credentials", 0) > 2


@pytest.mark.parametrize("source", ["transactions", "events"])
async def test_events_carry_included_parties_and_listing(harness: Harness, source: str) -> None:
    h = harness
    since = datetime.now(UTC)
    stop = asyncio.Event()
    include = ["customer", "provider", "listing"]
    h.start_poller(stop, source=source, since=since, include=include)  # type: ignore[arg-type]
    h.start_worker(stop)
    await run_traffic(h, rate=200, until_transitions=60)
    await h.wait_delivered(since)
    await stop_all(h, stop)
    h.assert_exactly_once(since)
    records = read_jsonl(h.jsonl_path)
    store = h.sim.store
    for record in records:
        tx = store.transactions[UUID(record["transaction_id"])]
        assert record["customer"]["id"] == str(tx.customer_id)
        assert record["provider"]["id"] == str(tx.provider_id)
        assert record["listing"]["id"] == str(tx.listing_id)
        assert record["customer"]["attributes"]["email"]
