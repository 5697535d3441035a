"""A Redis lease that lets exactly one poller per marketplace run.

Acquire is ``SET key token NX PX ttl``; the token is a fencing token from ``INCR``,
so every holder ever gets a larger one. Renewal and release only touch the key
while it still holds our token, and writes that must come from the holder (the
poll cursor) run in a script that checks the token first: a poller that paused
past its lease and lost it can no longer move the cursor, whatever it believes.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

__all__ = ["Lease"]

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """One named lease in Redis."""

    def __init__(self, redis: Redis, key: str, *, ttl_s: float) -> None:
        self._redis = redis
        self.key = key
        self._fence_key = key + ":fence"
        self.ttl_ms = int(ttl_s * 1000)
        self.token: int | None = None

    async def acquire(self) -> bool:
        """Take the lease if it is free; on success :attr:`token` is our fencing token."""
        token = int(await self._redis.incr(self._fence_key))
        if await self._redis.set(self.key, str(token), nx=True, px=self.ttl_ms):
            self.token = token
            return True
        return False

    async def renew(self) -> bool:
        """Extend the lease; False means it is no longer ours."""
        if self.token is None:
            return False
        renewed = bool(await self._eval(_RENEW, str(self.token), str(self.ttl_ms)))
        if not renewed:
            self.token = None
        return renewed

    async def release(self) -> None:
        """Give the lease up at once so another replica can take over without waiting."""
        if self.token is not None:
            await self._eval(_RELEASE, str(self.token))
            self.token = None

    async def holder(self) -> int | None:
        """The fencing token of whoever holds the lease now."""
        value = await self._redis.get(self.key)
        return int(value) if value is not None else None

    async def _eval(self, script: str, *args: str) -> Any:
        return await self._redis.eval(script, 1, self.key, *args)  # type: ignore[misc]
