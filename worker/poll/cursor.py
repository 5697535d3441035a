"""Where each source left off, kept in Redis and moved only by the lease holder.

The transactions source keeps a watermark on ``lastTransitionedAt`` (milliseconds);
the events source keeps the last ``sequenceId`` it enqueued. A cursor is written
only by a script that first checks the poller lease still holds our fencing
token, so a poller that lost its lease cannot move it.
"""

from __future__ import annotations

from redis.asyncio import Redis

from worker.events import SourceName
from worker.queue.keys import Keys

__all__ = ["CursorStore"]

_GUARDED_SET = """
if redis.call('GET', KEYS[2]) == ARGV[2] then
  if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1]) end
  if ARGV[3] ~= '' then redis.call('SET', KEYS[3], ARGV[3]) end
  return 1
end
return 0
"""


class CursorStore:
    """Read and write the per-source cursors of one namespace."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._keys = Keys(prefix)

    def key(self, source: SourceName) -> str:
        return self._keys.cursor(source)

    def floor_key(self, source: SourceName) -> str:
        return self._keys.cursor_floor(source)

    async def get_floor(self, source: SourceName) -> int | None:
        """The start floor the source fixed when it began (see the transactions source)."""
        value = await self._redis.get(self.floor_key(source))
        return int(value) if value is not None else None

    async def get(self, source: SourceName) -> int | None:
        value = await self._redis.get(self.key(source))
        return int(value) if value is not None else None

    async def set(self, source: SourceName, value: int) -> None:
        """Unguarded write, for operators (``flexworker cursor set``) only; the floor starts anew."""
        await self._redis.set(self.key(source), str(value))
        await self._redis.delete(self.floor_key(source))

    async def delete(self, source: SourceName) -> None:
        await self._redis.delete(self.key(source), self.floor_key(source))

    async def set_guarded(
        self,
        source: SourceName,
        value: int | None,
        *,
        lease_key: str,
        token: int,
        floor: int | None = None,
    ) -> bool:
        """Write ``value`` (and ``floor``) if the lease still holds ``token``; False when it does not."""
        done = await self._redis.eval(  # type: ignore[misc]
            _GUARDED_SET,
            3,
            self.key(source),
            lease_key,
            self.floor_key(source),
            "" if value is None else str(value),
            str(token),
            "" if floor is None else str(floor),
        )
        return bool(done)
