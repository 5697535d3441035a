"""Per-transaction order: a handler gets a transaction's events in transition order.

Jobs run concurrently, so order is kept by bookkeeping, not by the queue:

1. The poller enqueues each event's fan-out job and, in the same Lua script,
   records it in the transaction's *event-level* pending set ``P:order:<tx>``
   (member: the job id, which is the event key; score: the transition index).
2. The fan-out job enqueues one job per matching handler and records each in that
   handler's *handler-level* pending set ``P:pending:<handler>:<tx>`` (member: the
   handler job id; score: the index), then removes the event-level entry: one
   script, so at every instant an undelivered event is in one set or the other.
3. A handler job for index ``i`` runs only when neither the event-level set nor its
   handler's set holds a lower index; different transactions never wait for each
   other. A job that would have to wait is *parked*: its score in the arq queue is
   moved :data:`ORDER_PARK_S` into the future, in the same script as the check (at
   enqueue, or when it runs and finds itself blocked), and it does not use up an
   attempt.
4. Whatever removes the entry a parked job waits for wakes it: a handler job that
   settles (done, dead-lettered or a no-op) wakes the lowest entry of its set, and a
   fan-out wakes the lowest entry of each enabled handler it did not queue a job
   for. Waking moves the job back to the front of the queue.

Checking and parking in one script is what makes a wake-up impossible to miss: a
job is either still unblocked when it checks, or parked before the blocker can
settle and wake it. So the park time is only a safety net (for entries that vanish
without a wake, such as leftovers below).

The queue is ordered by age: a fan-out's handler jobs and a woken job take the
score of the job that queued or woke them, so a transaction's later events do not
go to the back of a long queue once per step of the chain.

Entries are written only together with their job (``arq:job:<id>`` exists from
enqueue until arq finishes the job), so an entry whose job key is gone is a
leftover (arq expired or gave up on the job without our code running); the blocker
check drops such entries instead of waiting on them forever. The sets also expire,
refreshed on every write.

Jobs are written in arq's own format (:func:`arq.jobs.serialize_job`, the same
key/result existence check as ``ArqRedis.enqueue_job``) because arq cannot add our
bookkeeping to its enqueue transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from redis.asyncio.client import Pipeline

from worker.queue.keys import Keys

__all__ = [
    "EVENT_JOB_FUNCTION",
    "HANDLER_JOB_FUNCTION",
    "JOB_EXPIRY_S",
    "ORDER_LUA",
    "ORDER_PARK_S",
    "Ordering",
    "QueuedJob",
    "handler_job_id",
    "now_ms",
]

#: arq function of the fan-out job (one per event, queued by the poller).
EVENT_JOB_FUNCTION = "handle_event"
#: arq function of the per-handler job.
HANDLER_JOB_FUNCTION = "run_handler"
#: How far a blocked job is parked. It is woken when its turn comes; this bounds the wait
#: only when an entry disappears without waking anyone (a leftover, an expired set).
ORDER_PARK_S = 5.0
#: arq's default: a job not started within a day of when it was due is dropped (we refresh it).
JOB_EXPIRY_S = expires_extra_ms / 1000

#: Lua functions shared by the scripts here and in :mod:`worker.deliver.idempotency`.
ORDER_LUA = """
-- The score a job woken or queued by job `own` gets: own's, when it is older than now.
local function base_score(queue, own, now)
  if own ~= '' then
    local s = redis.call('ZSCORE', queue, own)
    if s and tonumber(s) < now then return tonumber(s) end
  end
  return now
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

-- Move the job of `zset`'s lowest entry to `score` if it is parked (queued later than now).
local function wake_first(queue, zset, score, now)
  local first = redis.call('ZRANGE', zset, 0, 0)
  if #first == 1 then
    local s = redis.call('ZSCORE', queue, first[1])
    if s and tonumber(s) > now then redis.call('ZADD', queue, 'XX', score, first[1]) end
  end
end
"""

# KEYS: queue, the event-level zset (removed from / consulted), then (job key, result key, pending
#       zset) per job, then zsets whose first job to wake.
# ARGV: now ms, job expiry ms, pending ttl ms, member to remove ('' = none), number of jobs,
#       park ms (0 = never check), the queuing job's id ('' = none), then (job id, job, index) per job.
# Returns one 1 (created) or 0 (the job or its result already exists) per job.
_ENQUEUE = (
    ORDER_LUA
    + """
local now, n, park = tonumber(ARGV[1]), tonumber(ARGV[5]), tonumber(ARGV[6])
local base = base_score(KEYS[1], ARGV[7], now)
if ARGV[4] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[4])
end
local created = {}
for i = 0, n - 1 do
  local job_key, result_key, pending = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  local job_id, job, index = ARGV[8 + 3 * i], ARGV[9 + 3 * i], ARGV[10 + 3 * i]
  if redis.call('EXISTS', job_key, result_key) == 0 then
    local score = base
    if park > 0 and (#redis.call('ZRANGEBYSCORE', pending, '-inf', '(' .. index, 'LIMIT', 0, 1) > 0
        or #redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. index, 'LIMIT', 0, 1) > 0) then
      score = now + park
    end
    redis.call('PSETEX', job_key, ARGV[2], job)
    redis.call('ZADD', KEYS[1], score, job_id)
    redis.call('ZADD', pending, index, job_id)
    redis.call('PEXPIRE', pending, ARGV[3])
    created[#created + 1] = 1
  else
    created[#created + 1] = 0
  end
end
for k = 3 + 3 * n, #KEYS do
  wake_first(KEYS[1], KEYS[k], base, now)
end
return created
"""
)

# KEYS: pending zset, queue. ARGV: member, now ms.
# Removes the settled job's entry and wakes the next one at the settled job's own age.
_RELEASE = (
    ORDER_LUA
    + """
local now = tonumber(ARGV[2])
redis.call('ZREM', KEYS[1], ARGV[1])
wake_first(KEYS[2], KEYS[1], base_score(KEYS[2], ARGV[1], now), now)
return 1
"""
)


def now_ms() -> int:
    """Wall-clock milliseconds, the clock arq scores its queue with."""
    return int(time.time() * 1000)


def handler_job_id(event_key: str, handler: str) -> str:
    """The job id of ``handler``'s delivery of an event (one per pair, so arq refuses a copy)."""
    return f"{event_key}:{handler}"


@dataclass(frozen=True)
class QueuedJob:
    """A job to enqueue together with its pending-set entry."""

    job_id: str
    function: str
    args: tuple[Any, ...]
    pending_key: str
    index: int


class Ordering:
    """Enqueue jobs with their pending entries; release an entry when its job settles.

    Whether a job may run yet is asked in :meth:`worker.deliver.idempotency.DeliveryRecords.claim`,
    with :data:`ORDER_LUA`'s ``first_blocker``, in the same script as the claim.
    """

    def __init__(self, redis: ArqRedis, keys: Keys, *, queue_name: str) -> None:
        self._redis = redis
        self.keys = keys
        self.queue_name = queue_name

    def _enqueue_command(
        self,
        jobs: Sequence[QueuedJob],
        *,
        pending_ttl_s: float,
        order_key: str | None,
        remove: str,
        wake: Sequence[str],
        park_s: float,
        parent: str,
    ) -> list[Any]:
        at_ms = now_ms()
        keys: list[Any] = [self.queue_name, order_key or self.queue_name]
        args: list[Any] = [
            str(at_ms),
            str(int(JOB_EXPIRY_S * 1000)),
            str(int(pending_ttl_s * 1000)),
            remove,
            str(len(jobs)),
            str(int(park_s * 1000)) if order_key else "0",
            parent,
        ]
        for job in jobs:
            keys += [job_key_prefix + job.job_id, result_key_prefix + job.job_id, job.pending_key]
            data = serialize_job(
                job.function, job.args, {}, None, at_ms, serializer=self._redis.job_serializer
            )
            args += [job.job_id, data, str(job.index)]
        keys += list(wake)
        return [_ENQUEUE, len(keys), *keys, *args]

    async def enqueue(
        self,
        jobs: Sequence[QueuedJob],
        *,
        pending_ttl_s: float,
        order_key: str | None = None,
        remove: str = "",
        wake: Sequence[str] = (),
        park_s: float = 0.0,
        parent: str = "",
    ) -> list[bool]:
        """Enqueue ``jobs`` (those not already queued or finished) with their entries, atomically.

        ``remove`` is a member of the event-level set ``order_key`` to drop first:
        the fan-out swaps the event-level entry for the handler-level ones this way.
        With ``park_s`` a job that would have to wait for an earlier event (in its
        pending set or ``order_key``) is parked that long instead. ``wake`` lists
        pending sets whose first job is woken after. ``parent`` is the job doing
        this: the new jobs take its age in the queue.
        """
        if not jobs and not remove and not wake:
            return []
        command = self._enqueue_command(
            jobs,
            pending_ttl_s=pending_ttl_s,
            order_key=order_key,
            remove=remove,
            wake=wake,
            park_s=park_s,
            parent=parent,
        )
        created = await self._redis.eval(*command)  # type: ignore[misc]
        return [bool(c) for c in created]

    def enqueue_in(
        self,
        pipe: Pipeline,
        jobs: Sequence[QueuedJob],
        *,
        pending_ttl_s: float,
        order_key: str | None = None,
        park_s: float = 0.0,
    ) -> None:
        """Queue the same enqueue on a transaction pipeline (replays combine it with other writes)."""
        pipe.eval(
            *self._enqueue_command(
                jobs,
                pending_ttl_s=pending_ttl_s,
                order_key=order_key,
                remove="",
                wake=(),
                park_s=park_s,
                parent="",
            )
        )

    def release_in(self, pipe: Pipeline, handler: str, transaction_id: object, job_id: str) -> None:
        """Queue the removal of a settled job's entry and the wake-up of the next one."""
        pipe.eval(
            _RELEASE, 2, self.keys.pending(handler, transaction_id), self.queue_name, job_id, str(now_ms())
        )
