"""Delivery records, claims and ``ctx.step`` against a real redis-server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from arq.connections import ArqRedis

from tests.delivery_kit import enqueue, events, make_settings, stats, until, worker
from worker.deliver.dlq import DeadLetters
from worker.deliver.idempotency import DeliveryRecords
from worker.deliver.scripts import Claim, DeliveryScripts, Settlement
from worker.errors import RetryLater
from worker.plugin import HandlerContext, RetryPolicy, handler
from worker.queue.keys import Keys
from worker.queue.ordering import Ordering

QUICK = RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.02, timeout_s=5)


async def _settled(redis: ArqRedis, settings: Any, name: str) -> bool:
    counters = await stats(redis, settings, name)
    return counters.get("done", 0) + counters.get("dead_lettered", 0) > 0


async def test_claims_count_attempts_and_respect_other_holders(arq_redis: ArqRedis) -> None:
    keys = Keys("t")
    records = DeliveryRecords(arq_redis, keys, retention_s=3600, clock=lambda: 1_000.0)
    scripts = DeliveryScripts(
        arq_redis, keys, Ordering(arq_redis, keys, queue_name="t:queue"), retention_s=3600
    )

    async def claim(token: str) -> Claim:
        (answer,) = await scripts.claim(
            [("crm", 30)],
            event_key="ev",
            transaction_id="tx",
            index=0,
            token=token,
            own_job_id=token.split("#")[0],
            mode="handler",
            record_now_ms=1_000_000,
        )
        return answer

    first = await claim("job-a#1")
    assert (first.state, first.attempt) == ("claimed", 1)
    # Another run for the same delivery waits while the claim lives, a re-run of the same job
    # (its worker died: arq's try count moved on) included.
    busy = await claim("job-b#1")
    assert busy.state == "busy" and 29 < busy.busy_for_s <= 30
    assert (await claim("job-a#2")).state == "busy"
    # The same run asking again (a lost reply) keeps its claim: a new attempt is counted.
    again = await claim("job-a#1")
    assert (again.state, again.attempt) == ("claimed", 2)
    # An attempt cancelled by a stopping worker is given back.
    await scripts.unclaim("crm", "ev", "job-a#1")
    third = await claim("job-b#1")
    assert (third.state, third.attempt) == ("claimed", 2)
    settle = {
        "event_key": "ev",
        "transaction_id": "tx",
        "index": 0,
        "token": "job-b#1",
        "own_job_id": "job-b",
        "record_now_ms": 1_000_000,
    }
    assert await scripts.settle([Settlement("crm", "done")], **settle) == [True]  # type: ignore[arg-type]
    # A repeat of the same settle (its reply was lost) changes and counts nothing.
    assert await scripts.settle([Settlement("crm", "done")], **settle) == [False]  # type: ignore[arg-type]
    done = await claim("job-c#1")
    assert (done.state, done.own) == ("done", False)
    assert (await claim("job-b#2")).own  # settled by this very job
    record = await records.read("crm", "ev")
    assert (record.status, record.attempts) == ("done", 2)
    assert record.first_attempt_at is not None and record.first_attempt_at.timestamp() == 1_000.0
    assert not await arq_redis.exists(keys.claim("crm", "ev"))
    assert 3590 < await arq_redis.ttl(keys.delivery("crm", "ev")) <= 3600
    assert await arq_redis.hgetall(keys.stats("crm")) == {b"done": b"1"}  # type: ignore[misc]


async def test_step_result_is_returned_on_retry(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    charges: list[int] = []
    results: list[Any] = []

    async def charge(attempt: int) -> dict[str, Any]:
        charges.append(attempt)
        return {"charge_id": "ch_1", "amounts": (100, 200)}

    @handler("billing", retry=QUICK)
    async def billing(ctx: HandlerContext) -> None:
        results.append(await ctx.step("charge", lambda: charge(ctx.attempt)))
        if ctx.attempt == 1:
            raise RetryLater(0, "the receipt service is busy")

    (event,) = events(1, 1)
    async with worker(settings, [billing]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _settled(arq_redis, settings, "billing"), what="done")
    assert charges == [1]  # the side effect ran once
    # Both attempts see the same value, as JSON gives it back (the tuple is a list).
    assert results == [{"charge_id": "ch_1", "amounts": [100, 200]}] * 2
    record = await DeliveryRecords(arq_redis, Keys(settings.redis_prefix), retention_s=60).read(
        "billing", event.key
    )
    assert record.steps["charge"]["state"] == "done"


async def test_a_step_that_raised_runs_again(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    calls: list[int] = []

    async def send(attempt: int) -> str:
        calls.append(attempt)
        if attempt == 1:
            raise ConnectionResetError("reset before the answer")
        return "sms-1"

    @handler("sms", retry=QUICK)
    async def sms(ctx: HandlerContext) -> None:
        await ctx.step("send", lambda: send(ctx.attempt))

    async with worker(settings, [sms]):
        await enqueue(arq_redis, settings, events(1, 1))
        await until(lambda: _settled(arq_redis, settings, "sms"), what="done")
    assert calls == [1, 2]


async def test_an_interrupted_step_asks_if_uncertain(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    created: list[int] = []
    asked: list[int] = []

    async def create_deal(attempt: int) -> str:
        created.append(attempt)
        if attempt == 1:
            await asyncio.sleep(30)  # the handler's timeout cancels it: did the deal get made?
        return "deal-1"

    async def find_deal(attempt: int) -> str | None:
        asked.append(attempt)
        return "deal-found" if attempt == 2 else None

    outcome: list[str] = []

    @handler("crm", retry=RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.01, timeout_s=0.2))
    async def crm(ctx: HandlerContext) -> None:
        outcome.append(
            await ctx.step(
                "deal", lambda: create_deal(ctx.attempt), if_uncertain=lambda: find_deal(ctx.attempt)
            )
        )

    async with worker(settings, [crm]):
        await enqueue(arq_redis, settings, events(1, 1))
        await until(lambda: _settled(arq_redis, settings, "crm"), what="done")
    assert created == [1]
    assert asked == [2]
    assert outcome == ["deal-found"]


async def test_uncertain_step_none_means_it_did_not_happen(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    (event,) = events(1, 1)
    keys = Keys(settings.redis_prefix)
    # What a worker that died inside the step left behind.
    await arq_redis.hset(
        keys.delivery("mail", event.key), "step:send", json.dumps({"state": "started", "attempt": 1})
    )  # type: ignore[misc]
    sent: list[str] = []

    async def send() -> str:
        sent.append("sent")
        return "msg-1"

    async def nothing_sent() -> str | None:
        return None

    @handler("mail", retry=QUICK)
    async def mail(ctx: HandlerContext) -> None:
        await ctx.step("send", send, if_uncertain=nothing_sent)

    async with worker(settings, [mail]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _settled(arq_redis, settings, "mail"), what="done")
    assert sent == ["sent"]


async def test_uncertain_step_without_a_check_is_dead_lettered(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    (event,) = events(1, 1)
    keys = Keys(settings.redis_prefix)
    await arq_redis.hset(
        keys.delivery("refund", event.key), "step:refund", json.dumps({"state": "started", "attempt": 1})
    )  # type: ignore[misc]
    refunds: list[str] = []

    async def refund() -> str:
        refunds.append("refunded")
        return "re_1"

    @handler("refund", retry=QUICK)
    async def refunder(ctx: HandlerContext) -> None:
        await ctx.step("refund", refund)

    async with worker(settings, [refunder]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _settled(arq_redis, settings, "refund"), what="dead letter")
    assert refunds == []
    (letter,) = await DeadLetters(arq_redis, settings).list()
    assert (letter.reason, letter.attempts) == ("permanent", 1)
    assert letter.errors[0].type == "StepUncertainError"
    assert "step 'refund' started in attempt 1" in letter.errors[0].message


async def test_a_result_that_is_not_json_is_permanent(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)

    async def make() -> object:
        return object()

    @handler("odd", retry=QUICK)
    async def odd(ctx: HandlerContext) -> None:
        await ctx.step("make", make)

    async with worker(settings, [odd]):
        await enqueue(arq_redis, settings, events(1, 1))
        await until(lambda: _settled(arq_redis, settings, "odd"), what="dead letter")
    (letter,) = await DeadLetters(arq_redis, settings).list()
    assert (letter.reason, letter.errors[0].type) == ("permanent", "PermanentError")
    assert "not JSON" in letter.errors[0].message
