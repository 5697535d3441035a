"""Putting transition events on the arq queue, each exactly once.

Each event becomes one arq job whose ``_job_id`` is the event key, so arq refuses a
second copy while the job or its result exists. arq forgets a job id once its
result expires, so we also keep a "seen" record per key for
``seen_retention_s`` (far longer than any source's lookback) and skip seen events
before asking arq.

Order of writes matters: the job is enqueued first and marked seen after. A crash
in between leaves the event unmarked, so the next cycle offers it again and arq's
job id (whose job or result is still there minutes later) refuses the copy;
marking first could lose the event.
"""

from __future__ import annotations

from collections.abc import Sequence

from arq.connections import ArqRedis

from worker.events import TransitionEvent

__all__ = ["JOB_FUNCTION", "EventQueue"]

#: Name of the arq job function that receives each event.
JOB_FUNCTION = "handle_event"


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

    def seen_key(self, event_key: str) -> str:
        return f"{self._prefix}:seen:{event_key}"

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
        for event in fresh:
            job = await self._redis.enqueue_job(
                JOB_FUNCTION,
                event.model_dump(mode="json"),
                _job_id=event.key,
                _queue_name=self.queue_name,
            )
            created += job is not None
        if fresh:
            async with self._redis.pipeline(transaction=False) as pipe:
                for event in fresh:
                    pipe.set(self.seen_key(event.key), "1", px=self._seen_retention_ms)
                await pipe.execute()
        return created
