"""Jobs an earlier version queued, and handler jobs for handlers this worker does not run."""

from __future__ import annotations

import json
import time

import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job

from tests.delivery_kit import events, make_settings, stats, until, worker
from worker.deliver import roster
from worker.deliver.dlq import DeadLetters
from worker.deliver.idempotency import DeliveryRecords
from worker.deliver.roster import ORPHAN_GRACE_S
from worker.deliver.upgrade import persist_queued
from worker.plugin import HandlerContext, handler
from worker.queue.keys import Keys
from worker.queue.ordering import EVENT_JOB_FUNCTION, HANDLER_JOB_FUNCTION, handler_job_id

DAY_MS = 86_400_000


def recorder(name: str, seen: list[str]) -> object:
    @handler(name)
    async def record(ctx: HandlerContext) -> None:
        seen.append(ctx.event.key)

    return record


async def test_jobs_an_earlier_version_queued_lose_their_expiry_and_still_run(
    arq_redis: ArqRedis, redis_url: str
) -> None:
    settings = make_settings(redis_url)
    keys = Keys(settings.redis_prefix)
    batch = events(1, 3)
    now_ms = int(time.time() * 1000)
    # As the previous version queued them: the event key as job id, arq's one-day expiry,
    # and an event-level pending set with a TTL.
    for event in batch:
        job = serialize_job(EVENT_JOB_FUNCTION, (event.model_dump(mode="json"),), {}, None, now_ms)
        await arq_redis.psetex(job_key_prefix + event.key, DAY_MS, job)
        await arq_redis.zadd(settings.queue_name, {event.key: now_ms})
        await arq_redis.zadd(keys.order(event.transaction_id), {event.key: event.index})
    await arq_redis.pexpire(keys.order(batch[0].transaction_id), 7_200_000)

    assert await persist_queued(arq_redis, keys, queue_name=settings.queue_name) == 4
    for event in batch:
        assert await arq_redis.pttl(job_key_prefix + event.key) == -1
    assert await arq_redis.pttl(keys.order(batch[0].transaction_id)) == -1
    assert await persist_queued(arq_redis, keys, queue_name=settings.queue_name) == 0  # idempotent

    seen: list[str] = []
    async with worker(settings, [recorder("audit", seen)]):
        await until(lambda: len(seen) == 3, what="the old jobs delivered")
    assert seen == [e.key for e in batch]  # in order
    assert await arq_redis.zcard(settings.queue_name) == 0
    assert not await arq_redis.exists(keys.order(batch[0].transaction_id))


async def _handler_job(redis: ArqRedis, settings: object, name: str, number: int) -> str:
    (event,) = events(number, 1)
    keys = Keys(settings.redis_prefix)  # type: ignore[attr-defined]
    job_id = handler_job_id(event.key, name, keys.prefix)
    now_ms = int(time.time() * 1000)
    job = serialize_job(HANDLER_JOB_FUNCTION, (name, event.model_dump(mode="json")), {}, None, now_ms)
    await redis.set(job_key_prefix + job_id, job)
    await redis.zadd(settings.queue_name, {job_id: now_ms})  # type: ignore[attr-defined]
    await redis.zadd(keys.pending(name, event.transaction_id), {job_id: event.index})
    return event.key


async def test_a_job_for_a_handler_another_live_worker_runs_is_handed_back_untouched(
    arq_redis: ArqRedis, redis_url: str
) -> None:
    settings = make_settings(redis_url)
    seen: list[str] = []
    async with worker(settings, [recorder("crm", seen)]):  # announces crm in the roster
        await until(lambda: arq_redis.hexists(Keys(settings.redis_prefix).handlers, "crm"), what="roster")
    event_key = await _handler_job(arq_redis, settings, "crm", 7)
    async with worker(settings, [recorder("other", [])]):
        job_id = handler_job_id(event_key, "crm", settings.redis_prefix)

        await until(lambda: _handed_back(arq_redis, settings.queue_name, job_id), what="the crm job parked")
        # No attempt, no record, no retry spent.
        record = await DeliveryRecords(arq_redis, Keys(settings.redis_prefix), retention_s=60).read(
            "crm", event_key
        )
        assert (record.status, record.attempts) == (None, 0)
    async with worker(settings, [recorder("crm", seen)]):
        await until(lambda: seen == [event_key], what="crm's worker delivers it")
    assert await stats(arq_redis, settings, "crm") == {"done": 1}


async def test_a_job_for_a_handler_no_worker_has_run_for_long_is_dead_lettered(
    arq_redis: ArqRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker judges a handler gone only after it has been up a while (SETTLE_S): say it has.
    monkeypatch.setattr(roster, "SETTLE_S", 0.0)
    settings = make_settings(redis_url)
    keys = Keys(settings.redis_prefix)
    gone_ms = int((time.time() - ORPHAN_GRACE_S - 60) * 1000)
    entry = {"transitions": ["*"], "processes": ["*"], "at_ms": gone_ms}
    await arq_redis.hset(keys.handlers, "crm", json.dumps(entry))  # type: ignore[misc]
    event_key = await _handler_job(arq_redis, settings, "crm", 8)
    async with worker(settings, [recorder("other", [])]):
        await until(lambda: _dlq_count(arq_redis, settings), what="the orphaned delivery dead-lettered")
    (letter,) = await DeadLetters(arq_redis, settings).list()
    assert (letter.handler, letter.event_key, letter.reason) == ("crm", event_key, "internal")
    assert letter.last_error is not None and letter.last_error.type == "HandlerNotRunning"
    assert "no live worker runs handler 'crm' (not seen for" in letter.last_error.message
    assert await arq_redis.zcard(settings.queue_name) == 0  # the queue drains


async def test_a_fresh_worker_does_not_judge_a_handler_gone(arq_redis: ArqRedis, redis_url: str) -> None:
    # After a whole-fleet outage the first worker up must not dead-letter what a worker running
    # the handler, starting seconds later, will deliver.
    settings = make_settings(redis_url)
    keys = Keys(settings.redis_prefix)
    gone_ms = int((time.time() - ORPHAN_GRACE_S - 60) * 1000)
    entry = {"transitions": ["*"], "processes": ["*"], "at_ms": gone_ms}
    await arq_redis.hset(keys.handlers, "crm", json.dumps(entry))  # type: ignore[misc]
    event_key = await _handler_job(arq_redis, settings, "crm", 9)
    seen: list[str] = []
    async with worker(settings, [recorder("other", [])]):
        job_id = handler_job_id(event_key, "crm", settings.redis_prefix)

        await until(lambda: _handed_back(arq_redis, settings.queue_name, job_id), what="handed back")
        async with worker(settings, [recorder("crm", seen)]):
            await until(lambda: seen == [event_key], what="crm's worker delivers it")
    assert await DeadLetters(arq_redis, settings).count() == 0


async def _dlq_count(redis: ArqRedis, settings: object) -> bool:
    return await DeadLetters(redis, settings).count() > 0  # type: ignore[arg-type]


async def _handed_back(redis: ArqRedis, queue_name: str, job_id: str) -> bool:
    """Whether the job is parked ahead of now, as a hand-back leaves it."""
    score = await redis.zscore(queue_name, job_id)
    return score is not None and score > time.time() * 1000
