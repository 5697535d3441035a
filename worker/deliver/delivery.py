"""Delivering events to handlers: the fan-out, and one (event, handler) job from start to end.

The poller queues one fan-out job per event; :meth:`Delivery.fan_out` turns it into
one job per enabled handler whose subscription matches, so a failing handler never
re-runs another. :meth:`Delivery.deliver` runs one such job:

1. A delivery already settled (done, or dead-lettered) is a no-op.
2. If an earlier event of the transaction is still to be delivered to this handler,
   the job is parked until that one settles, without using an attempt
   (:mod:`worker.queue.ordering`).
3. Claim the attempt (:mod:`worker.deliver.idempotency`); if another job holds a live claim
   on the same delivery, re-defer until the claim ends. Steps 1-3 are one script.
4. Run the handler under ``asyncio.timeout(retry.timeout_s)``.
5. Success: mark done. Transient failure: record the error and re-defer by the
   handler's backoff; on the last attempt, or for a permanent failure, dead-letter
   (:mod:`worker.deliver.dlq`). Each of these settles in one Redis transaction together with
   the pending entry's removal and the handler's counters.

Attempts are counted in the delivery record, not by arq's ``job_try``: waiting for
order or for a claim re-runs the job without being an attempt, a replay starts the
count again, and an attempt whose worker died still counts (so a handler that kills
its worker ends in the dead-letter queue too). The arq job's own retry limit is set
out of reach, so these rules alone decide. A stopping worker lets running attempts
finish for a while, then cancels them; a cancelled attempt is given back and its job
runs again later.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
import structlog
from arq.connections import ArqRedis

from worker.api.client import IntegrationClient
from worker.deliver.dlq import DeadLetter, DeadLetters, report
from worker.deliver.failures import ErrorRecord, classify, describe
from worker.deliver.idempotency import LEASE_MARGIN_S, DeliveryRecords
from worker.events import TransitionEvent
from worker.plugin import HandlerContext, RetryPolicy
from worker.queue.keys import Keys
from worker.queue.ordering import HANDLER_JOB_FUNCTION, ORDER_PARK_S, Ordering, QueuedJob, handler_job_id
from worker.registry import LoadedHandler
from worker.settings import Settings

__all__ = [
    "COUNTERS",
    "Delivery",
    "Outcome",
]

log = structlog.get_logger("flexworker.delivery")

#: The per-handler counters kept in ``P:stats:handler:<name>``.
COUNTERS = ("done", "retried", "dead_lettered", "skipped")
#: Longest single wait for another job's claim on the same delivery.
BUSY_WAIT_MAX_S = 5.0


@dataclass(frozen=True)
class Outcome:
    """How a job ended: settled, or to be run again (``retry``, ``wait``).

    ``delay_s`` is how long to re-defer the job; None for a job the claim already
    parked in the queue (it is woken when its turn comes).
    """

    kind: Literal["done", "skipped", "dead", "retry", "wait"]
    delay_s: float | None = None

    @property
    def again(self) -> bool:
        """Whether the job must run again."""
        return self.kind in ("retry", "wait")


class _NotEnabledError(Exception):
    """The job names a handler this worker does not run."""


class Delivery:
    """Runs fan-out and handler jobs for one worker.

    ``rng`` drives backoff jitter and ``clock`` (Unix time, seconds) the recorded
    times, so tests can pin both.
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
    ) -> None:
        self._redis = redis
        self.settings = settings
        self.handlers: Mapping[str, LoadedHandler] = {h.name: h for h in handlers}
        self.keys = Keys(settings.redis_prefix)
        self.records = DeliveryRecords(
            redis, self.keys, retention_s=settings.idempotency_retention_s, clock=clock
        )
        self.ordering = Ordering(redis, self.keys, queue_name=settings.queue_name)
        self.dead_letters = DeadLetters(redis, settings, clock=clock)
        self._client = client
        self._http = http
        self._rng = rng or random.Random()
        self._clock = clock

    @property
    def longest_timeout_s(self) -> float:
        """The longest any enabled handler's attempt may run, lease margin included."""
        return max((h.spec.retry.timeout_s for h in self.handlers.values()), default=0.0) + LEASE_MARGIN_S

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), tz=UTC)

    async def fan_out(self, payload: dict[str, Any], *, job_id: str) -> list[str]:
        """Queue the event for each enabled handler whose subscription matches; their names."""
        # The globs need four fields: the full event is validated only if a predicate wants it.
        transition, process = str(payload["transition"]), str(payload["process_name"])
        event: TransitionEvent | None = None
        names = []
        for name, loaded in self.handlers.items():
            subscription = loaded.spec.subscription
            if not subscription.matches_names(transition, process):
                continue
            if subscription.predicate is not None:
                event = event or TransitionEvent.model_validate(payload)
                try:
                    wanted = bool(subscription.predicate(event))
                except Exception:
                    # Let the handler's own job ask again, where a failure is retried and dead-lettered.
                    wanted = True
                if not wanted:
                    continue
            names.append(name)
        event_key, transaction_id, index = (
            str(payload["key"]),
            str(payload["transaction_id"]),
            int(payload["index"]),
        )
        jobs = [
            QueuedJob(
                job_id=handler_job_id(event_key, name),
                function=HANDLER_JOB_FUNCTION,
                args=(name, payload),
                pending_key=self.keys.pending(name, transaction_id),
                index=index,
            )
            for name in names
        ]
        await self.ordering.enqueue(
            jobs,
            pending_ttl_s=self.settings.idempotency_retention_s,
            order_key=self.keys.order(transaction_id),
            remove=job_id,
            # A later event of another handler may have waited for this one's fan-out only.
            wake=[self.keys.pending(name, transaction_id) for name in self.handlers if name not in names],
            park_s=ORDER_PARK_S,
            parent=job_id,
        )
        return names

    async def deliver(self, handler: str, payload: dict[str, Any], *, job_id: str) -> Outcome:
        """Run one handler job (see the module doc); re-defer the job when the outcome has a delay."""
        event_key, transaction_id, index = (
            str(payload["key"]),
            str(payload["transaction_id"]),
            int(payload["index"]),
        )
        loaded = self.handlers.get(handler)
        policy = loaded.spec.retry if loaded is not None else RetryPolicy()
        # The token is the job id: arq never runs one job twice at once, so a claim with our
        # own token is a run of this job that died, and we may take over at once.
        claim = await self.records.claim(
            handler,
            event_key,
            job_id,
            lease_s=policy.timeout_s + LEASE_MARGIN_S,
            queue_name=self.settings.queue_name,
            wait_for=(self.keys.order(transaction_id), self.keys.pending(handler, transaction_id)),
            index=index,
        )
        if claim.state == "blocked":
            # Already parked by the claim script; the earlier event's settling wakes it.
            return Outcome("wait", None)
        if claim.state == "busy":
            return Outcome("wait", min(max(claim.busy_for_s, 0.1), BUSY_WAIT_MAX_S))
        if claim.state in ("done", "dead"):
            return await self._settle(handler, event_key, transaction_id, job_id, None, "skipped")
        event = TransitionEvent.model_validate(payload)
        attempt = claim.attempt
        if attempt > policy.max_attempts:
            lost = ErrorRecord(
                at=self._now(),
                attempt=attempt - 1,
                type="AttemptLost",
                message=f"attempt {attempt - 1} never finished: the worker stopped or died while it ran",
            )
            return await self._dead_letter(handler, event, payload, job_id, attempt - 1, lost, "exhausted")
        bound = log.bind(event_key=event_key, transaction_id=transaction_id, handler=handler, attempt=attempt)
        timer = asyncio.timeout(policy.timeout_s)
        matched = True
        try:
            async with timer:
                if loaded is None:
                    raise _NotEnabledError(f"handler {handler!r} is not enabled in this worker")
                matched = loaded.spec.subscription.matches(event)
                if matched:
                    ctx = HandlerContext(
                        event=event,
                        client=self._client,
                        log=bound,
                        settings=self.settings,
                        handler_settings=loaded.handler_settings,
                        http=self._http,
                        attempt=attempt,
                        handler=handler,
                        namespace=self.settings.namespace,
                        steps=self.records.steps(handler, event_key, attempt),
                    )
                    await loaded.handler.handle(ctx)
        except asyncio.CancelledError:
            # The worker is stopping: this attempt does not count, and the job runs again later.
            await asyncio.shield(self.records.unclaim(handler, event_key, job_id))
            raise
        except Exception as exc:
            message = f"attempt timed out after {policy.timeout_s:g} s" if timer.expired() else None
            return await self._failed(handler, event, payload, job_id, attempt, policy, exc, message)
        return await self._settle(
            handler, event_key, transaction_id, job_id, "done", "done" if matched else "skipped"
        )

    async def _settle(
        self,
        handler: str,
        event_key: str,
        transaction_id: str,
        job_id: str,
        status: Literal["done"] | None,
        counter: str,
    ) -> Outcome:
        async with self._redis.pipeline(transaction=True) as pipe:
            self.records.settle_in(pipe, handler, event_key, job_id, status)
            self.ordering.release_in(pipe, handler, transaction_id, job_id)
            pipe.hincrby(self.keys.stats(handler), counter, 1)
            await pipe.execute()
        return Outcome("done" if counter == "done" else "skipped")

    async def _failed(
        self,
        handler: str,
        event: TransitionEvent,
        payload: dict[str, Any],
        job_id: str,
        attempt: int,
        policy: RetryPolicy,
        exc: Exception,
        message: str | None,
    ) -> Outcome:
        now_s = self._clock()
        verdict = classify(exc, now_s=now_s)
        error = describe(exc, attempt=attempt, at=datetime.fromtimestamp(now_s, tz=UTC), message=message)
        if verdict.permanent:
            return await self._dead_letter(handler, event, payload, job_id, attempt, error, "permanent")
        delay_s = policy.delay_s(attempt, self._rng, at_least_s=verdict.at_least_s)
        if delay_s is None:
            return await self._dead_letter(handler, event, payload, job_id, attempt, error, "exhausted")
        async with self._redis.pipeline(transaction=True) as pipe:
            self.records.fail_in(pipe, handler, event.key, job_id, error)
            pipe.hincrby(self.keys.stats(handler), "retried", 1)
            await pipe.execute()
        # Identifiers and the error's type only: a message may carry personal data.
        log.warning(
            "handler attempt failed",
            event_key=event.key,
            handler=handler,
            transition=event.transition,
            attempt=attempt,
            max_attempts=policy.max_attempts,
            error_type=error.type,
            where=error.where,
            retry_in_s=round(delay_s, 3),
        )
        return Outcome("retry", delay_s)

    async def _dead_letter(
        self,
        handler: str,
        event: TransitionEvent,
        payload: dict[str, Any],
        job_id: str,
        attempts: int,
        error: ErrorRecord,
        reason: Literal["permanent", "exhausted"],
    ) -> Outcome:
        record = await self.records.read(handler, event.key)
        errors = [e for e in record.errors if e.attempt != error.attempt] + [error]
        letter = DeadLetter.of(
            handler,
            event,
            job_id=job_id,
            reason=reason,
            attempts=attempts,
            errors=errors,
            dead_lettered_at=self._now(),
            payload=payload,
        )
        async with self._redis.pipeline(transaction=True) as pipe:
            self.records.fail_in(pipe, handler, event.key, job_id, error)
            self.records.settle_in(pipe, handler, event.key, job_id, "dead")
            self.dead_letters.add_in(pipe, letter)
            self.ordering.release_in(pipe, handler, event.transaction_id, job_id)
            pipe.hincrby(self.keys.stats(handler), "dead_lettered", 1)
            await pipe.execute()
        report(letter)
        return Outcome("dead")
