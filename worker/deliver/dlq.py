"""The dead-letter queue: deliveries that failed for good, kept until a person decides.

An event lands here when its handler raised a permanent error, or a transient one
on its last attempt. The entry (``P:dlq``, a JSON record per id, indexed by time in
``P:dlq:index``) holds the event, the handler, the attempts, every attempt's error
(time, type, one-line message, raising line: no tracebacks) and the first-failure
and dead-lettered times. Dead-lettering is logged at error level with identifiers
only (event key, handler, transition), and reported to Sentry when ``sentry_sdk``
is initialised (the worker does that when ``FLEXWORKER_SENTRY_DSN`` is set).

An id is derived from (handler, event key), so a pair has one entry at most.
:meth:`DeadLetters.replay` re-enqueues entries as fresh jobs (attempts start again)
and removes them; :meth:`DeadLetters.purge` just removes them. Both are what
``flexworker dlq`` runs.
"""

from __future__ import annotations

import builtins
import fnmatch
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import redis
import sentry_sdk
import structlog
from arq.connections import ArqRedis
from pydantic import BaseModel
from redis.asyncio.client import Pipeline

from worker import __version__
from worker.deliver.failures import ErrorRecord
from worker.deliver.idempotency import DeliveryRecords
from worker.errors import ConfigError
from worker.events import TransitionEvent
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

__all__ = [
    "EVENT_JOB_LETTER",
    "DeadLetter",
    "DeadLetters",
    "DlqFilter",
    "dead_letter_id",
    "init_sentry",
    "report",
]

log = structlog.get_logger("flexworker.dlq")

Reason = Literal["permanent", "exhausted", "internal"]
#: The handler named by the dead letter of an event job whose payload could not be read at all.
EVENT_JOB_LETTER = "(event job)"


def dead_letter_id(handler: str, event_key: str) -> str:
    """The id of (handler, event key)'s entry: short enough to type, the same every time."""
    return hashlib.sha256(f"{handler}\0{event_key}".encode()).hexdigest()[:16]


class DeadLetter(BaseModel):
    """One dead-lettered delivery."""

    id: str
    handler: str
    event_key: str
    transaction_id: str
    transition: str
    process_name: str
    job_id: str
    #: ``permanent`` (the handler's error), ``exhausted`` (attempts used up) or ``internal``
    #: (flexworker's own code around the handler failed: an event it cannot read, say).
    reason: Reason
    attempts: int
    errors: list[ErrorRecord]
    first_failure_at: datetime
    dead_lettered_at: datetime
    #: the event as delivered (it holds personal data: never logged).
    event: dict[str, Any]

    @classmethod
    def of(
        cls,
        handler: str,
        event: TransitionEvent,
        *,
        job_id: str,
        reason: Reason,
        attempts: int,
        errors: list[ErrorRecord],
        dead_lettered_at: datetime,
        payload: dict[str, Any] | None = None,
    ) -> DeadLetter:
        """The dead letter of ``event`` for ``handler``; ``errors`` must not be empty."""
        return cls.of_payload(
            handler,
            payload if payload is not None else event.model_dump(mode="json"),
            job_id=job_id,
            reason=reason,
            attempts=attempts,
            errors=errors,
            dead_lettered_at=dead_lettered_at,
        )

    @classmethod
    def of_payload(
        cls,
        handler: str,
        payload: dict[str, Any],
        *,
        job_id: str,
        reason: Reason,
        attempts: int,
        errors: list[ErrorRecord],
        dead_lettered_at: datetime,
    ) -> DeadLetter:
        """The dead letter of a queued payload, which need not be a valid event."""
        event_key = str(payload.get("key", job_id))
        return cls(
            id=dead_letter_id(handler, event_key),
            handler=handler,
            event_key=event_key,
            transaction_id=str(payload.get("transaction_id", "")),
            transition=str(payload.get("transition", "")),
            process_name=str(payload.get("process_name", "")),
            job_id=job_id,
            reason=reason,
            attempts=attempts,
            errors=errors,
            first_failure_at=min(e.at for e in errors),
            dead_lettered_at=dead_lettered_at,
            event=payload,
        )

    @property
    def last_error(self) -> ErrorRecord | None:
        return self.errors[-1] if self.errors else None


@dataclass(frozen=True)
class DlqFilter:
    """Which entries an operation applies to; every given criterion must hold."""

    handler: str | None = None
    #: an fnmatch glob on the transition.
    transition: str | None = None
    #: dead-lettered at or after.
    since: datetime | None = None
    #: dead-lettered at or before.
    until: datetime | None = None

    def matches(self, letter: DeadLetter) -> bool:
        return (
            (self.handler is None or letter.handler == self.handler)
            and (self.transition is None or fnmatch.fnmatchcase(letter.transition, self.transition))
            and (self.since is None or letter.dead_lettered_at >= self.since)
            and (self.until is None or letter.dead_lettered_at <= self.until)
        )


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


class DeadLetters:
    """The dead-letter queue of one namespace."""

    def __init__(
        self,
        redis: ArqRedis,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self.keys = Keys(settings.redis_prefix)
        self._records = DeliveryRecords(
            redis, self.keys, retention_s=settings.idempotency_retention_s, clock=clock
        )
        self._ordering = Ordering(redis, self.keys, queue_name=settings.queue_name)
        self._retention_s = settings.idempotency_retention_s
        self._clock = clock

    def add_in(self, pipe: Pipeline, letter: DeadLetter) -> None:
        """Queue the writes that store ``letter`` (part of the dead-lettering transaction)."""
        pipe.hset(self.keys.dlq, letter.id, letter.model_dump_json())
        pipe.zadd(self.keys.dlq_index, {letter.id: _ms(letter.dead_lettered_at)})

    async def count(self) -> int:
        return int(await self._redis.zcard(self.keys.dlq_index))

    async def show(self, letter_id: str) -> DeadLetter | None:
        raw = await self._redis.hget(self.keys.dlq, letter_id)  # type: ignore[misc]
        return None if raw is None else DeadLetter.model_validate_json(raw)

    async def list(self, filters: DlqFilter | None = None) -> builtins.list[DeadLetter]:
        """Matching entries, oldest first."""
        filters = filters or DlqFilter()
        low = "-inf" if filters.since is None else _ms(filters.since)
        high = "+inf" if filters.until is None else _ms(filters.until)
        ids = await self._redis.zrangebyscore(self.keys.dlq_index, low, high)
        if not ids:
            return []
        raws = await self._redis.hmget(self.keys.dlq, ids)  # type: ignore[misc]
        letters = [DeadLetter.model_validate_json(raw) for raw in raws if raw is not None]
        return [letter for letter in letters if filters.matches(letter)]

    async def select(self, ids: Sequence[str]) -> builtins.list[DeadLetter]:
        """The entries with these ids; a :class:`ConfigError` naming any that does not exist."""
        letters = []
        for letter_id in ids:
            letter = await self.show(letter_id)
            if letter is None:
                raise ConfigError(f"no dead letter with id {letter_id!r} (see `flexworker dlq list`)")
            letters.append(letter)
        return letters

    async def replay(
        self, letters: Sequence[DeadLetter], *, force: bool = False, forget_uncertain: bool = False
    ) -> builtins.list[str]:
        """Re-enqueue each entry as a fresh job for its handler and remove it; the new job ids.

        Attempts start again. A delivery already marked done stays a no-op unless
        ``force``; completed steps keep their results either way, and
        ``forget_uncertain`` lets steps that started without a result run again.
        """
        job_ids = []
        for letter in letters:
            job_id = await self._replay_one(letter, force=force, forget_uncertain=forget_uncertain)
            if job_id is None:
                log.info("dead letter already replayed or purged", dlq_id=letter.id)
                continue
            log.info(
                "dead letter replayed", dlq_id=letter.id, handler=letter.handler, event_key=letter.event_key
            )
            job_ids.append(job_id)
        return job_ids

    def _replay_job(self, letter: DeadLetter) -> QueuedJob:
        at_ms = int(self._clock() * 1000)
        if letter.handler == EVENT_JOB_LETTER:
            return QueuedJob(
                job_id=f"{event_job_id(self.keys.prefix, letter.event_key)}:replay:{at_ms}",
                function=EVENT_JOB_FUNCTION,
                args=(letter.event,),
                pending_key=self.keys.order(letter.transaction_id),
                index=int(letter.event.get("index", 0)),
            )
        return QueuedJob(
            job_id=f"{handler_job_id(letter.event_key, letter.handler, self.keys.prefix)}:replay:{at_ms}",
            function=HANDLER_JOB_FUNCTION,
            args=(letter.handler, letter.event),
            pending_key=self.keys.pending(letter.handler, letter.transaction_id),
            index=int(letter.event.get("index", 0)),
        )

    async def _replay_one(self, letter: DeadLetter, *, force: bool, forget_uncertain: bool) -> str | None:
        """Replay one letter if it is still there; its job id, or None.

        Checked and written in one optimistic transaction (``WATCH`` on the letters and the
        delivery record), so two replays at once queue one job and reset the record once.
        """
        record_key = self.keys.delivery(letter.handler, letter.event_key)
        job = self._replay_job(letter)
        while True:
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self.keys.dlq, record_key)
                    if not await pipe.hexists(self.keys.dlq, letter.id):  # type: ignore[misc]
                        return None
                    pipe.multi()  # type: ignore[no-untyped-call]
                    self._records.reset_in(
                        pipe, letter.handler, letter.event_key, force=force, forget_uncertain=forget_uncertain
                    )
                    self._ordering.enqueue_in(
                        pipe, [job], order_key=self.keys.order(letter.transaction_id), park_s=ORDER_PARK_S
                    )
                    pipe.hdel(self.keys.dlq, letter.id)
                    pipe.zrem(self.keys.dlq_index, letter.id)
                    await pipe.execute()
                    return job.job_id
                except redis.WatchError:
                    continue  # another write to the letters or the record: look again

    async def purge(self, letters: Sequence[DeadLetter]) -> int:
        """Remove entries without replaying them; how many were removed."""
        removed = 0
        for letter in letters:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self.keys.dlq, letter.id)
                pipe.zrem(self.keys.dlq_index, letter.id)
                # The record was kept for a replay; it may now expire like any other.
                pipe.pexpire(
                    self.keys.delivery(letter.handler, letter.event_key), int(self._retention_s * 1000)
                )
                deleted, _, _ = await pipe.execute()
            removed += int(deleted)
        return removed


def report(letter: DeadLetter) -> None:
    """Log a new dead letter at error level and send it to Sentry when that is set up.

    Identifiers and the error's type only: messages may carry personal data.
    """
    last = letter.last_error
    error_type = last.type if last else "unknown"
    log.error(
        "dead-lettered",
        dlq_id=letter.id,
        event_key=letter.event_key,
        handler=letter.handler,
        transition=letter.transition,
        reason=letter.reason,
        attempts=letter.attempts,
        error_type=error_type,
    )
    if sentry_sdk.get_client().is_active():
        sentry_sdk.capture_message(
            f"dead-lettered: {letter.handler} on {letter.transition} ({error_type})",
            level="error",
            tags={"handler": letter.handler, "transition": letter.transition, "reason": letter.reason},
            extras={
                "dlq_id": letter.id,
                "event_key": letter.event_key,
                "attempts": letter.attempts,
                "error_type": error_type,
                "where": last.where if last else "",
            },
            fingerprint=["flexworker-dead-letter", letter.handler, error_type],
        )


def init_sentry(settings: Settings) -> bool:
    """Initialise ``sentry_sdk`` from ``FLEXWORKER_SENTRY_DSN``; whether it was set.

    No personal data, no local variables, and no events from log lines: dead
    letters are reported on purpose, once each.
    """
    dsn = settings.sentry_dsn.get_secret_value() if settings.sentry_dsn is not None else ""
    if not dsn:
        return False
    from sentry_sdk.integrations.logging import LoggingIntegration
    from sentry_sdk.utils import BadDsn

    try:
        sentry_sdk.init(
            dsn=dsn,
            release=f"flexworker@{__version__}",
            # Sentry's default sends no personal data (no user, no request bodies); keep it.
            include_local_variables=False,
            integrations=[LoggingIntegration(level=None, event_level=None)],
        )
    except BadDsn as exc:
        # The message of BadDsn quotes the DSN, which holds a key: leave it out.
        raise ConfigError("setting FLEXWORKER_SENTRY_DSN is invalid: not a Sentry DSN") from exc
    return True
