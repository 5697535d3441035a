"""Helpers for the delivery tests: events, settings, an in-process worker, polling with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from arq.connections import ArqRedis

from worker.api.models import Transaction
from worker.events import TransitionEvent, events_from_transaction
from worker.queue.enqueue import EventQueue
from worker.queue.keys import Keys
from worker.service import run_worker
from worker.settings import Settings

T0 = datetime(2026, 3, 1, tzinfo=UTC)

BOOKING = [
    "transition/inquire",
    "transition/request-payment-after-inquiry",
    "transition/confirm-payment",
    "transition/accept",
    "transition/complete",
    "transition/review-1-by-customer",
    "transition/review-2-by-provider",
    "transition/expire-review-period",
]


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "sharetribe_client_id": "test-client",
        "sharetribe_client_secret": "test-secret",
        "redis_url": redis_url,
        "namespace": "t",
        "handlers": [],
    }
    values.update(overrides)
    return Settings(_env_file=None, _secrets_dir=None, **values)


def transaction(number: int, names: Sequence[str], process: str = "default-booking") -> Transaction:
    return Transaction.model_validate(
        {
            "id": UUID(int=number),
            "type": "transaction",
            "attributes": {
                "createdAt": T0,
                "processName": process,
                "processVersion": 1,
                "lastTransition": names[-1],
                "lastTransitionedAt": T0 + timedelta(seconds=len(names) - 1),
                "transitions": [
                    {"transition": name, "createdAt": T0 + timedelta(seconds=i), "by": "customer"}
                    for i, name in enumerate(names)
                ],
            },
        }
    )


def events(
    number: int, n: int = 1, *, names: Sequence[str] = BOOKING, process: str = "default-booking"
) -> list[TransitionEvent]:
    """The first ``n`` transitions of transaction ``number`` (ids are ``UUID(int=number)``)."""
    return events_from_transaction(
        transaction(number, names[:n], process), newer_than=None, source="transactions"
    )


async def enqueue(redis: ArqRedis, settings: Settings, batch: Sequence[TransitionEvent]) -> int:
    """Queue events exactly as the poller does."""
    queue = EventQueue(
        redis,
        prefix=settings.redis_prefix,
        queue_name=settings.queue_name,
        seen_retention_s=settings.seen_retention_s,
    )
    return await queue.enqueue(batch)


async def until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], *, timeout_s: float = 10.0, what: str = ""
) -> None:
    """Poll ``check`` until it is true; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await asyncio.sleep(0.02)


async def stats(redis: ArqRedis, settings: Settings, handler: str) -> dict[str, int]:
    raw = await redis.hgetall(Keys(settings.redis_prefix).stats(handler))  # type: ignore[misc]
    return {k.decode(): int(v) for k, v in raw.items()}


@contextlib.asynccontextmanager
async def worker(settings: Settings, handlers: Sequence[Any], **kw: Any) -> AsyncIterator[asyncio.Task[None]]:
    """An in-process worker for the block; it must still be running at the end."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, stop, handlers=handlers, **kw))
    try:
        yield task
        assert not task.done(), f"worker stopped early: {task.exception() if task.done() else ''}"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)
