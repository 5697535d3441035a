"""The worker rides out a Redis outage, and gives up with one clear line only past its limit."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from arq.connections import RedisSettings, create_pool
from arq.constants import health_check_key_suffix

from tests.delivery_kit import enqueue, events, make_settings, until
from worker.errors import StoreError
from worker.ops.redis_server import RedisServer
from worker.plugin import HandlerContext, handler
from worker.service import run_worker


def warnings_named(captured: list[dict[str, object]], text: str) -> int:
    return sum(1 for entry in captured if entry.get("event") == text)


async def test_the_worker_waits_for_redis_and_goes_on(redis_server: RedisServer) -> None:
    settings = make_settings(redis_server.url)
    seen: list[str] = []

    @handler("recorder")
    async def recorder(ctx: HandlerContext) -> None:
        seen.append(ctx.event.key)

    first, second = events(1, 2), events(2, 2)
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as captured:
        task = asyncio.create_task(run_worker(settings, stop, handlers=[recorder]))
        try:
            pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
            await enqueue(pool, settings, first)
            await pool.aclose()
            await until(lambda: len(seen) == 2, what="the first events")
            redis_server.stop()  # persisted: what was queued survives the restart
            await until(
                lambda: warnings_named(captured, "Redis unreachable; the worker waits for it") == 1,
                what="the worker noticing",
            )
            redis_server.start()
            pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
            await enqueue(pool, settings, second)
            await pool.aclose()
            await until(lambda: len(seen) == 4, timeout_s=20, what="the events after the outage")
            assert not task.done()
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=15)
    assert sorted(seen) == sorted(e.key for e in first + second)
    assert warnings_named(captured, "Redis reachable again; the worker goes on") == 1


async def test_an_outage_past_the_limit_ends_the_worker_with_one_line(redis_server: RedisServer) -> None:
    settings = make_settings(redis_server.url, redis_outage_limit_s=1.0)

    @handler("idle")
    async def idle(ctx: HandlerContext) -> None:
        return None

    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, stop, handlers=[idle]))
    try:
        pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
        await until(
            lambda: pool.exists(settings.queue_name + health_check_key_suffix), what="a running worker"
        )
        await pool.aclose()
        redis_server.stop()
        with pytest.raises(StoreError) as raised:
            await asyncio.wait_for(task, timeout=30)
    finally:
        stop.set()
    message = str(raised.value)
    assert message.startswith("Redis unreachable for ")
    assert "FLEXWORKER_REDIS_OUTAGE_LIMIT_S=1" in message
    assert "\n" not in message
