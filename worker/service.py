"""Wiring: builds the poller and the worker from settings, and runs them.

The command line, the demo and the end-to-end tests all start flexworker through
these functions, so what is tested is what runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import aiohttp
import redis
import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker

from worker.api.backoff import Backoff
from worker.api.client import IntegrationClient
from worker.api.models import Transaction
from worker.deliver.delivery import Delivery
from worker.deliver.dlq import init_sentry
from worker.deliver.runner import build_worker, keep_alive
from worker.deliver.upgrade import persist_queued
from worker.errors import HandlerStartupError, StoreError
from worker.events import SourceName
from worker.poll.cursor import CursorStore
from worker.poll.lease import Lease
from worker.poll.poller import Poller, ProgressWatcher
from worker.poll.skipped import SkippedItems
from worker.poll.sources import CycleReport, Source
from worker.poll.sources.events import EventsSource
from worker.poll.sources.transactions import TransactionsSource
from worker.queue.enqueue import EventQueue
from worker.queue.keys import Keys
from worker.registry import LoadedHandler, activate, load_handlers
from worker.settings import Settings

__all__ = ["build_poller", "open_redis", "poller_lease", "run_poller", "run_worker", "started_handlers"]

#: What counts as Redis being away (waited out); any other Redis error (a script refused, say)
#: is a fault that ends the worker with one line instead of a loop of outage warnings.
_OUTAGE = (redis.ConnectionError, redis.TimeoutError, OSError)

#: How long a stopping worker lets running attempts finish before cancelling them.
SHUTDOWN_GRACE_S = 10.0


@contextlib.asynccontextmanager
async def open_redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    """A connection pool to ``REDIS_URL``; a one-line :class:`StoreError` if unreachable."""
    try:
        pool = await create_pool(
            RedisSettings.from_dsn(settings.redis_url),
            default_queue_name=settings.queue_name,
            retry=0,
        )
    except (redis.RedisError, OSError) as exc:
        raise StoreError(f"cannot connect to Redis at REDIS_URL: {exc}") from exc
    try:
        yield pool
    finally:
        await pool.aclose()


def poller_lease(settings: Settings, redis_pool: ArqRedis) -> Lease:
    return Lease(redis_pool, Keys(settings.redis_prefix).poller_lease, ttl_s=settings.lease_ttl_s)


def build_poller(
    settings: Settings,
    client: IntegrationClient,
    redis_pool: ArqRedis,
    *,
    source: SourceName | None = None,
    since: datetime | None = None,
) -> Poller:
    """A poller for ``source`` (default: the setting), starting at ``since`` when no cursor exists."""
    chosen: Source
    if (source or settings.source) == "events":
        include = settings.include

        async def fetch_related(transaction_id: UUID) -> Transaction:
            return await client.transactions_show(transaction_id, include=include)

        chosen = EventsSource(client, start_at=since, fetch_related=fetch_related if include else None)
    else:
        chosen = TransactionsSource(
            client,
            lookback_s=settings.lookback_s,
            start_at=since,
            include=settings.include,
            page_cap=settings.api_page_cap,
            # An hour inside the seen retention: emitting further back could queue an event twice.
            history_reach_s=settings.seen_retention_s - 3600,
        )
    queue = EventQueue(
        redis_pool,
        prefix=settings.redis_prefix,
        queue_name=settings.queue_name,
        seen_retention_s=settings.seen_retention_s,
    )
    return Poller(
        chosen,
        queue,
        CursorStore(redis_pool, settings.redis_prefix),
        poller_lease(settings, redis_pool),
        idle_interval_s=settings.idle_interval_s,
        skipped=SkippedItems.from_settings(redis_pool, settings),
    )


async def run_poller(
    settings: Settings,
    stop: asyncio.Event,
    *,
    once: bool = False,
    source: SourceName | None = None,
    since: datetime | None = None,
    max_duration_s: float | None = None,
    watcher: ProgressWatcher | None = None,
) -> CycleReport | None:
    """Poll until ``stop`` is set; or, when ``once``, run one cycle and return its report.

    A ``once`` cycle ends early, at a checkpoint, when ``stop`` is set or
    ``max_duration_s`` has passed (the report then says it is not complete).
    """
    async with open_redis(settings) as redis_pool, IntegrationClient.from_settings(settings) as client:
        poller = build_poller(settings, client, redis_pool, source=source, since=since)
        if once:
            return await poller.run_once(max_duration_s=max_duration_s, stop=stop, watcher=watcher)
        await poller.run(stop)
        return None


@contextlib.asynccontextmanager
async def started_handlers(handlers: Sequence[LoadedHandler]) -> AsyncIterator[None]:
    """Run each handler's ``startup()`` (in order), and ``shutdown()`` of those started on the way out."""
    started: list[LoadedHandler] = []
    try:
        for loaded in handlers:
            try:
                await loaded.handler.startup()
            except Exception as exc:
                problem = " ".join(str(exc).split())
                raise HandlerStartupError(
                    f"handler {loaded.name!r} failed to start: {type(exc).__name__}: {problem}"
                ) from exc
            started.append(loaded)
        yield
    finally:
        for loaded in reversed(started):
            try:
                await loaded.handler.shutdown()
            except Exception as exc:  # one handler's failing shutdown must not keep the others open
                structlog.get_logger(__name__).error(
                    "handler shutdown failed", handler=loaded.name, error=type(exc).__name__
                )


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    handlers: Sequence[Any] | None = None,
    rng: random.Random | None = None,
) -> None:
    """Run the arq worker until ``stop`` is set.

    ``handlers`` defaults to those ``FLEXWORKER_HANDLERS`` enables; tests and the
    demo may pass handlers in any form :func:`worker.registry.activate` takes
    (a ``HandlerSpec``, a ``Handler`` subclass or instance, an older-form object).
    """
    loaded = load_handlers(settings) if handlers is None else [activate(h, settings) for h in handlers]
    init_sentry(settings)
    async with (
        open_redis(settings) as redis_pool,
        IntegrationClient.from_settings(settings) as client,
        aiohttp.ClientSession() as http,
        started_handlers(loaded),
    ):
        delivery = Delivery(redis_pool, settings, loaded, client=client, http=http, rng=rng)
        # Jobs an earlier version queued carry arq's one-day expiry: drop it before anything runs.
        await persist_queued(redis_pool, delivery.keys, queue_name=settings.queue_name)
        while True:
            worker = build_worker(settings, redis_pool, delivery)
            heartbeat = asyncio.create_task(keep_alive(worker, delivery))
            try:
                await _run_arq_worker(worker, stop)
                return
            except _OUTAGE as exc:
                # Redis went away under the worker: wait for it, then start a fresh arq worker on the
                # same pool. Queued jobs are in Redis; the ones that were running run again.
                await _wait_for_redis(redis_pool, stop, exc, limit_s=settings.redis_outage_limit_s)
                if stop.is_set():
                    return
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat


async def _run_arq_worker(worker: Worker, stop: asyncio.Event) -> None:
    """Run ``worker`` until ``stop``; raise what ended it early (a Redis failure, say)."""
    task = asyncio.create_task(worker.async_run())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        # Stop taking jobs, give running attempts a moment to settle, then cancel the rest
        # (a cancelled attempt is given back and runs again later).
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, redis.RedisError, OSError):
            await task
        running = [t for t in worker.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=SHUTDOWN_GRACE_S)
        if stop.is_set():
            try:
                await worker.close()  # closes the pool too: only when the worker is done for good
            except asyncio.CancelledError:
                # close() re-raises the cancellation of a job it cancelled; ours must go on.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        else:
            for job in worker.tasks.values():
                job.cancel()
    if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
        if isinstance(exc, _OUTAGE):
            raise exc
        raise StoreError(f"worker stopped: {exc}") from exc


async def _wait_for_redis(
    redis_pool: ArqRedis, stop: asyncio.Event, error: BaseException, *, limit_s: float
) -> None:
    """Ping Redis with backoff until it answers; one warning now, one line when it is back.

    Past ``limit_s`` the outage ends the worker with one clear :class:`StoreError`.
    """
    log = structlog.get_logger(__name__)
    log.warning("Redis unreachable; the worker waits for it", error=type(error).__name__, limit_s=limit_s)
    started_s = time.monotonic()
    backoff = Backoff(base_s=0.2, cap_s=5.0, max_attempts=1)
    rng = random.Random()
    for attempt in itertools.count():
        if stop.is_set():
            return
        try:
            await redis_pool.ping()
        except (redis.RedisError, OSError) as exc:
            waited_s = time.monotonic() - started_s
            if waited_s >= limit_s:
                raise StoreError(
                    f"Redis unreachable for {waited_s:.0f} s (FLEXWORKER_REDIS_OUTAGE_LIMIT_S={limit_s:g}): "
                    f"{' '.join(str(exc).split())}"
                ) from exc
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff.delay_s(attempt, rng) + 0.05)
            continue
        log.warning(
            "Redis reachable again; the worker goes on", after_s=round(time.monotonic() - started_s, 1)
        )
        return
