"""Where each source left off, kept in Redis and moved only by the lease holder.

A source's progress is a few keys (see :mod:`worker.queue.keys`): the cursor itself
(the transactions source's watermark on ``lastTransitionedAt`` in ms, or the events
source's last ``sequenceId``), the start floor fixed on first use, and a hash with
the rest — the last finished cycle's threshold, the resume record of a cycle cut
short, how far in time the source has read, and a *generation*.

Two kinds of writer, never mixed up:

- The polling replica writes through :meth:`CursorStore.save`, one script that first
  checks the poller lease still holds our fencing token (a poller that lost its lease
  cannot move anything) *and* that the generation is the one the cycle started from.
- An operator writes through :meth:`CursorStore.set` and :meth:`CursorStore.delete`,
  which bump the generation. A cycle in flight then fails its next save with
  :class:`~worker.errors.CursorChangedError` instead of undoing the rewind.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis

from worker.errors import CursorChangedError, LeaseLostError
from worker.events import SourceName
from worker.queue.keys import Keys

__all__ = ["CursorStore", "SourceState"]

log = structlog.get_logger("flexworker.poll")

#: KEYS: lease, cursor, floor, state. ARGV: token, generation, cursor, floor, then field/value pairs.
#: An empty cursor or floor leaves it; an empty field value deletes the field.
_SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if (redis.call('HGET', KEYS[4], 'generation') or '0') ~= ARGV[2] then return -1 end
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('SET', KEYS[3], ARGV[4]) end
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[4], ARGV[i])
  else redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1]) end
end
return 1
"""

#: KEYS: cursor, floor, state. ARGV: the new cursor ('' forgets it). Returns the new generation.
_OPERATOR_SET = """
if ARGV[1] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[3], 'previous', 'resume', 'at')
return redis.call('HINCRBY', KEYS[3], 'generation', 1)
"""


@dataclass(frozen=True)
class SourceState:
    """Everything stored for one source, as a cycle starts."""

    #: the watermark (ms) or the last sequence id; None before the first start.
    cursor: int | None = None
    #: the start floor (ms) fixed on first use: nothing older is ever emitted.
    floor: int | None = None
    #: the threshold (ms) of the last cycle that finished.
    previous: int | None = None
    #: the cycle in progress that was cut short (source-specific), to resume.
    resume: dict[str, Any] | None = None
    #: the time (ms) this source has read up to; another source starts from it on a switch.
    at: int | None = None
    #: bumped by every operator write; a cycle's saves need it unchanged.
    generation: int = 0
    #: the time (ms) the *other* source has read up to, for a first start after a switch.
    handoff: int | None = None


def _int(value: bytes | str | None) -> int | None:
    return None if value is None else int(value)


def _decoded(fields: dict[Any, Any]) -> dict[str, Any]:
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}


def _resume(source: SourceName, raw: bytes | None) -> dict[str, Any] | None:
    """The resume record, or None for one that is not a JSON object (a downgrade, a hand edit)."""
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        log.warning("unreadable resume record ignored; the cycle starts afresh", source=source)
        return None
    return record


def _handoff(other: SourceName, cursor: int | None, floor: int | None, fields: dict[str, Any]) -> int | None:
    """The time (ms) the other source had read everything up to, for a first start after a switch.

    For the transactions source that is not its watermark but the lowest point its emission
    still had to reach back to (a transaction it stepped over may have transitions there): the
    reach it keeps, or the floor of a cycle in progress.
    """
    if other == "events":
        return _int(fields.get("at")) or floor
    points = [cursor, _int(fields.get("previous"))]
    resume = _resume(other, fields.get("resume"))
    if resume is not None and isinstance(resume.get("emit_floor_ms"), int):
        points.append(resume["emit_floor_ms"])
    known = [point for point in points if point is not None]
    return min(known) if known else floor


class CursorStore:
    """Read and write the per-source progress of one namespace."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._keys = Keys(prefix)

    def key(self, source: SourceName) -> str:
        return self._keys.cursor(source)

    def floor_key(self, source: SourceName) -> str:
        return self._keys.cursor_floor(source)

    def _all_keys(self, source: SourceName) -> tuple[str, str, str]:
        return self.key(source), self.floor_key(source), self._keys.cursor_state(source)

    async def load(self, source: SourceName) -> SourceState:
        cursor_key, floor_key, state_key = self._all_keys(source)
        other: SourceName = "events" if source == "transactions" else "transactions"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(cursor_key)
            pipe.get(floor_key)
            pipe.hgetall(state_key)
            pipe.get(self.key(other))
            pipe.get(self.floor_key(other))
            pipe.hgetall(self._keys.cursor_state(other))
            cursor, floor, fields, other_cursor, other_floor, other_fields = await pipe.execute()
        fields = _decoded(fields)
        return SourceState(
            cursor=_int(cursor),
            floor=_int(floor),
            previous=_int(fields.get("previous")),
            resume=_resume(source, fields.get("resume")),
            at=_int(fields.get("at")),
            generation=_int(fields.get("generation")) or 0,
            handoff=_handoff(other, _int(other_cursor), _int(other_floor), _decoded(other_fields)),
        )

    async def get(self, source: SourceName) -> int | None:
        return _int(await self._redis.get(self.key(source)))

    async def set(self, source: SourceName, value: int) -> None:
        """Operators only (``flexworker cursor set``): the floor and any cycle in progress start anew."""
        await self._operator_write(source, str(value))

    async def delete(self, source: SourceName) -> None:
        """Operators only (``--clear``): forget the source's progress; the next start is a first start."""
        await self._operator_write(source, "")

    async def _operator_write(self, source: SourceName, value: str) -> None:
        await self._redis.eval(_OPERATOR_SET, 3, *self._all_keys(source), value)  # type: ignore[misc]

    async def save(
        self,
        source: SourceName,
        *,
        lease_key: str,
        token: int,
        generation: int,
        cursor: int | None = None,
        floor: int | None = None,
        fields: Mapping[str, str | None] | None = None,
    ) -> None:
        """Write progress if the lease holds ``token`` and the generation is unchanged.

        ``cursor`` and ``floor`` are left alone when None; a field whose value is None
        is deleted. Raises :class:`LeaseLostError` or :class:`CursorChangedError` and
        writes nothing when the check fails.
        """
        pairs: list[str] = []
        for name, value in (fields or {}).items():
            pairs += [name, "" if value is None else value]
        done = await self._redis.eval(  # type: ignore[misc]
            _SAVE,
            4,
            lease_key,
            *self._all_keys(source),
            str(token),
            str(generation),
            "" if cursor is None else str(cursor),
            "" if floor is None else str(floor),
            *pairs,
        )
        if done == 0:
            raise LeaseLostError("poller lease lost during the cycle; progress kept to the last checkpoint")
        if done == -1:
            raise CursorChangedError(f"the {source} cursor was set by an operator during the cycle")
