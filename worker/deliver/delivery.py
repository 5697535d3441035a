"""Delivering events to handlers: the event job, the handler job, and the state machine.

The poller queues one **event job** per event. It delivers the event inline to
every handler this worker runs whose subscription matches, concurrently, in one
claim script and one settle script: close to one plain arq job per event. What
cannot finish there goes on as a **handler job** for that one handler (a failing
handler never re-runs another): a retry, a delivery that must wait for an earlier
event of its transaction, or a handler that only another replica runs
(:mod:`worker.deliver.roster`).

One (event, handler) delivery moves through these states; the record is
``P:delivery:<handler>:<event key>`` (:mod:`worker.deliver.idempotency`), the scripts
:mod:`worker.deliver.scripts`::

    queued ──claim──> running ──settle done / skipped──> done
       │                 │  └──settle dead────────────> dead ──replay──> queued
       │                 └──settle retry──> deferred (retry_at; P:deferred) ──at retry_at──> queued
       ├──an earlier event first──> parked (handler job, pending set) ──woken──> queued
       ├──claim held by another run──> busy ──its lease ends──> queued
       └──handler not run here──> handed back ──(another worker)──> queued

- **queued**: in ``P:order:<tx>`` (event job) or ``P:pending:<handler>:<tx>`` (handler
  job), with its arq job (no expiry).
- **running**: claim script: ``P:claim`` set to the run's token ``<job id>#<arq try>``
  with a lease of the handler's timeout plus a margin, ``attempts`` incremented,
  ``run`` = token. The handler runs under its own ``asyncio.timeout``; arq's timeout
  is set out of reach, so arq never cancels an attempt.
- **done / dead**: settle script: ``status``, ``settled_by``, counters, the pending
  entry removed, the next parked job woken; dead also writes ``P:dlq``.
- **deferred**: settle script: ``error:<n>``, ``retry_at``, the handler job scored at
  ``retry_at`` and in ``P:deferred``; a claim before ``retry_at`` re-scores it there.
- **parked**: claim script: the job's score moved ahead, same script as the order
  check; woken by the settle that removes its blocker. An event job is parked whole
  while an earlier event's job has not settled (that blocks every handler alike; the
  poller's enqueue parks it at once when the earlier one is already queued); a
  handler job, while an earlier delivery to its handler is pending.

Crash points (the worker killed, its reply lost, or cancelled):

- before the claim: the arq job runs again (its in-progress key, renewed by the
  worker's heartbeat, lapses within seconds of the worker's death).
- after the claim, handler running: the rerun finds the claim held by the dead run's
  token; the delivery becomes a handler job that waits for the lease (handler timeout
  plus :data:`~worker.deliver.idempotency.LEASE_MARGIN_S`) and then runs again; the
  lost attempt counted, its recorded steps kept (an unfinished one is uncertain).
- after the settle (which also finishes the arq job, in the same script): nothing is
  left to run. A lost reply (Redis answered, the worker never heard): the rerun finds
  ``status`` set by this very job (``settled_by``) and counts nothing, or a handler job
  already queued; a repeated settle finds ``run`` no longer its token and changes
  nothing.
- cancelled (a stopping worker, after its grace): a step in flight gets
  :data:`~worker.deliver.idempotency.STEP_GRACE_S` to finish; the attempt is given
  back (``attempts`` decremented, claim dropped) and the job runs again. A cancel
  during the settle waits for the settle.

Anything unexpected in flexworker's own code around a handler (an event it cannot
read, a failing predicate's surroundings) dead-letters that delivery with reason
``internal`` or ``permanent``: it never vanishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import aiohttp
import pydantic
import redis
import structlog
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

from worker.api.backoff import Backoff
from worker.api.client import IntegrationClient
from worker.deliver.dlq import EVENT_JOB_LETTER, DeadLetter, DeadLetters, Reason, report
from worker.deliver.failures import ErrorRecord, classify, describe
from worker.deliver.idempotency import LEASE_MARGIN_S, DeliveryRecords
from worker.deliver.roster import (
    HANDBACK_LEAVE_S,
    HANDBACK_MAX_S,
    HANDBACK_S,
    ORPHAN_GRACE_S,
    Roster,
)
from worker.deliver.scripts import Claim, DeliveryScripts, Settlement
from worker.events import TransitionEvent
from worker.plugin import HandlerContext, RetryPolicy
from worker.queue.keys import Keys
from worker.queue.ordering import HANDLER_JOB_FUNCTION, ORDER_PARK_S, Ordering, QueuedJob, handler_job_id
from worker.registry import LoadedHandler
from worker.settings import Settings

__all__ = ["COUNTERS", "Delivery", "Outcome"]

log = structlog.get_logger("flexworker.delivery")

#: The per-handler counters kept in ``P:stats:handler:<name>``.
COUNTERS = ("done", "retried", "dead_lettered", "skipped")
#: Longest single wait for another run's claim on the same delivery.
BUSY_WAIT_MAX_S = 5.0

T = TypeVar("T")
_JITTER = random.Random()


@dataclass(frozen=True)
class Outcome:
    """How a job ended: settled, or to run again (its score in the queue is already set)."""

    kind: Literal["done", "skipped", "dead", "retry", "wait", "handback", "event"]

    @property
    def again(self) -> bool:
        """Whether the job must run again."""
        return self.kind in ("retry", "wait", "handback")


@dataclass(frozen=True)
class _Ids:
    key: str
    transaction_id: str
    index: int
    transition: str
    process_name: str


def _ids(payload: dict[str, Any]) -> _Ids:
    return _Ids(
        key=str(payload["key"]),
        transaction_id=str(payload["transaction_id"]),
        index=int(payload["index"]),
        transition=str(payload["transition"]),
        process_name=str(payload["process_name"]),
    )


class Delivery:
    """Runs event and handler jobs for one worker.

    ``rng`` drives backoff jitter and ``clock`` (Unix seconds) the recorded times;
    ``queue_clock`` pins the clock of queue scores and retry times, which is otherwise
    Redis's own (so hosts whose clocks disagree agree); tests pin both.
    """

    def __init__(
        self,
        redis: ArqRedis,
        settings: Settings,
        handlers: Sequence[LoadedHandler],
        *,
        client: IntegrationClient,
        http: aiohttp.ClientSession,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        queue_clock: Callable[[], float] | None = None,
    ) -> None:
        self._redis = redis
        self.settings = settings
        self.handlers: Mapping[str, LoadedHandler] = {h.name: h for h in handlers}
        self.keys = Keys(settings.redis_prefix)
        self.records = DeliveryRecords(
            redis, self.keys, retention_s=settings.idempotency_retention_s, clock=clock
        )
        self.ordering = Ordering(redis, self.keys, queue_name=settings.queue_name, clock=queue_clock)
        self.scripts = DeliveryScripts(
            redis, self.keys, self.ordering, retention_s=settings.idempotency_retention_s
        )
        self.roster = Roster(redis, self.keys, self.handlers, clock=queue_clock)
        self.dead_letters = DeadLetters(redis, settings, clock=clock)
        #: Jobs whose settle also finished them as arq would (read by the worker, see runner).
        self.finished_jobs: set[str] = set()
        #: Jobs this worker handed back, and until when (monotonic s) it leaves them to others.
        self.handed_back: dict[str, float] = {}
        self._client = client
        self._http = http
        self._rng = rng or random.Random()
        self._clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), tz=UTC)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _handler_job(
        self, name: str, payload: dict[str, Any], ids: _Ids, *, not_before_ms: int = 0
    ) -> QueuedJob:
        return QueuedJob(
            job_id=handler_job_id(ids.key, name, self.keys.prefix),
            function=HANDLER_JOB_FUNCTION,
            args=(name, payload),
            pending_key=self.keys.pending(name, ids.transaction_id),
            index=ids.index,
            not_before_ms=not_before_ms,
        )

    # -- the event job ------------------------------------------------------------------

    async def deliver_event(self, payload: dict[str, Any], *, job_id: str, job_try: int = 1) -> Outcome:
        """Run one event job (see the module doc); ``wait`` when it was parked behind an earlier event."""
        try:
            ids = _ids(payload)
        except (KeyError, TypeError, ValueError) as exc:
            await self._unreadable(payload, job_id, exc)
            return Outcome("dead")
        event, invalid = _validated(payload)  # an invalid event dead-letters each delivery, below
        await self.roster.refresh()
        local = [
            loaded
            for loaded in self.handlers.values()
            if loaded.spec.subscription.matches_names(ids.transition, ids.process_name)
            and (event is None or _wanted(loaded, event))
        ]
        remote = self.roster.remote_targets(ids.transition, ids.process_name)
        token = f"{job_id}#{job_try}"
        claims: list[Claim] = []
        if local:
            claims = await self._claim(
                [(h.name, h.spec.retry) for h in local], ids, token=token, job_id=job_id, mode="event"
            )
            if claims[0].state == "parked":
                return Outcome("wait")
        handoffs = [self._handler_job(name, payload, ids) for name in remote]
        handoffs += [
            self._handler_job(h.name, payload, ids, not_before_ms=c.retry_at_ms)
            for h, c in zip(local, claims, strict=True)
            if c.state == "handoff"
        ]
        running = [(h, c) for h, c in zip(local, claims, strict=True) if c.state == "claimed"]
        if handoffs:
            try:
                # Before the event's order entry goes, so the deliveries are never in neither set.
                await self.ordering.enqueue(
                    handoffs,
                    order_key=self.keys.order(ids.transaction_id),
                    park_s=ORDER_PARK_S,
                    parent=job_id,
                )
            except BaseException:
                # Nothing ran: give the claims back, so the job's rerun spends no attempt on them.
                await asyncio.shield(self._unclaim_all([h.name for h, _ in running], ids.key, token))
                raise
        settlements = [
            Settlement(h.name, "release")
            for h, c in zip(local, claims, strict=True)
            if c.state in ("done", "dead") and not c.own
        ]
        attempts = [
            self._attempt(h, c.attempt, payload, ids, event, invalid, token=token, job_id=job_id, inline=True)
            for h, c in running
        ]
        if len(attempts) == 1:
            settlements.append(await attempts[0])  # no task needed for one
        elif attempts:
            tasks = [asyncio.ensure_future(attempt) for attempt in attempts]
            try:
                settlements += await asyncio.gather(*tasks)
            except asyncio.CancelledError:
                # A stopping worker: the attempts still running give themselves back; those that
                # finished are settled now (the job runs again, so its order entry stays).
                await asyncio.wait(tasks)
                finished = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
                await asyncio.shield(
                    self._settle(settlements + finished, ids, token=token, job_id=job_id, finished=False)
                )
                raise
        await self._settle(
            settlements,
            ids,
            token=token,
            job_id=job_id,
            remove_from_order=job_id,
            wake=[self.keys.pending(name, ids.transaction_id) for name in self.roster.all_names],
        )
        return Outcome("event")

    async def _until_redis_answers(self, call: Callable[[], Awaitable[T]]) -> T:
        # Handlers already ran: a settle lost to a dropped connection or a Redis restart would
        # make them run again, so it is sent again (it is idempotent) while Redis is away.
        return await _retrying(call, limit_s=self.settings.redis_outage_limit_s)

    async def _claim(
        self,
        handlers: Sequence[tuple[str, RetryPolicy]],
        ids: _Ids,
        *,
        token: str,
        job_id: str,
        mode: Literal["event", "handler"],
    ) -> list[Claim]:
        return await self.scripts.claim(
            [(name, policy.timeout_s + LEASE_MARGIN_S) for name, policy in handlers],
            event_key=ids.key,
            transaction_id=ids.transaction_id,
            index=ids.index,
            token=token,
            own_job_id=job_id,
            mode=mode,
            record_now_ms=self._now_ms(),
            # An event job asks whether a handler job already holds each delivery.
            job_ids=[handler_job_id(ids.key, name, self.keys.prefix) for name, _ in handlers]
            if mode == "event"
            else (),
        )

    async def _unclaim_all(self, handlers: Sequence[str], event_key: str, token: str) -> None:
        for handler in handlers:
            with contextlib.suppress(redis.RedisError, OSError):
                await self.scripts.unclaim(handler, event_key, token)

    async def _unreadable(self, payload: dict[str, Any], job_id: str, exc: Exception) -> None:
        """An event job whose payload lacks the fields to key its deliveries: one dead letter."""
        error = describe(
            exc,
            attempt=1,
            at=self._now(),
            message=f"event job payload unreadable: {type(exc).__name__}: {exc}",
        )
        letter = DeadLetter.of_payload(
            EVENT_JOB_LETTER,
            payload if isinstance(payload, dict) else {},
            job_id=job_id,
            reason="internal",
            attempts=1,
            errors=[error],
            dead_lettered_at=self._now(),
        )
        async with self._redis.pipeline(transaction=True) as pipe:
            self.dead_letters.add_in(pipe, letter)
            await pipe.execute()
        report(letter)

    # -- the handler job ----------------------------------------------------------------

    async def deliver(
        self, handler: str, payload: dict[str, Any], *, job_id: str, job_try: int = 1
    ) -> Outcome:
        """Run one handler job (see the module doc); its score is set when it must run again."""
        try:
            ids = _ids(payload)
        except (KeyError, TypeError, ValueError) as exc:
            await self._unreadable(payload, job_id, exc)
            return Outcome("dead")
        loaded = self.handlers.get(handler)
        if loaded is None:
            await self.roster.refresh(force=True)
            if self.roster.absent_s(handler) < ORPHAN_GRACE_S or not self.roster.settled:
                # Not ours to run: hand it back untouched, for a worker that runs it. Jittered: a
                # fixed park would bring the job due just before this same worker's next poll
                # every time, so the worker that runs the handler might never get it; and
                # longer each time it comes back (arq's try count), so that a busy worker
                # running the handler is not raced by a tight loop of hand-backs.
                park_s = min(HANDBACK_S * 2 ** min(job_try - 1, 10), HANDBACK_MAX_S)
                wait_s = park_s * (0.5 + self._rng.random())
                await self._park(job_id, wait_s)
                self._hand_back(job_id, wait_s)
                return Outcome("handback")
        token = f"{job_id}#{job_try}"
        policy = loaded.spec.retry if loaded is not None else RetryPolicy()
        (claim,) = await self._claim([(handler, policy)], ids, token=token, job_id=job_id, mode="handler")
        wake = [self.keys.pending(handler, ids.transaction_id)]
        if claim.state in ("done", "dead"):
            await self._settle([Settlement(handler, "release")], ids, token=token, job_id=job_id, wake=wake)
            return Outcome("skipped")
        if claim.state in ("blocked", "deferred"):
            return Outcome("wait")
        if claim.state == "busy":
            await self._park(job_id, min(max(claim.busy_for_s, 0.1), BUSY_WAIT_MAX_S))
            return Outcome("wait")
        if loaded is None:
            settlement = await self._orphaned(handler, payload, ids, job_id, claim.attempt)
            await self._settle([settlement], ids, token=token, job_id=job_id, wake=wake)
            return Outcome("dead")
        event, invalid = _validated(payload)
        settlement = await self._attempt(
            loaded, claim.attempt, payload, ids, event, invalid, token=token, job_id=job_id, inline=False
        )
        await self._settle(
            [settlement], ids, token=token, job_id=job_id, wake=wake, finished=settlement.kind != "retry"
        )
        return Outcome(
            "retry" if settlement.kind == "retry" else "dead" if settlement.kind == "dead" else "done"
        )

    def _hand_back(self, job_id: str, wait_s: float) -> None:
        # When the job comes due again, leave it to the others for a while: whichever worker polls
        # first takes a due job, and it must not keep being this one.
        now_s = time.monotonic()
        if len(self.handed_back) > 10_000:
            for stale in [j for j, until_s in self.handed_back.items() if until_s < now_s]:
                del self.handed_back[stale]
        self.handed_back[job_id] = now_s + wait_s + HANDBACK_LEAVE_S

    def leaves_to_others(self, job_id: str) -> bool:
        """Whether this worker should not take ``job_id`` now (it handed it back lately)."""
        until_s = self.handed_back.get(job_id)
        if until_s is None:
            return False
        if until_s < time.monotonic():
            del self.handed_back[job_id]
            return False
        return True

    async def _park(self, job_id: str, wait_s: float) -> None:
        """Move this running job's score ``wait_s`` ahead (it returns with ``Retry(None)``)."""
        await self.scripts.park(job_id, wait_s)

    async def _orphaned(
        self, handler: str, payload: dict[str, Any], ids: _Ids, job_id: str, attempt: int
    ) -> Settlement:
        absent_s = self.roster.absent_s(handler)
        since = "never seen" if absent_s == float("inf") else f"not seen for {absent_s:.0f} s"
        error = ErrorRecord(
            at=self._now(),
            attempt=attempt,
            type="HandlerNotRunning",
            message=f"no live worker runs handler {handler!r} ({since}); replay once one does, or purge",
        )
        return await self._dead(handler, payload, ids, job_id, attempt, error, "internal")

    # -- one attempt ----------------------------------------------------------------------

    async def _attempt(
        self,
        loaded: LoadedHandler,
        attempt: int,
        payload: dict[str, Any],
        ids: _Ids,
        event: TransitionEvent | None,
        invalid: Exception | None,
        *,
        token: str,
        job_id: str,
        inline: bool,
    ) -> Settlement:
        """Run a claimed attempt; how it ended. Never raises but for a cancellation."""
        policy = loaded.spec.retry
        try:
            if attempt > policy.max_attempts:
                lost = ErrorRecord(
                    at=self._now(),
                    attempt=attempt - 1,
                    type="AttemptLost",
                    message=f"attempt {attempt - 1} never finished: the worker stopped or died while it ran",
                )
                return await self._dead(loaded.name, payload, ids, job_id, attempt - 1, lost, "exhausted")
            if invalid is not None or event is None:
                raise invalid or ValueError("event missing")
            return await self._run(loaded, attempt, payload, ids, event, job_id=job_id, inline=inline)
        except asyncio.CancelledError:
            # The worker is stopping: this attempt does not count, and the job runs again later.
            await asyncio.shield(self.scripts.unclaim(loaded.name, ids.key, token))
            raise
        except Exception as exc:
            # Our own code around the handler failed (or the event cannot be read): never lost.
            reason: Reason = "permanent" if isinstance(exc, pydantic.ValidationError) else "internal"
            error = describe(exc, attempt=attempt, at=self._now())
            return await self._dead(loaded.name, payload, ids, job_id, attempt, error, reason)

    async def _run(
        self,
        loaded: LoadedHandler,
        attempt: int,
        payload: dict[str, Any],
        ids: _Ids,
        event: TransitionEvent,
        *,
        job_id: str,
        inline: bool,
    ) -> Settlement:
        handler, policy = loaded.name, loaded.spec.retry
        timer = asyncio.timeout(policy.timeout_s)
        matched = True
        try:
            async with timer:
                matched = loaded.spec.subscription.matches(event)
                if matched:
                    ctx = HandlerContext(
                        event=event,
                        client=self._client,
                        log=log.bind(
                            event_key=ids.key,
                            transaction_id=ids.transaction_id,
                            handler=handler,
                            attempt=attempt,
                        ),
                        settings=self.settings,
                        handler_settings=loaded.handler_settings,
                        http=self._http,
                        attempt=attempt,
                        handler=handler,
                        namespace=self.settings.namespace,
                        steps=self.records.steps(handler, ids.key, attempt),
                    )
                    await loaded.handler.handle(ctx)
        except Exception as exc:
            message = f"attempt timed out after {policy.timeout_s:g} s" if timer.expired() else None
            return await self._failed(
                loaded, payload, ids, job_id, attempt, policy, exc, message, inline=inline
            )
        return Settlement(handler, "done" if matched else "skipped")

    async def _failed(
        self,
        loaded: LoadedHandler,
        payload: dict[str, Any],
        ids: _Ids,
        job_id: str,
        attempt: int,
        policy: RetryPolicy,
        exc: Exception,
        message: str | None,
        *,
        inline: bool,
    ) -> Settlement:
        now_s = self._clock()
        verdict = classify(exc, now_s=now_s)
        error = describe(exc, attempt=attempt, at=datetime.fromtimestamp(now_s, tz=UTC), message=message)
        if verdict.permanent:
            return await self._dead(loaded.name, payload, ids, job_id, attempt, error, "permanent")
        delay_s = policy.delay_s(attempt, self._rng, at_least_s=verdict.at_least_s)
        if delay_s is None:
            return await self._dead(loaded.name, payload, ids, job_id, attempt, error, "exhausted")
        # Identifiers and the error's type only: a message may carry personal data.
        log.warning(
            "handler attempt failed",
            event_key=ids.key,
            handler=loaded.name,
            transition=ids.transition,
            attempt=attempt,
            max_attempts=policy.max_attempts,
            error_type=error.type,
            where=error.where,
            retry_in_s=round(delay_s, 3),
        )
        # The retry time itself is set by the settle script, on Redis's clock.
        job = self._handler_job(loaded.name, payload, ids) if inline else None
        return Settlement(loaded.name, "retry", error=error, retry_in_ms=int(delay_s * 1000), job=job)

    async def _dead(
        self,
        handler: str,
        payload: dict[str, Any],
        ids: _Ids,
        job_id: str,
        attempts: int,
        error: ErrorRecord,
        reason: Reason,
    ) -> Settlement:
        record = await self.records.read(handler, ids.key)
        errors = [e for e in record.errors if e.attempt != error.attempt] + [error]
        letter = DeadLetter.of_payload(
            handler,
            payload,
            job_id=job_id,
            reason=reason,
            attempts=attempts,
            errors=errors,
            dead_lettered_at=self._now(),
        )
        return Settlement(handler, "dead", error=error, letter=letter)

    async def _settle(
        self,
        settlements: Sequence[Settlement],
        ids: _Ids,
        *,
        token: str,
        job_id: str,
        remove_from_order: str = "",
        wake: Sequence[str] = (),
        finished: bool = True,
    ) -> None:
        def settle() -> Awaitable[list[bool]]:
            return self.scripts.settle(
                settlements,
                event_key=ids.key,
                transaction_id=ids.transaction_id,
                index=ids.index,
                token=token,
                own_job_id=job_id,
                record_now_ms=record_now_ms,
                remove_from_order=remove_from_order,
                wake=wake,
                finish=finish,
            )

        record_now_ms = self._now_ms()
        finish = _arq_keys(job_id) if finished else ()
        try:
            applied = await self._until_redis_answers(settle)
        except asyncio.CancelledError:
            # A cancel (a stopping worker) must not cut the settle of attempts that ran: the
            # settle is idempotent, so send it again, shielded (a repeat changes nothing).
            await asyncio.shield(settle())
            if finished:
                self.finished_jobs.add(job_id)
            raise
        if finished:
            self.finished_jobs.add(job_id)
        for settlement, ok in zip(settlements, applied, strict=True):
            if ok and settlement.letter is not None:
                report(settlement.letter)


async def _retrying(call: Callable[[], Awaitable[T]], *, limit_s: float) -> T:
    """``call()``, sent again while Redis cannot be reached, for up to ``limit_s``."""
    backoff = Backoff(base_s=0.1, cap_s=2.0, max_attempts=1)
    started_s = time.monotonic()
    for attempt in itertools.count():
        try:
            return await call()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            if time.monotonic() - started_s >= limit_s:
                raise
            await asyncio.sleep(backoff.delay_s(attempt, _JITTER))
    raise AssertionError("unreachable")


def _arq_keys(job_id: str) -> tuple[str, str, str]:
    """arq's keys of a job, which a settle that ends the job deletes as arq would."""
    return (job_key_prefix + job_id, retry_key_prefix + job_id, in_progress_key_prefix + job_id)


def _validated(payload: dict[str, Any]) -> tuple[TransitionEvent | None, Exception | None]:
    """The queued event, or the validation error that keeps it from being one."""
    try:
        return TransitionEvent.model_validate(payload), None
    except pydantic.ValidationError as exc:
        return None, exc


def _wanted(loaded: LoadedHandler, event: TransitionEvent) -> bool:
    predicate = loaded.spec.subscription.predicate
    if predicate is None:
        return True
    try:
        return bool(predicate(event))
    except Exception:
        # Let the handler's own delivery ask again, where a failure is retried and dead-lettered.
        return True
