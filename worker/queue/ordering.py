"""Per-transaction order, the job ids, and how jobs are written to arq's queue.

A handler gets a transaction's events in transition order although jobs run
concurrently; order is kept by bookkeeping, not by the queue:

1. The poller enqueues each event's job and, in the same script, records it in the
   transaction's *event-level* pending set ``P:order:<tx>`` (member: the event job
   id; score: the transition index).
2. The event job delivers inline to the handlers it can run at once. A delivery
   that cannot finish there (waiting for an earlier event, retrying, a handler this
   worker does not run) becomes a *handler job*, recorded in that handler's
   *handler-level* pending set ``P:pending:<handler>:<tx>`` before the event-level
   entry goes: at every instant an undelivered (event, handler) pair is in one set
   or the other.
3. A delivery of index ``i`` runs only when neither set holds a lower index;
   different transactions never wait for each other. A handler job that must wait
   is *parked*: its score in the arq queue moves :data:`ORDER_PARK_S` ahead, in the
   same script as the check, without using an attempt.
4. Whatever removes the entry a parked job waits for wakes it (moves it back to the
   front of the queue). A job *deferred for a retry* is in ``P:deferred`` until its
   retry time and is never woken early: parked-for-order and deferred-for-retry are
   different states.

Checking and parking in one script is what makes a wake-up impossible to miss, so
the park time is only a safety net.

Job keys are written without an expiry (arq's default drops a job not started
within a day: a worker fleet down for a day, or a retry deferred past a day, would
lose it), and job ids carry the namespace prefix (arq's ids are global to a Redis
database, so two namespaces on one Redis must not share them). Pending sets do not
expire either: an entry leaves when its job settles, and an entry whose job key is
gone (something outside flexworker removed it) is dropped by the blocker check.

Jobs are written in arq's own format (:func:`arq.jobs.serialize_job`, the same
key/result existence check as ``ArqRedis.enqueue_job``) because arq cannot add our
bookkeeping to its enqueue transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from redis.asyncio.client import Pipeline

from worker.queue.keys import Keys

__all__ = [
    "EVENT_JOB_FUNCTION",
    "HANDLER_JOB_FUNCTION",
    "ORDER_LUA",
    "ORDER_PARK_S",
    "Ordering",
    "QueuedJob",
    "event_job_id",
    "handler_job_id",
    "now_ms",
]

#: arq function of the event job (one per event, queued by the poller).
EVENT_JOB_FUNCTION = "handle_event"
#: arq function of the per-handler job (a delivery that could not finish inline).
HANDLER_JOB_FUNCTION = "run_handler"
#: How far a blocked job is parked. It is woken when its turn comes; this bounds the wait
#: only when an entry disappears without waking anyone.
ORDER_PARK_S = 5.0

#: Lua functions shared by the scripts here and in :mod:`worker.deliver.scripts`.
ORDER_LUA = """
-- Now, in ms: the caller's clock when it gives one (tests pin it), else Redis's own. Scores,
-- parks and retry times all use Redis's clock, so worker hosts whose clocks disagree agree.
local function clock_ms(given)
  if given then return given end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The score a job woken or queued by job `own` gets: own's, when it is older than now.
local function base_score(queue, own, now)
  if own ~= '' then
    local s = redis.call('ZSCORE', queue, own)
    if s and tonumber(s) < now then return tonumber(s) end
  end
  return now
end

local function has_lower(zset, index)
  return #redis.call('ZRANGEBYSCORE', zset, '-inf', '(' .. index, 'LIMIT', 0, 1) > 0
end

-- The lowest live member below `index` in any of `zsets`, or false. A member whose arq
-- job is gone is a leftover: dropped on the way.
local function first_blocker(zsets, index, job_prefix)
  for _, zset in ipairs(zsets) do
    while true do
      local lower = redis.call('ZRANGEBYSCORE', zset, '-inf', '(' .. index, 'LIMIT', 0, 1)
      if #lower == 0 then break end
      if redis.call('EXISTS', job_prefix .. lower[1]) == 1 then return lower[1] end
      redis.call('ZREM', zset, lower[1])
    end
  end
  return false
end

-- Move the job of `zset`'s lowest entry to `score` if it is parked for order: queued
-- later than now and not deferred for a retry.
local function wake_first(queue, zset, score, now, deferred)
  local first = redis.call('ZRANGE', zset, 0, 0)
  if #first == 1 then
    local s = redis.call('ZSCORE', queue, first[1])
    if s and tonumber(s) > now then
      local until_ms = redis.call('ZSCORE', deferred, first[1])
      if not until_ms or tonumber(until_ms) <= now then
        redis.call('ZADD', queue, 'XX', score, first[1])
      end
    end
  end
end

-- Write a job (unless it or its result exists) at `score`, with its pending entry.
local function put_job(queue, job_key, result_key, pending, job_id, job, index, score)
  if redis.call('EXISTS', job_key, result_key) ~= 0 then return 0 end
  redis.call('SET', job_key, job)
  redis.call('ZADD', queue, score, job_id)
  redis.call('ZADD', pending, index, job_id)
  redis.call('PERSIST', pending)
  return 1
end
"""

# KEYS: queue, the event-level zset (consulted, and removed from; the queue = none), the
#       deferred zset, then (job key, result key, pending zset) per job, then zsets to wake.
# ARGV: now ms ('' = Redis's clock), member to remove ('' = none), number of jobs, park ms
#       (0 = never check), the queuing job's id ('' = none), then (job id, job, index, not
#       before ms) per job.
# Returns one 1 (created) or 0 (the job or its result already exists) per job.
_ENQUEUE = (
    ORDER_LUA
    + """
local now, n, park = clock_ms(tonumber(ARGV[1])), tonumber(ARGV[3]), tonumber(ARGV[4])
local base = base_score(KEYS[1], ARGV[5], now)
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
local created = {}
for i = 0, n - 1 do
  local pending, index = KEYS[6 + 3 * i], ARGV[8 + 4 * i]
  local score = base
  local not_before = tonumber(ARGV[9 + 4 * i])
  if not_before > now then score = not_before end
  if park > 0 and (has_lower(pending, index) or (KEYS[2] ~= KEYS[1] and has_lower(KEYS[2], index))) then
    score = math.max(score, now + park)
  end
  local made = put_job(KEYS[1], KEYS[4 + 3 * i], KEYS[5 + 3 * i], pending, ARGV[6 + 4 * i],
                       ARGV[7 + 4 * i], index, score)
  if made == 1 and not_before > now then redis.call('ZADD', KEYS[3], not_before, ARGV[6 + 4 * i]) end
  created[#created + 1] = made
end
for k = 4 + 3 * n, #KEYS do
  wake_first(KEYS[1], KEYS[k], base, now, KEYS[3])
end
return created
"""
)


def now_ms() -> int:
    """This host's wall clock in milliseconds (arq's own enqueue time)."""
    return int(time.time() * 1000)


def event_job_id(prefix: str, event_key: str) -> str:
    """The id of an event's job: namespaced, because arq's ids are global to a Redis database."""
    return f"{prefix}:{event_key}"


def handler_job_id(event_key: str, handler: str, prefix: str = "") -> str:
    """The id of ``handler``'s own job for an event (one per pair, so arq refuses a copy)."""
    return f"{prefix}:{event_key}:{handler}" if prefix else f"{event_key}:{handler}"


@dataclass(frozen=True)
class QueuedJob:
    """A job to enqueue together with its pending-set entry.

    ``not_before_ms`` (the queue's clock: Redis's) defers it for a retry: it is then also in
    ``P:deferred`` so that no wake-up pulls it forward.
    """

    job_id: str
    function: str
    args: tuple[Any, ...]
    pending_key: str
    index: int
    not_before_ms: int = 0


class Ordering:
    """Enqueue jobs with their pending entries.

    Whether a delivery may run yet is asked in :mod:`worker.deliver.scripts`, with
    :data:`ORDER_LUA`'s ``first_blocker``, in the same script as the claim.
    ``clock`` pins the queue's clock (Unix seconds) for tests; by default the scripts
    use Redis's clock.
    """

    def __init__(
        self, redis: ArqRedis, keys: Keys, *, queue_name: str, clock: Callable[[], float] | None = None
    ) -> None:
        self._redis = redis
        self.keys = keys
        self.queue_name = queue_name
        self.clock = clock
        self._script = redis.register_script(_ENQUEUE)

    def now_ms(self) -> int | None:
        """The pinned clock's now (ms), or None: the scripts then read Redis's clock."""
        return None if self.clock is None else int(self.clock() * 1000)

    def serialize(self, function: str, args: tuple[Any, ...], at_ms: int) -> bytes:
        """A job in arq's format."""
        return serialize_job(function, args, {}, None, at_ms, serializer=self._redis.job_serializer)

    def _keys_and_args(
        self,
        jobs: Sequence[QueuedJob],
        *,
        order_key: str | None,
        remove: str,
        wake: Sequence[str],
        park_s: float,
        parent: str,
    ) -> tuple[list[Any], list[Any]]:
        given_ms = self.now_ms()
        # arq's enqueue time, only informational: the score is set by the script.
        at_ms = given_ms if given_ms is not None else now_ms()
        keys: list[Any] = [self.queue_name, order_key or self.queue_name, self.keys.deferred]
        args: list[Any] = [
            "" if given_ms is None else given_ms,
            remove,
            len(jobs),
            int(park_s * 1000),
            parent,
        ]
        for job in jobs:
            keys += [job_key_prefix + job.job_id, result_key_prefix + job.job_id, job.pending_key]
            args += [job.job_id, self.serialize(job.function, job.args, at_ms), job.index, job.not_before_ms]
        keys += list(wake)
        return keys, args

    async def enqueue(
        self,
        jobs: Sequence[QueuedJob],
        *,
        order_key: str | None = None,
        remove: str = "",
        wake: Sequence[str] = (),
        park_s: float = 0.0,
        parent: str = "",
    ) -> list[bool]:
        """Enqueue ``jobs`` (those not already queued or finished) with their entries, atomically.

        ``remove`` is a member of the event-level set ``order_key`` to drop first.
        With ``park_s`` a job that would have to wait for an earlier event (in its
        pending set or ``order_key``) is parked that long instead (the poller's event
        jobs too: a transaction's later events wait for the earlier ones' settles). ``wake`` lists
        pending sets whose first job is woken after. ``parent`` is the job doing
        this: the new jobs take its age in the queue.
        """
        if not jobs and not remove and not wake:
            return []
        keys, args = self._keys_and_args(
            jobs, order_key=order_key, remove=remove, wake=wake, park_s=park_s, parent=parent
        )
        created = await self._script(keys=keys, args=args)
        return [bool(c) for c in created]

    def enqueue_in(
        self,
        pipe: Pipeline,
        jobs: Sequence[QueuedJob],
        *,
        order_key: str | None = None,
        park_s: float = 0.0,
    ) -> None:
        """Queue the same enqueue on a transaction pipeline (replays combine it with other writes)."""
        keys, args = self._keys_and_args(
            jobs, order_key=order_key, remove="", wake=(), park_s=park_s, parent=""
        )
        pipe.scripts.add(self._script)  # type: ignore[arg-type]  # loaded before the transaction runs
        pipe.evalsha(self._script.sha, len(keys), *keys, *args)
