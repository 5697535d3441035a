"""What a worker does once at start for jobs an earlier flexworker version queued.

Versions before the delivery rework wrote arq jobs with arq's one-day expiry and gave
the event-level and handler-level pending sets a TTL; a fleet upgraded after a day's
backlog would lose those. The jobs themselves still run as they are (same functions,
same arguments; their ids lack the namespace prefix, which only matters for new
jobs), so the upgrade is only this: drop the expiry of every job in the namespace's
queue and of every pending set. It is idempotent and cheap (one ``PERSIST`` per key,
pipelined), so every worker runs it at start.
"""

from __future__ import annotations

from arq.connections import ArqRedis
from arq.constants import job_key_prefix

from worker.queue.keys import Keys

__all__ = ["persist_queued"]

_BATCH = 1000


async def persist_queued(redis: ArqRedis, keys: Keys, *, queue_name: str) -> int:
    """Remove the expiry of queued jobs and pending sets; how many keys had one."""
    persisted = 0
    cursor = 0
    while True:
        cursor, members = await redis.zscan(queue_name, cursor, count=_BATCH)
        persisted += await _persist(redis, [job_key_prefix + member.decode() for member, _ in members])
        if cursor == 0:
            break
    for pattern in (keys.order("*"), keys.pending("*", "*")):
        batch = []
        async for key in redis.scan_iter(match=pattern, count=_BATCH):
            batch.append(key)
            if len(batch) >= _BATCH:
                persisted += await _persist(redis, batch)
                batch = []
        persisted += await _persist(redis, batch)
    return persisted


async def _persist(redis: ArqRedis, names: list[str] | list[bytes]) -> int:
    if not names:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.persist(name)
        results = await pipe.execute()
    return sum(bool(r) for r in results)
