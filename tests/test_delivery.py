"""Delivery against a real redis-server and in-process arq workers: fan-out, retries, DLQ, order."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict

from arq.connections import ArqRedis

from tests.delivery_kit import enqueue, events, make_settings, stats, until, worker
from tests.plugins.legacy import LegacyHandler
from worker.deliver.dlq import DeadLetters
from worker.deliver.idempotency import DeliveryRecords
from worker.errors import PermanentError, RetryLater
from worker.plugin import Handler, HandlerContext, RetryPolicy, Subscription, handler
from worker.queue.keys import Keys
from worker.queue.ordering import HANDLER_JOB_FUNCTION, Ordering, QueuedJob

#: Retries in milliseconds, so tests that exhaust attempts stay fast.
FAST = RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.02, timeout_s=5)


async def test_one_failing_handler_never_reruns_another(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    calls: dict[str, list[str]] = defaultdict(list)

    @handler("steady", retry=FAST)
    async def steady(ctx: HandlerContext) -> None:
        calls["steady"].append(ctx.event.key)

    @handler("flaky", retry=FAST)
    async def flaky(ctx: HandlerContext) -> None:
        calls["flaky"].append(ctx.event.key)
        raise ConnectionResetError("peer reset")

    batch = events(1, 2)
    async with worker(settings, [steady, flaky]):
        await enqueue(arq_redis, settings, batch)
        await until(lambda: DeadLetters(arq_redis, settings).count(), what="dead letters")
        await until(lambda: len(calls["steady"]) == 2 and len(calls["flaky"]) == 6, what="all attempts")
        dead = await DeadLetters(arq_redis, settings).list()
        await until(lambda: _settled(arq_redis, settings, "flaky", 2), what="both dead-lettered")
    assert calls["steady"] == [e.key for e in batch]  # each exactly once, in order
    assert await stats(arq_redis, settings, "steady") == {"done": 2}
    assert await stats(arq_redis, settings, "flaky") == {"retried": 4, "dead_lettered": 2}
    dead = await DeadLetters(arq_redis, settings).list()
    assert {(d.handler, d.reason, d.attempts) for d in dead} == {("flaky", "exhausted", 3)}
    letter = next(d for d in dead if d.event_key == batch[0].key)
    assert [e.attempt for e in letter.errors] == [1, 2, 3]
    assert {(e.type, e.message) for e in letter.errors} == {("ConnectionResetError", "peer reset")}
    assert letter.first_failure_at <= letter.dead_lettered_at
    assert letter.event["key"] == batch[0].key


async def _settled(redis: ArqRedis, settings: object, name: str, n: int) -> bool:
    counters = await stats(redis, settings, name)  # type: ignore[arg-type]
    return counters.get("done", 0) + counters.get("dead_lettered", 0) >= n


async def test_permanent_error_goes_straight_to_the_dlq(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    attempts: list[int] = []

    @handler("strict", retry=FAST)
    async def strict(ctx: HandlerContext) -> None:
        attempts.append(ctx.attempt)
        raise PermanentError("the CRM refused the deal")

    (event,) = events(1, 1)
    async with worker(settings, [strict]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _settled(arq_redis, settings, "strict", 1), what="dead letter")
    assert attempts == [1]
    (letter,) = await DeadLetters(arq_redis, settings).list()
    assert (letter.reason, letter.attempts, letter.transition) == ("permanent", 1, "transition/inquire")
    assert [(e.type, e.message) for e in letter.errors] == [("PermanentError", "the CRM refused the deal")]
    record = await DeliveryRecords(arq_redis, Keys(settings.redis_prefix), retention_s=60).read(
        "strict", event.key
    )
    assert record.status == "dead"
    assert await arq_redis.ttl(Keys(settings.redis_prefix).delivery("strict", event.key)) == -1  # kept


async def test_transient_failures_retry_until_success(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    attempts: list[int] = []

    @handler("eventually", retry=RetryPolicy(max_attempts=5, base_s=0.01, cap_s=0.02))
    async def eventually(ctx: HandlerContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise OSError("connection refused")

    (event,) = events(1, 1)
    async with worker(settings, [eventually]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _settled(arq_redis, settings, "eventually", 1), what="done")
    assert attempts == [1, 2, 3]
    assert await stats(arq_redis, settings, "eventually") == {"retried": 2, "done": 1}
    record = await DeliveryRecords(arq_redis, Keys(settings.redis_prefix), retention_s=60).read(
        "eventually", event.key
    )
    assert (record.status, record.attempts) == ("done", 3)
    assert [e.type for e in record.errors] == ["OSError", "OSError"]
    assert await DeadLetters(arq_redis, settings).count() == 0


async def test_retry_later_waits_at_least_as_asked(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    started: list[float] = []

    @handler("patient", retry=RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.01))
    async def patient(ctx: HandlerContext) -> None:
        started.append(time.monotonic())
        if ctx.attempt == 1:
            raise RetryLater(0.6, "the CRM asked us to come back later")

    async with worker(settings, [patient]):
        await enqueue(arq_redis, settings, events(1, 1))
        await until(lambda: _settled(arq_redis, settings, "patient", 1), what="done")
    assert len(started) == 2
    assert started[1] - started[0] >= 0.6


async def test_timeout_counts_as_transient(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    attempts: list[int] = []

    @handler("slow", retry=RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.01, timeout_s=0.2))
    async def slow(ctx: HandlerContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await asyncio.sleep(30)

    (event,) = events(1, 1)
    async with worker(settings, [slow]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _settled(arq_redis, settings, "slow", 1), what="done")
    assert attempts == [1, 2]
    record = await DeliveryRecords(arq_redis, Keys(settings.redis_prefix), retention_s=60).read(
        "slow", event.key
    )
    assert record.status == "done"
    assert [(e.type, e.message) for e in record.errors] == [("TimeoutError", "attempt timed out after 0.2 s")]


async def test_only_matching_handlers_get_the_event(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    seen: dict[str, list[str]] = defaultdict(list)

    def recorder(name: str, **subscription: object) -> object:
        @handler(name, **subscription)  # type: ignore[arg-type]
        async def record(ctx: HandlerContext) -> None:
            seen[name].append(ctx.event.transition)

        return record

    payments = recorder("payments", transitions=["transition/*payment*"])
    purchases = recorder("purchases", processes=["default-purchase"])
    second = recorder("second", predicate=lambda e: e.index == 1)
    everything = recorder("everything")
    batch = events(1, 3)
    async with worker(settings, [payments, purchases, second, everything]):
        await enqueue(arq_redis, settings, batch)
        await until(lambda: len(seen["everything"]) == 3, what="everything")
        await until(lambda: len(seen["payments"]) == 2 and len(seen["second"]) == 1, what="the others")
    assert seen["payments"] == ["transition/request-payment-after-inquiry", "transition/confirm-payment"]
    assert seen["second"] == ["transition/request-payment-after-inquiry"]
    assert "purchases" not in seen
    # No job at all for what a subscription refuses: nothing counted.
    assert await stats(arq_redis, settings, "purchases") == {}
    assert await stats(arq_redis, settings, "second") == {"done": 1}


async def test_order_within_a_transaction_under_concurrency(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url, worker_max_jobs=20)
    delivered: dict[str, list[int]] = defaultdict(list)
    running: set[str] = set()
    overlap = {"max": 0}
    rng = random.Random(7)

    @handler("ordered")
    async def ordered(ctx: HandlerContext) -> None:
        tx = str(ctx.event.transaction_id)
        assert tx not in running, "two events of one transaction ran at once"
        running.add(tx)
        overlap["max"] = max(overlap["max"], len(running))
        await asyncio.sleep(rng.uniform(0, 0.01))
        delivered[tx].append(ctx.event.index)
        running.discard(tx)

    n_tx, n_events = 40, 6
    # Interleaved, newest first within a transaction: the queue itself gives no order.
    batch = [e for i in range(n_tx) for e in reversed(events(100 + i, n_events))]
    rng.shuffle(batch)
    async with worker(settings, [ordered]):
        # Two poll cycles: the later transitions of each transaction arrive after the first ones.
        await enqueue(arq_redis, settings, [e for e in batch if e.index < 3])
        await enqueue(arq_redis, settings, [e for e in batch if e.index >= 3])
        await until(lambda: sum(map(len, delivered.values())) == n_tx * n_events, timeout_s=30, what="all")
    assert len(delivered) == n_tx
    assert all(indexes == list(range(n_events)) for indexes in delivered.values()), delivered
    assert overlap["max"] > 1, "different transactions should run concurrently"
    assert await stats(arq_redis, settings, "ordered") == {"done": n_tx * n_events}
    # Nothing is left pending.
    assert not [k async for k in arq_redis.scan_iter(match=f"{settings.redis_prefix}:pending:*")]
    assert not [k async for k in arq_redis.scan_iter(match=f"{settings.redis_prefix}:order:*")]


async def test_a_dead_letter_unblocks_the_later_events(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    delivered: list[int] = []

    @handler("picky", retry=FAST)
    async def picky(ctx: HandlerContext) -> None:
        if ctx.event.index == 0:
            raise PermanentError("cannot handle the first one")
        delivered.append(ctx.event.index)

    async with worker(settings, [picky]):
        await enqueue(arq_redis, settings, events(1, 3))
        await until(lambda: delivered == [1, 2], what="the later events")
    assert await stats(arq_redis, settings, "picky") == {"dead_lettered": 1, "done": 2}


async def test_done_record_makes_redelivery_a_no_op(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    calls: list[str] = []

    @handler("once")
    async def once(ctx: HandlerContext) -> None:
        calls.append(ctx.event.key)

    (event,) = events(1, 1)
    keys = Keys(settings.redis_prefix)
    async with worker(settings, [once]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _settled(arq_redis, settings, "once", 1), what="done")
        # The same delivery again, as a new job (arq's own job id dedup is long gone).
        await Ordering(arq_redis, keys, queue_name=settings.queue_name).enqueue(
            [
                QueuedJob(
                    job_id="redelivery",
                    function=HANDLER_JOB_FUNCTION,
                    args=("once", event.model_dump(mode="json")),
                    pending_key=keys.pending("once", event.transaction_id),
                    index=event.index,
                )
            ],
        )
        await until(lambda: _counter(arq_redis, settings, "once", "skipped"), what="skipped")
    assert calls == [event.key]
    assert await stats(arq_redis, settings, "once") == {"done": 1, "skipped": 1}


async def _counter(redis: ArqRedis, settings: object, name: str, counter: str) -> bool:
    return (await stats(redis, settings, name)).get(counter, 0) > 0  # type: ignore[arg-type]


async def test_class_style_and_older_form_handlers(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    lifecycle: list[str] = []

    class Audit(Handler):
        name = "audit"
        subscription = Subscription(transitions=("transition/inquire",))

        async def startup(self) -> None:
            lifecycle.append("startup")

        async def handle(self, ctx: HandlerContext) -> None:
            lifecycle.append(f"handle {ctx.event.transition} attempt {ctx.attempt}")

        async def shutdown(self) -> None:
            lifecycle.append("shutdown")

    legacy = LegacyHandler(settings)
    batch = events(1, 2)
    async with worker(settings, [Audit, legacy]):
        await enqueue(arq_redis, settings, batch)
        await until(lambda: len(legacy.seen) == 2 and len(lifecycle) == 2, what="both handlers")
    assert lifecycle == ["startup", "handle transition/inquire attempt 1", "shutdown"]
    assert legacy.seen == [e.key for e in batch]
