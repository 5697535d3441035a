"""A worker host whose clock runs a minute fast does not start retries early."""

from __future__ import annotations

import time

import arq.worker
import pytest
from arq.connections import ArqRedis

from tests.delivery_kit import enqueue, events, make_settings, stats, until, worker
from worker.errors import RetryLater
from worker.plugin import HandlerContext, RetryPolicy, handler

SKEW_MS = 60_000


async def test_a_fast_host_clock_does_not_shorten_a_retry(
    arq_redis: ArqRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # arq lists due jobs by the host's clock: this host's is a minute ahead of Redis's.
    real = arq.worker.timestamp_ms
    monkeypatch.setattr(arq.worker, "timestamp_ms", lambda: real() + SKEW_MS)
    settings = make_settings(redis_url)
    started: list[float] = []

    @handler("h", retry=RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.01))
    async def h(ctx: HandlerContext) -> None:
        started.append(time.monotonic())
        if ctx.attempt == 1:
            raise RetryLater(2.0, "not yet")

    async with worker(settings, [h]):
        await enqueue(arq_redis, settings, events(1, 1))
        await until(lambda: len(started) == 2, timeout_s=15, what="the retry")
        await until(lambda: _done(arq_redis, settings), what="done")
    # Listed a minute early, but not started before its time on Redis's clock.
    assert started[1] - started[0] >= 1.9


async def _done(redis: ArqRedis, settings: object) -> bool:
    return (await stats(redis, settings, "h")).get("done", 0) == 1  # type: ignore[arg-type]
