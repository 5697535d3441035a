"""Putting transition events on the arq queue, each exactly once.

Each event becomes one arq job whose id is the namespace prefix and the event key
(:func:`~worker.queue.ordering.event_job_id`), so arq refuses a second copy while the
job exists. arq forgets a job id once the job has run, so we also keep a "seen"
record per key for ``seen_retention_s`` (far longer than any source's lookback) and
skip seen events before asking arq.

Order of writes matters: the job is enqueued first and marked seen after. A crash
in between leaves the event unmarked, so the next cycle offers it again: arq's job
id refuses the copy while the job waits, and a copy queued after the job ran finds
every delivery done (a no-op). Marking first could lose the event.

Each job is written together with the event's entry in its transaction's
event-level pending set, in one script, so that handlers get a transaction's
events in order (see :mod:`worker.queue.ordering`).
"""

from __future__ import annotations

from collections.abc import Sequence

from arq.connections import ArqRedis

from worker.events import TransitionEvent
from worker.queue.keys import Keys
from worker.queue.ordering import EVENT_JOB_FUNCTION, ORDER_PARK_S, Ordering, QueuedJob, event_job_id

__all__ = ["JOB_FUNCTION", "EventQueue"]

#: Name of the arq job function that receives each event (delivered inline to the handlers).
JOB_FUNCTION = EVENT_JOB_FUNCTION
#: Events per enqueue script: a deep backlog must not hold Redis in one long script.
_BATCH = 200


class EventQueue:
    """Enqueue events for the worker, skipping those already seen."""

    def __init__(
        self,
        redis: ArqRedis,
        *,
        prefix: str,
        queue_name: str,
        seen_retention_s: float,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.queue_name = queue_name
        self._seen_retention_ms = int(seen_retention_s * 1000)
        self._keys = Keys(prefix)
        self._ordering = Ordering(redis, self._keys, queue_name=queue_name)

    def seen_key(self, event_key: str) -> str:
        return self._keys.seen(event_key)

    async def unseen(self, events: Sequence[TransitionEvent]) -> list[TransitionEvent]:
        """The events whose keys have no seen record, in the given order."""
        if not events:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.exists(self.seen_key(event.key))
            results = await pipe.execute()
        return [event for event, seen in zip(events, results, strict=True) if not seen]

    async def enqueue(self, events: Sequence[TransitionEvent]) -> int:
        """Enqueue the unseen events in order; return how many new jobs were created."""
        fresh = await self.unseen(events)
        created = 0
        for start in range(0, len(fresh), _BATCH):
            jobs = [
                QueuedJob(
                    job_id=event_job_id(self._prefix, event.key),
                    function=JOB_FUNCTION,
                    args=(event.model_dump(mode="json"),),
                    pending_key=self._keys.order(event.transaction_id),
                    index=event.index,
                )
                for event in fresh[start : start + _BATCH]
            ]
            results = await self._ordering.enqueue(jobs, park_s=ORDER_PARK_S)
            created += sum(results)
        if fresh:
            async with self._redis.pipeline(transaction=False) as pipe:
                for event in fresh:
                    pipe.set(self.seen_key(event.key), "1", px=self._seen_retention_ms)
                await pipe.execute()
        return created
