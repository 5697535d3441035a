"""Issue 9's findings on the delivery path, one test (or a few) each.

Every test here failed on the code before the rework (f69e335) and passes since
(3454713). The ninth finding (a SIGKILLed worker's jobs run again within the
handler's timeout plus a few seconds) is covered by ``tests/test_kill_worker.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from arq.connections import ArqRedis
from arq.constants import health_check_key_suffix, in_progress_key_prefix, job_key_prefix

from tests.delivery_kit import enqueue, events, make_settings, stats, until, worker
from worker import service
from worker.deliver.dlq import DeadLetters
from worker.deliver.failures import ErrorRecord
from worker.deliver.idempotency import STEP_GRACE_S, DeliveryRecord, DeliveryRecords
from worker.deliver.runner import ARQ_TIMEOUT_S
from worker.deliver.scripts import DeliveryScripts, Settlement
from worker.errors import PermanentError, RetryLater
from worker.events import TransitionEvent
from worker.plugin import HandlerContext, RetryPolicy, handler
from worker.queue.keys import Keys
from worker.queue.ordering import (
    EVENT_JOB_FUNCTION,
    HANDLER_JOB_FUNCTION,
    ORDER_PARK_S,
    Ordering,
    QueuedJob,
    event_job_id,
    handler_job_id,
)
from worker.settings import Settings

#: Retries in milliseconds, so tests that exhaust attempts stay fast.
FAST = RetryPolicy(max_attempts=2, base_s=0.01, cap_s=0.02, timeout_s=5)


# -- helpers --------------------------------------------------------------------------------


def _keys(settings: Settings) -> Keys:
    return Keys(settings.redis_prefix)


def _event_job(settings: Settings, event_key: str) -> str:
    return event_job_id(settings.redis_prefix, event_key)


def _handler_job(settings: Settings, event_key: str, name: str) -> str:
    return handler_job_id(event_key, name, settings.redis_prefix)


def _deferred_key(settings: Settings) -> str:
    return _keys(settings).deferred


async def _enqueue_payloads(redis: ArqRedis, settings: Settings, payloads: list[dict[str, Any]]) -> int:
    """Queue raw payloads the way the poller queues events (its enqueue script, its job ids)."""
    keys = _keys(settings)
    jobs = [
        QueuedJob(
            job_id=_event_job(settings, payload["key"]),
            function=EVENT_JOB_FUNCTION,
            args=(payload,),
            pending_key=keys.order(payload["transaction_id"]),
            index=payload["index"],
        )
        for payload in payloads
    ]
    ordering = Ordering(redis, keys, queue_name=settings.queue_name)
    return sum(await ordering.enqueue(jobs, park_s=ORDER_PARK_S))


def _payload(event: TransitionEvent, *, drop: str = "", **override: Any) -> dict[str, Any]:
    """The event as queued, changed the way an older version's (or a corrupted) payload might be."""
    payload = event.model_dump(mode="json")
    payload.pop(drop, None)
    payload.update(override)
    return payload


async def _record(redis: ArqRedis, settings: Settings, name: str, event_key: str) -> DeliveryRecord:
    return await DeliveryRecords(redis, _keys(settings), retention_s=60).read(name, event_key)


async def _quiet(redis: ArqRedis, settings: Settings) -> bool:
    """No job due and none running: whatever is left waits in the future."""
    due = await redis.zrangebyscore(settings.queue_name, "-inf", int(time.time() * 1000))
    running = await redis.keys(in_progress_key_prefix + "*")
    return not due and not running


async def _eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float) -> bool:
    """Whether ``check`` came true before the deadline (the asserts after it say what is wrong)."""
    with contextlib.suppress(AssertionError):
        await until(check, timeout_s=timeout_s)
        return True
    return False


# -- 1. an exception outside the handler lost the event silently -----------------------------


async def test_an_unreadable_payload_is_dead_lettered_and_later_events_go_on(
    arq_redis: ArqRedis, redis_url: str
) -> None:
    settings = make_settings(redis_url)
    delivered: dict[str, list[tuple[str, int]]] = defaultdict(list)

    def recorder(name: str, **subscription: Any) -> Any:
        @handler(name, retry=FAST, **subscription)
        async def record(ctx: HandlerContext) -> None:
            delivered[name].append((str(ctx.event.transaction_id), ctx.event.index))

        return record

    # One plain handler, one with a predicate (which needs the event read before it is asked).
    handlers = [recorder("plain"), recorder("picky", predicate=lambda event: True)]
    first, second = events(1, 3), events(2, 3)
    # The first event of each transaction as an older version might have queued it: keys intact.
    no_actor = _payload(first[0], drop="by")
    garbage = _payload(second[0], transaction="garbage")
    payloads = [no_actor, *map(_payload, first[1:]), garbage, *map(_payload, second[1:])]
    dead_letters = DeadLetters(arq_redis, settings)
    async with worker(settings, handlers):
        assert await _enqueue_payloads(arq_redis, settings, payloads) == 6
        await until(lambda: _dlq_count(dead_letters, 4), timeout_s=8, what="four dead letters")
        await until(
            lambda: all(len(delivered[name]) == 4 for name in ("plain", "picky")), what="the later events"
        )
    letters = await dead_letters.list()
    assert sorted((d.handler, d.event_key, d.reason, d.attempts) for d in letters) == sorted(
        (name, payload["key"], "permanent", 1)
        for name in ("plain", "picky")
        for payload in (no_actor, garbage)
    )
    for letter in letters:
        assert letter.last_error is not None and letter.last_error.type == "ValidationError"
        assert ("by" in letter.last_error.message) or ("transaction" in letter.last_error.message)
        assert letter.transaction_id in (str(first[0].transaction_id), str(second[0].transaction_id))
    for name in ("plain", "picky"):
        assert await stats(arq_redis, settings, name) == {"dead_lettered": 2, "done": 4}
        assert sorted(delivered[name]) == sorted(
            (str(e.transaction_id), e.index) for e in first[1:] + second[1:]
        )


async def _dlq_count(dead_letters: DeadLetters, n: int) -> bool:
    return await dead_letters.count() >= n


async def test_a_predicate_that_raises_ends_in_the_dlq(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    delivered: list[int] = []

    def moody(event: TransitionEvent) -> bool:
        if event.index == 0:
            raise RuntimeError("the predicate broke")
        return True

    @handler("moody", predicate=moody, retry=FAST)
    async def handle(ctx: HandlerContext) -> None:
        delivered.append(ctx.event.index)

    batch = events(1, 2)
    dead_letters = DeadLetters(arq_redis, settings)
    async with worker(settings, [handle]):
        await enqueue(arq_redis, settings, batch)
        await until(lambda: _dlq_count(dead_letters, 1), timeout_s=8, what="a dead letter")
        await until(lambda: delivered == [1], what="the later event")
    (letter,) = await dead_letters.list()
    assert (letter.handler, letter.event_key, letter.reason) == ("moody", batch[0].key, "exhausted")
    assert letter.last_error is not None
    assert (letter.last_error.type, letter.last_error.message) == ("RuntimeError", "the predicate broke")
    assert await stats(arq_redis, settings, "moody") == {"retried": 1, "dead_lettered": 1, "done": 1}


# -- 2. wake-ups pulled jobs out of their backoff ---------------------------------------------


@pytest.mark.parametrize("with_other", [True, False], ids=["another-handler", "no-other-handler"])
async def test_later_events_do_not_wake_a_deferred_retry(
    arq_redis: ArqRedis, redis_url: str, with_other: bool
) -> None:
    settings = make_settings(redis_url)
    attempts: list[int] = []
    others: list[int] = []

    @handler("inquiries", transitions=["transition/inquire"], retry=RetryPolicy(base_s=0.01, cap_s=0.01))
    async def inquiries(ctx: HandlerContext) -> None:
        attempts.append(ctx.attempt)
        raise RetryLater(60, "the CRM asked us to come back in a minute")

    @handler("everything")
    async def everything(ctx: HandlerContext) -> None:
        others.append(ctx.event.index)

    batch = events(1, 4)
    tx = batch[0].transaction_id
    started = time.monotonic()
    async with worker(settings, [inquiries, everything] if with_other else [inquiries]):
        await enqueue(arq_redis, settings, batch[:1])
        await until(lambda: _failed_attempts(arq_redis, settings, batch[0].key, 1), what="the first attempt")
        # The transaction moves on; "inquiries" subscribes to none of its next transitions.
        await enqueue(arq_redis, settings, batch[1:])
        if with_other:
            await until(lambda: others == [0, 1, 2, 3], what="the other handler's deliveries")
        await until(lambda: _settled_order(arq_redis, settings, tx), what="every event job settled")
        await until(lambda: _quiet(arq_redis, settings), what="nothing due")
        record = await _record(arq_redis, settings, "inquiries", batch[0].key)
        assert attempts == [1], f"the deferred retry was woken early: attempts {attempts}"
        assert (record.status, record.attempts) == (None, 1)
        job = _handler_job(settings, batch[0].key, "inquiries")
        assert await arq_redis.zscore(_deferred_key(settings), job) is not None
    assert time.monotonic() - started < 5


async def _failed_attempts(redis: ArqRedis, settings: Settings, event_key: str, n: int) -> bool:
    return len((await _record(redis, settings, "inquiries", event_key)).errors) >= n


async def _settled_order(redis: ArqRedis, settings: Settings, tx: object) -> bool:
    return await redis.zcard(_keys(settings).order(tx)) == 0


# -- 3. a job that outlived arq's timeout was lost ----------------------------------------------


async def test_an_attempt_blocking_the_loop_past_its_timeout_is_retried(
    arq_redis: ArqRedis, redis_url: str
) -> None:
    settings = make_settings(redis_url)
    attempts: list[int] = []

    @handler("blocking", retry=RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.01, timeout_s=0.3))
    async def blocking(ctx: HandlerContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            time.sleep(1.0)  # noqa: ASYNC251  # a synchronous call: the event loop and its timers stand still
            await asyncio.sleep(0.01)  # its next await: the attempt's timeout fires here

    (event,) = events(1, 1)
    async with worker(settings, [blocking]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _status(arq_redis, settings, "blocking", event.key), timeout_s=8, what="settled")
    record = await _record(arq_redis, settings, "blocking", event.key)
    assert (record.status, record.attempts) == ("done", 2)
    assert [(e.type, e.message) for e in record.errors] == [("TimeoutError", "attempt timed out after 0.3 s")]
    assert attempts == [1, 2]
    assert await DeadLetters(arq_redis, settings).count() == 0
    # arq itself never cuts an attempt short: its per-job timeout is out of any handler's reach.
    assert ARQ_TIMEOUT_S >= 365 * 86400


async def _status(redis: ArqRedis, settings: Settings, name: str, event_key: str) -> bool:
    return (await _record(redis, settings, name, event_key)).status is not None


# -- 4. jobs expired after 24 h ----------------------------------------------------------------


async def test_event_and_handler_jobs_have_no_expiry(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)

    @handler("later", retry=RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.01))
    async def later(ctx: HandlerContext) -> None:
        raise RetryLater(60, "come back in a minute")

    (event,) = events(1, 1)
    assert await enqueue(arq_redis, settings, [event]) == 1
    event_job = job_key_prefix + _event_job(settings, event.key)
    assert await arq_redis.exists(event_job)
    assert await arq_redis.pttl(event_job) == -1
    handler_job = job_key_prefix + _handler_job(settings, event.key, "later")
    async with worker(settings, [later]):
        await until(lambda: _failed(arq_redis, settings, "later", event.key), what="the first attempt failed")
        await until(lambda: _quiet(arq_redis, settings), what="the retry deferred")
        assert await arq_redis.exists(handler_job)
        assert await arq_redis.pttl(handler_job) == -1


async def _failed(redis: ArqRedis, settings: Settings, name: str, event_key: str) -> bool:
    return bool((await _record(redis, settings, name, event_key)).errors)


# -- 5. arq job ids were global -----------------------------------------------------------------


async def test_two_namespaces_on_one_redis_each_deliver_every_event(
    arq_redis: ArqRedis, redis_url: str
) -> None:
    namespaces = {name: make_settings(redis_url, namespace=name) for name in ("a", "b")}
    seen: dict[str, list[str]] = defaultdict(list)

    def crm_of(namespace: str) -> Any:
        @handler("crm")
        async def crm(ctx: HandlerContext) -> None:
            seen[namespace].append(ctx.event.key)

        return crm

    batch = events(1, 2)
    async with worker(namespaces["a"], [crm_of("a")]), worker(namespaces["b"], [crm_of("b")]):
        created = [await enqueue(arq_redis, namespaces[name], batch) for name in ("a", "b")]
        assert created == [2, 2], "each namespace queues its own jobs"
        await until(lambda: len(seen["a"]) == 2 and len(seen["b"]) == 2, what="both namespaces delivered")
    assert seen["a"] == seen["b"] == [e.key for e in batch]


# -- 6. rolling deploy ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _rolling_deploy(redis: ArqRedis, settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """Two replicas on one namespace, one already with ``crm``; 20 events queued while both run.

    The replica without ``crm`` starts first, so it is polling (and takes event jobs) too.
    """
    ran: dict[str, int] = defaultdict(int)
    crm_seen: list[str] = []

    def x_on(replica: str) -> Any:
        @handler("x")
        async def x(ctx: HandlerContext) -> None:
            ran[replica] += 1
            await asyncio.sleep(0.01)

        return x

    @handler("crm")
    async def crm(ctx: HandlerContext) -> None:
        crm_seen.append(ctx.event.key)

    batch = [e for n in range(10) for e in events(10 + n, 2)]
    health = settings.queue_name + health_check_key_suffix
    async with worker(settings, [x_on("old")]):
        await until(lambda: redis.exists(health), what="the old replica polling")
        await redis.delete(health)
        async with worker(settings, [x_on("new"), crm]):
            await until(lambda: redis.exists(health), what="the new replica polling")
            await until(lambda: _announced(redis, settings, {"x", "crm"}), what="the roster")
            await enqueue(redis, settings, batch)
            yield {"batch": batch, "ran": ran, "crm_seen": crm_seen}


async def test_a_rolling_deploy_loses_nothing_and_burns_no_attempts(
    arq_redis: ArqRedis, redis_url: str
) -> None:
    settings = make_settings(redis_url)
    async with _rolling_deploy(arq_redis, settings) as deploy:
        batch, ran = deploy["batch"], deploy["ran"]

        async def accounted() -> bool:
            x_done = (await stats(arq_redis, settings, "x")).get("done", 0) == len(batch)
            return x_done and not await _crm_unaccounted(arq_redis, settings, batch)

        await _eventually(accounted, timeout_s=8)
        assert await stats(arq_redis, settings, "x") == {"done": 20}
        # Every crm delivery is done, or still queued for crm in its own job: none lost.
        assert await _crm_unaccounted(arq_redis, settings, batch) == []
        crm_stats = await stats(arq_redis, settings, "crm")
        assert set(crm_stats) <= {"done"}, f"attempts burnt on the wrong replica: {crm_stats}"
        assert sorted(deploy["crm_seen"]) == sorted(set(deploy["crm_seen"]))
        assert await DeadLetters(arq_redis, settings).count() == 0
        assert ran["old"] + ran["new"] == 20
        assert ran["old"] > 0, "the replica without crm took no event jobs: the scenario did not happen"


async def test_a_rolling_deploy_delivers_every_event_to_crm_promptly(
    arq_redis: ArqRedis, redis_url: str
) -> None:
    settings = make_settings(redis_url)
    async with _rolling_deploy(arq_redis, settings) as deploy:
        await _eventually(lambda: _crm_done(arq_redis, settings, 20), timeout_s=6)
        assert await stats(arq_redis, settings, "crm") == {"done": 20}
        assert sorted(deploy["crm_seen"]) == sorted(e.key for e in deploy["batch"])


async def _announced(redis: ArqRedis, settings: Settings, names: set[str]) -> bool:
    return names <= {name.decode() for name in await redis.hkeys(_keys(settings).handlers)}  # type: ignore[misc]


async def _crm_done(redis: ArqRedis, settings: Settings, n: int) -> bool:
    return (await stats(redis, settings, "crm")).get("done", 0) >= n


async def _crm_unaccounted(redis: ArqRedis, settings: Settings, batch: list[TransitionEvent]) -> list[str]:
    """The events whose crm delivery is neither done nor waiting, unattempted, in a crm job."""
    keys, lost = _keys(settings), []
    for event in batch:
        record = await _record(redis, settings, "crm", event.key)
        if record.status == "done" and record.attempts == 1:
            continue
        job = _handler_job(settings, event.key, "crm")
        entry = await redis.zscore(keys.pending("crm", event.transaction_id), job)
        queued = await redis.exists(job_key_prefix + job) and entry is not None
        if not (queued and record.status is None and record.attempts == 0):
            lost.append(event.key)
    return lost


# -- 7. the order set expired before the jobs -----------------------------------------------------


async def test_order_and_pending_sets_do_not_expire(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    keys = _keys(settings)
    delivered: list[int] = []

    @handler("h", retry=RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.01))
    async def h(ctx: HandlerContext) -> None:
        if ctx.event.index == 0 and ctx.attempt == 1:
            raise RetryLater(1.0, "not yet")
        delivered.append(ctx.event.index)

    batch = events(1, 5)
    tx = batch[0].transaction_id
    # No worker runs: the jobs wait in the queue, their order entries with them.
    await enqueue(arq_redis, settings, batch)
    assert await arq_redis.zcard(keys.order(tx)) == 5
    assert await arq_redis.pttl(keys.order(tx)) == -1
    async with worker(settings, [h]):  # the worker that was down starts
        # The first event's retry waits, with the later events behind it in h's pending set.
        await until(lambda: arq_redis.exists(keys.pending("h", tx)), what="h's pending set")
        assert await arq_redis.pttl(keys.pending("h", tx)) == -1
        await until(lambda: len(delivered) == 5, what="all five delivered")
    assert delivered == [0, 1, 2, 3, 4]
    assert not await arq_redis.exists(keys.order(tx), keys.pending("h", tx))


# -- 8. crash and cancel points ---------------------------------------------------------------------


def _scripts(redis: ArqRedis, keys: Keys) -> DeliveryScripts:
    return DeliveryScripts(redis, keys, Ordering(redis, keys, queue_name="t:queue"), retention_s=3600)


async def test_a_repeated_settle_changes_nothing(arq_redis: ArqRedis) -> None:
    keys = Keys("t")
    scripts = _scripts(arq_redis, keys)
    run = {"event_key": "ev", "transaction_id": "tx", "index": 0, "token": "job#1", "own_job_id": "job"}
    (claim,) = await scripts.claim([("crm", 30)], mode="handler", record_now_ms=1_000_000, **run)  # type: ignore[arg-type]
    assert (claim.state, claim.attempt) == ("claimed", 1)
    assert await scripts.settle([Settlement("crm", "done")], record_now_ms=1_000_000, **run) == [True]  # type: ignore[arg-type]
    # Redis applied it but the reply was lost: the worker sends it again.
    assert await scripts.settle([Settlement("crm", "done")], record_now_ms=1_000_000, **run) == [False]  # type: ignore[arg-type]
    assert await arq_redis.hgetall(keys.stats("crm")) == {b"done": b"1"}  # type: ignore[misc]
    record = await DeliveryRecords(arq_redis, keys, retention_s=3600).read("crm", "ev")
    assert (record.status, record.attempts) == ("done", 1)


async def test_a_retry_keeps_its_backoff_when_its_job_runs_again(arq_redis: ArqRedis) -> None:
    keys = Keys("t")
    scripts = _scripts(arq_redis, keys)
    ordering = scripts.ordering
    job_id = "t:ev:crm"
    await ordering.enqueue(
        [QueuedJob(job_id, HANDLER_JOB_FUNCTION, ("crm", {}), keys.pending("crm", "tx"), 0)]
    )
    run = {"event_key": "ev", "transaction_id": "tx", "index": 0, "own_job_id": job_id}
    (first,) = await scripts.claim(
        [("crm", 30)],
        token=f"{job_id}#1",
        mode="handler",
        record_now_ms=1_000_000,
        **run,  # type: ignore[arg-type]
    )
    assert (first.state, first.attempt) == ("claimed", 1)
    error = ErrorRecord(at=datetime.now(UTC), attempt=1, type="OSError", message="refused")
    retry = Settlement("crm", "retry", error=error, retry_in_ms=60_000)
    assert await scripts.settle([retry], token=f"{job_id}#1", record_now_ms=1_000_000, **run) == [True]  # type: ignore[arg-type]
    # The job runs again long before its retry time (a copy, a wake-up, a worker's restart).
    (again,) = await scripts.claim(
        [("crm", 30)],
        token=f"{job_id}#2",
        mode="handler",
        record_now_ms=1_000_000,
        **run,  # type: ignore[arg-type]
    )
    # The retry time is on Redis's clock, set by the settle: a minute from then.
    retry_at = int(await arq_redis.hget(keys.delivery("crm", "ev"), "retry_at"))  # type: ignore[misc]
    seconds, micros = await arq_redis.time()
    assert 59_000 < retry_at - (seconds * 1000 + micros // 1000) <= 60_000
    assert (again.state, again.retry_at_ms) == ("deferred", retry_at)
    record = await DeliveryRecords(arq_redis, keys, retention_s=3600).read("crm", "ev")
    assert (record.status, record.attempts) == (None, 1)
    assert await arq_redis.zscore("t:queue", job_id) == retry_at
    assert await arq_redis.zscore(keys.deferred, job_id) == retry_at


async def test_a_cancel_right_after_the_handler_returned_does_not_run_it_again(
    arq_redis: ArqRedis, redis_url: str
) -> None:
    settings = make_settings(redis_url)
    runs: list[int] = []
    returned = asyncio.Event()
    job_task: list[asyncio.Task[Any]] = []

    @handler("once")
    async def once(ctx: HandlerContext) -> None:
        runs.append(ctx.attempt)
        if not returned.is_set():
            current = asyncio.current_task()
            assert current is not None
            job_task.append(current)
            returned.set()

    (event,) = events(1, 1)
    async with worker(settings, [once]):
        await enqueue(arq_redis, settings, [event])
        await returned.wait()
        # The handler has returned and its job is settling: cancel the job (a stopping worker).
        assert job_task[0].cancel(), "the job had finished already: the cancel came too late"
        with contextlib.suppress(asyncio.CancelledError):
            await job_task[0]
        assert job_task[0].cancelled()
    async with worker(settings, [once]):
        await until(lambda: _status(arq_redis, settings, "once", event.key), what="settled")
        await until(lambda: _quiet(arq_redis, settings), what="nothing left to run")
    assert runs == [1]
    record = await _record(arq_redis, settings, "once", event.key)
    assert (record.status, record.attempts) == ("done", 1)
    assert await stats(arq_redis, settings, "once") == {"done": 1}
    assert await arq_redis.zcard(settings.queue_name) == 0


async def test_two_replays_at_once_queue_one_job(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    healthy = {"now": False}
    runs: list[bool] = []

    @handler("crm", retry=FAST)
    async def crm(ctx: HandlerContext) -> None:
        runs.append(healthy["now"])
        if not healthy["now"]:
            raise PermanentError("the CRM refused the deal")

    (event,) = events(1, 1)
    # Two operators replaying at once: two clients, so their replay job ids differ.
    operator_a = DeadLetters(arq_redis, settings, clock=time.time)
    operator_b = DeadLetters(arq_redis, settings, clock=lambda: time.time() + 0.005)
    async with worker(settings, [crm]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _dlq_count(operator_a, 1), what="the dead letter")
        healthy["now"] = True
        (letter,) = await operator_a.list()
        replayed = await asyncio.gather(
            operator_a.replay([letter], force=True), operator_b.replay([letter], force=True)
        )
        assert sum(map(len, replayed)) == 1, f"two replays queued {replayed}"
        await until(lambda: _status(arq_redis, settings, "crm", event.key), what="settled again")
        await until(lambda: _quiet(arq_redis, settings), what="nothing left to run")
    assert runs == [False, True]
    assert await stats(arq_redis, settings, "crm") == {"dead_lettered": 1, "done": 1}
    assert await operator_a.count() == 0


async def test_a_step_in_flight_at_shutdown_finishes_and_is_recorded(
    arq_redis: ArqRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The attempt's own grace is short here, so the stopping worker cancels the attempt mid-step.
    monkeypatch.setattr(service, "SHUTDOWN_GRACE_S", 0.1)
    settings = make_settings(redis_url)
    entered = asyncio.Event()
    sent: list[int] = []
    attempts: list[int] = []

    async def send(attempt: int) -> str:
        entered.set()
        await asyncio.sleep(0.5)  # the side effect's reply, arriving after the cancel
        sent.append(attempt)
        return "sent"

    @handler("sms", retry=FAST)
    async def sms(ctx: HandlerContext) -> None:
        attempts.append(ctx.attempt)
        assert await ctx.step("send", lambda: send(ctx.attempt)) == "sent"

    (event,) = events(1, 1)
    async with worker(settings, [sms]):
        await enqueue(arq_redis, settings, [event])
        await entered.wait()
        stopping = time.monotonic()
    # The step got its grace: it finished and its result was recorded.
    assert time.monotonic() - stopping < STEP_GRACE_S
    assert sent == [1]
    async with worker(settings, [sms]):
        await until(lambda: _status(arq_redis, settings, "sms", event.key), what="settled")
    record = await _record(arq_redis, settings, "sms", event.key)
    assert record.steps["send"]["state"] == "done"
    assert (record.status, record.attempts) == ("done", 1)  # the cancelled attempt was given back
    assert sent == [1]  # not sent again
    assert attempts == [1, 1]
    assert await DeadLetters(arq_redis, settings).count() == 0


# -- found by the review: several inline handlers cancelled together, a settle lost to Redis ------


async def test_a_shutdown_mid_event_does_not_rerun_the_handler_that_finished(
    arq_redis: ArqRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "SHUTDOWN_GRACE_S", 0.2)
    settings = make_settings(redis_url)
    runs: dict[str, int] = defaultdict(int)
    slow_started = asyncio.Event()
    slow_s = {"sleep": 30.0}

    @handler("fast", retry=RetryPolicy(max_attempts=5, timeout_s=2))
    async def fast(ctx: HandlerContext) -> None:
        runs["fast"] += 1

    @handler("slow", retry=RetryPolicy(max_attempts=5, timeout_s=60))
    async def slow(ctx: HandlerContext) -> None:
        runs["slow"] += 1
        slow_started.set()
        await asyncio.sleep(slow_s["sleep"])

    (event,) = events(1, 1)
    async with worker(settings, [fast, slow]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: slow_started.is_set() and runs["fast"] == 1, what="both started")
    # The stop cancelled the event job while slow ran; fast had returned.
    slow_s["sleep"] = 0
    records = DeliveryRecords(arq_redis, _keys(settings), retention_s=60)

    async def both_done() -> bool:
        return all([await records.status(name, event.key) == "done" for name in ("fast", "slow")])

    async with worker(settings, [fast, slow]):
        await until(both_done, timeout_s=15, what="both done")
    assert runs["fast"] == 1
    assert (await records.read("fast", event.key)).attempts == 1


async def test_a_settle_lost_to_a_dropped_connection_is_sent_again(
    arq_redis: ArqRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(redis_url)
    runs: list[int] = []
    real_settle = DeliveryScripts.settle
    dropped: list[bool] = []

    async def flaky_settle(self: DeliveryScripts, *args: Any, **kwargs: Any) -> list[bool]:
        if not dropped:
            dropped.append(True)
            raise redis.ConnectionError("Connection reset by peer")  # the settle never reached Redis
        return await real_settle(self, *args, **kwargs)

    monkeypatch.setattr(DeliveryScripts, "settle", flaky_settle)

    @handler("pay", retry=RetryPolicy(max_attempts=5, timeout_s=5))
    async def pay(ctx: HandlerContext) -> None:
        runs.append(ctx.attempt)

    (event,) = events(2, 1)
    async with worker(settings, [pay]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _pay_done(arq_redis, settings), what="settled")
    assert dropped == [True]
    assert runs == [1]  # not run again after the lost settle


async def _pay_done(redis_pool: ArqRedis, settings: Settings) -> bool:
    return (await stats(redis_pool, settings, "pay")).get("done", 0) == 1
