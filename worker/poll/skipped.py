"""Items a source could not turn into events: recorded, counted, listed, never a stall.

One malformed transaction, or an event whose transaction can no longer be read,
must not freeze the source behind it. The source skips the item and records it
here (``P:skipped``, one JSON record per ``<source>:<type>:<id>``, indexed by when
it was last met): ``flexworker skipped`` lists them, ``flexworker status`` counts
them, and a warning names each once. Meeting the same item again (the lookback
re-reads it) updates its record and counts nothing. Records are kept as long as the
queue's seen records, and at most :data:`MAX_RECORDS` of them.

Reasons are one line with identifiers and field names only: never a value from the
item, which may hold personal data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from redis.asyncio import Redis

from worker.events import SourceName, from_ms
from worker.queue.keys import Keys
from worker.settings import Settings

__all__ = ["MAX_RECORDS", "SkippedItem", "SkippedItems"]

MAX_RECORDS = 10_000

log = structlog.get_logger("flexworker.poll")

#: KEYS: records, index, stats. ARGV: id, record JSON, now ms, oldest kept ms, max records.
#: Returns 1 when the item is new.
_RECORD = """
local new = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if new == 0 then
  local old = cjson.decode(redis.call('HGET', KEYS[1], ARGV[1]))
  local record = cjson.decode(ARGV[2])
  record['first_seen_ms'] = old['first_seen_ms']
  record['times'] = (old['times'] or 1) + 1
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(record))
else
  redis.call('HINCRBY', KEYS[3], 'skipped', 1)
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
local over = redis.call('ZCARD', KEYS[2]) - #stale - tonumber(ARGV[5])
if over > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], #stale, #stale + over - 1)) do table.insert(stale, id) end
end
for _, id in ipairs(stale) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return new
"""


@dataclass(frozen=True)
class SkippedItem:
    """One item a source skipped."""

    source: SourceName
    resource_type: str
    resource_id: str
    reason: str
    first_seen: datetime
    last_seen: datetime
    #: how many times the source met it.
    times: int = 1


class SkippedItems:
    """The skipped-item records of one namespace. ``clock`` gives Unix time in ms."""

    def __init__(self, redis: Redis, prefix: str, *, retention_s: float, clock: Callable[[], int]) -> None:
        self._redis = redis
        self._keys = Keys(prefix)
        self._retention_ms = int(retention_s * 1000)
        self._clock = clock

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> SkippedItems:
        """The namespace's records, kept as long as the queue's seen records, on the wall clock."""
        return cls(
            redis,
            settings.redis_prefix,
            retention_s=settings.seen_retention_s,
            clock=lambda: int(time.time() * 1000),
        )

    async def record(self, source: SourceName, resource_type: str, resource_id: str, reason: str) -> bool:
        """Record a skipped item; True when it was not recorded before."""
        now_ms = self._clock()
        item_id = f"{source}:{resource_type}:{resource_id}"
        record = {"reason": reason, "first_seen_ms": now_ms, "last_seen_ms": now_ms, "times": 1}
        new = await self._redis.eval(  # type: ignore[misc]
            _RECORD,
            3,
            self._keys.skipped,
            self._keys.skipped_index,
            self._keys.poll_stats,
            item_id,
            json.dumps(record),
            str(now_ms),
            str(now_ms - self._retention_ms),
            str(MAX_RECORDS),
        )
        if new:
            log.warning("item skipped", source=source, type=resource_type, id=resource_id, reason=reason)
        return bool(new)

    async def list(self) -> list[SkippedItem]:
        """Every record, oldest first."""
        ids: list[bytes] = await self._redis.zrange(self._keys.skipped_index, 0, -1)
        if not ids:
            return []
        raw = await self._redis.hmget(self._keys.skipped, ids)  # type: ignore[misc]
        items = []
        for item_id, value in zip(ids, raw, strict=True):
            if value is None:
                continue
            source, resource_type, resource_id = item_id.decode().split(":", 2)
            if source not in ("transactions", "events"):
                continue
            record = json.loads(value)
            items.append(
                SkippedItem(
                    source="events" if source == "events" else "transactions",
                    resource_type=resource_type,
                    resource_id=resource_id,
                    reason=record["reason"],
                    first_seen=from_ms(record["first_seen_ms"]),
                    last_seen=from_ms(record["last_seen_ms"]),
                    times=record.get("times", 1),
                )
            )
        return items

    async def count(self) -> int:
        """Items skipped since the namespace began (records may have expired since)."""
        value = await self._redis.hget(self._keys.poll_stats, "skipped")  # type: ignore[misc]
        return int(value) if value is not None else 0

    async def clear(self) -> int:
        """Forget every record (the counter stays); return how many there were."""
        count = int(await self._redis.zcard(self._keys.skipped_index))
        await self._redis.delete(self._keys.skipped, self._keys.skipped_index)
        return count
