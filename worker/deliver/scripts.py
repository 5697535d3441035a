"""The delivery's two Redis scripts: claim (before handlers run) and settle (after).

Every change to a delivery's state goes through one of them, so each change is
atomic with the bookkeeping around it: the claim with the order check and the
parking of a job that must wait; the settle with the queue, the pending sets, the
dead-letter queue and the counters. The states and crash points they implement are
drawn in :mod:`worker.deliver.delivery`.

Both take many handlers at once: an event job claims and settles all the handlers
it runs inline in one round trip each; a handler job passes one.

A settle applies only while the delivery record's ``run`` is the settling run's
token (written by its claim): a settle repeated after a lost reply, or one from a
run whose claim ran out and was taken over, changes nothing and counts nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix

from worker.deliver.dlq import DeadLetter
from worker.deliver.failures import ErrorRecord
from worker.queue.keys import Keys
from worker.queue.ordering import ORDER_LUA, ORDER_PARK_S, Ordering, QueuedJob, now_ms

__all__ = ["Claim", "ClaimState", "DeliveryScripts", "SettleKind", "Settlement"]

ClaimState = Literal["claimed", "done", "dead", "blocked", "busy", "deferred", "queued", "handoff", "parked"]
SettleKind = Literal["done", "skipped", "retry", "dead", "release"]

# Both scripts take one JSON argument (the names read better than positions, and one
# argument costs the client far less to encode than forty) and build no key names:
# every key comes in that argument. A handler job's serialised job, for a retry queued
# from an event job, follows as ARGV[2...] (binary, so not in the JSON).
#
# `now` (ms) is present only when a test pins the queue's clock; otherwise Redis's clock.
# claim: {queue, order, deferred, now, record_now, token, index, job_prefix, park, retention,
#         own, handler_mode, handlers: [{delivery, claim, pending, job, lease}]}
# Returns per handler {state, value}, or {{'parked', 0}} for a parked event job.
_CLAIM = (
    ORDER_LUA
    + """
local a = cjson.decode(ARGV[1])
local now, token, index, own = clock_ms(a.now), a.token, a.index, a.own
local out = {}
if not a.handler_mode and first_blocker({a.order}, index, a.job_prefix) then
  -- An earlier event's job has not settled: it blocks every handler alike, so the event
  -- job itself is parked (same script as the check; that job's settle wakes it).
  redis.call('ZADD', a.queue, 'XX', now + a.park, own)
  return {{'parked', 0}}
end
for _, h in ipairs(a.handlers) do
  local f = redis.call('HMGET', h.delivery, 'status', 'settled_by', 'retry_at')
  local state, value = nil, 0
  if f[1] then
    state, value = f[1], (f[2] == own) and 1 or 0
  elseif not a.handler_mode and redis.call('EXISTS', h.job) == 1 then
    state = 'queued'
  elseif f[3] and tonumber(f[3]) > now then
    value = tonumber(f[3])
    if a.handler_mode then
      redis.call('ZADD', a.queue, 'XX', f[3], own)
      redis.call('ZADD', a.deferred, f[3], own)
      state = 'deferred'
    else
      state = 'handoff'
    end
  elseif a.handler_mode and first_blocker({a.order, h.pending}, index, a.job_prefix) then
    -- Parked in the same script as the check, so the blocker's wake-up cannot be missed.
    redis.call('ZADD', a.queue, 'XX', now + a.park, own)
    state = 'blocked'
  elseif not a.handler_mode and first_blocker({h.pending}, index, a.job_prefix) then
    state = 'handoff'
  else
    local holder = redis.call('GET', h.claim)
    if holder and holder ~= token then
      if a.handler_mode then state, value = 'busy', redis.call('PTTL', h.claim) else state = 'handoff' end
    else
      redis.call('SET', h.claim, token, 'PX', h.lease)
      value = redis.call('HINCRBY', h.delivery, 'attempts', 1)
      redis.call('HSETNX', h.delivery, 'first_attempt_at', a.record_now)
      redis.call('HSET', h.delivery, 'run', token)
      redis.call('HDEL', h.delivery, 'retry_at')
      redis.call('PEXPIRE', h.delivery, a.retention)
      if a.handler_mode then redis.call('ZREM', a.deferred, own) end
      state = 'claimed'
    end
  end
  out[#out + 1] = {state, value}
end
return out
"""
)

# settle: {queue, order, deferred, dlq, dlq_index, now, record_now, token, retention, own,
#          remove_from_order, index, finish: [arq's keys of the own job to delete] | false,
#          wake: [zsets], handlers: [{delivery, claim, pending, stats, kind, error_field,
#          error, retry_in (ms), job_id, job_key, result_key, job_arg, dlq_id, letter}]}
# Returns per handler 1 (applied) or 0 (not this run's to settle).
_SETTLE = (
    ORDER_LUA
    + """
local a = cjson.decode(ARGV[1])
local now, token, own = clock_ms(a.now), a.token, a.own
local applied = {}
for _, h in ipairs(a.handlers) do
  local ok = 0
  if h.kind == 'release' then
    -- A job that found its delivery settled: its entry goes; a genuine copy counts as skipped.
    redis.call('ZREM', h.pending, own)
    redis.call('ZREM', a.deferred, own)
    if redis.call('HGET', h.delivery, 'settled_by') ~= own then
      redis.call('HINCRBY', h.stats, 'skipped', 1)
    end
    ok = 1
  elseif redis.call('HGET', h.delivery, 'run') == token then
    ok = 1
    redis.call('HDEL', h.delivery, 'run', 'retry_at')
    if redis.call('GET', h.claim) == token then redis.call('DEL', h.claim) end
    if h.error_field ~= '' then redis.call('HSET', h.delivery, h.error_field, h.error) end
    if h.kind == 'retry' then
      local at = now + h.retry_in
      redis.call('HSET', h.delivery, 'retry_at', at)
      redis.call('PEXPIRE', h.delivery, a.retention)
      redis.call('HINCRBY', h.stats, 'retried', 1)
      if h.job_id == '' then
        redis.call('ZADD', a.queue, 'XX', at, own)
        redis.call('ZADD', a.deferred, at, own)
      elseif put_job(a.queue, h.job_key, h.result_key, h.pending, h.job_id, ARGV[h.job_arg], a.index,
                     at) == 1 then
        redis.call('ZADD', a.deferred, at, h.job_id)
      end
    else
      redis.call('HSET', h.delivery, 'status', h.kind == 'dead' and 'dead' or 'done', 'settled_at',
                 a.record_now, 'settled_by', own)
      if h.kind == 'dead' then
        redis.call('PERSIST', h.delivery)
        redis.call('HSET', a.dlq, h.dlq_id, h.letter)
        redis.call('ZADD', a.dlq_index, a.record_now, h.dlq_id)
        redis.call('HINCRBY', h.stats, 'dead_lettered', 1)
      else
        redis.call('PEXPIRE', h.delivery, a.retention)
        redis.call('HINCRBY', h.stats, h.kind, 1)
      end
      redis.call('ZREM', h.pending, own)
      redis.call('ZREM', a.deferred, own)
    end
  end
  applied[#applied + 1] = ok
end
local base = base_score(a.queue, own, now)
if a.remove_from_order ~= '' then
  redis.call('ZREM', a.order, a.remove_from_order)
  wake_first(a.queue, a.order, base, now, a.deferred)
end
for _, zset in ipairs(a.wake) do
  wake_first(a.queue, zset, base, now, a.deferred)
end
if a.finish then
  -- What arq does when the job returns, done here in the same script (one round trip less).
  redis.call('ZREM', a.queue, own)
  redis.call('DEL', unpack(a.finish))
end
return applied
"""
)

# KEYS: queue. ARGV: job id, wait ms, now ms ('' = Redis's clock).
_PARK = (
    ORDER_LUA
    + """
redis.call('ZADD', KEYS[1], 'XX', clock_ms(tonumber(ARGV[3])) + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

_UNCLAIM = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  if redis.call('HGET', KEYS[1], 'run') == ARGV[1] then redis.call('HDEL', KEYS[1], 'run') end
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    """One handler's answer to "may this attempt run?".

    - ``claimed``: run attempt number ``attempt``.
    - ``done`` / ``dead``: settled already; ``own`` when by this very job (a repeat).
    - ``blocked``, ``busy``, ``deferred``: a handler job that must wait (blocked and
      deferred are already re-scored in the queue; busy for ``busy_for_s``).
    - ``parked``: (event job, the only answer then) an earlier event's job has not
      settled; the event job is parked and is woken by that job's settle.
    - ``queued``: (event job) a handler job holds the delivery; ``handoff``: (event
      job) it cannot run inline, so a handler job must be queued, not before
      ``retry_at_ms`` when that is set.
    """

    state: ClaimState
    attempt: int = 0
    busy_for_s: float = 0.0
    retry_at_ms: int = 0
    own: bool = False


@dataclass(frozen=True)
class Settlement:
    """How one handler's claimed attempt ended, or a settled job's release.

    ``retry`` needs ``retry_in_ms`` and, from an event job, the handler ``job`` to
    queue; ``dead`` needs the ``letter``; a failed attempt's ``error`` is recorded.
    """

    handler: str
    kind: SettleKind
    error: ErrorRecord | None = None
    retry_in_ms: int = 0
    job: QueuedJob | None = None
    letter: DeadLetter | None = None


def _now(ordering: Ordering) -> dict[str, int]:
    given_ms = ordering.now_ms()
    return {} if given_ms is None else {"now": given_ms}


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class DeliveryScripts:
    """Claim and settle against one namespace's keys."""

    def __init__(self, redis: ArqRedis, keys: Keys, ordering: Ordering, *, retention_s: float) -> None:
        self._redis = redis
        self.keys = keys
        self.ordering = ordering
        self._retention_ms = int(retention_s * 1000)
        self._claim = redis.register_script(_CLAIM)
        self._settle = redis.register_script(_SETTLE)
        self._unclaim = redis.register_script(_UNCLAIM)
        self._park = redis.register_script(_PARK)

    async def claim(
        self,
        handlers: Sequence[tuple[str, float]],
        *,
        event_key: str,
        transaction_id: str,
        index: int,
        token: str,
        own_job_id: str,
        mode: Literal["event", "handler"],
        record_now_ms: int,
        job_ids: Sequence[str] = (),
    ) -> list[Claim]:
        """Claim each ``(handler, lease_s)``; ``job_ids`` are their handler jobs' ids (event mode)."""
        queue = self.ordering.queue_name
        argument = {
            "queue": queue,
            "order": self.keys.order(transaction_id),
            "deferred": self.keys.deferred,
            "record_now": record_now_ms,
            "token": token,
            "index": index,
            "job_prefix": job_key_prefix,
            "park": int(ORDER_PARK_S * 1000),
            "retention": self._retention_ms,
            "own": own_job_id,
            "handler_mode": mode == "handler",
            **_now(self.ordering),
            "handlers": [
                {
                    "delivery": self.keys.delivery(name, event_key),
                    "claim": self.keys.claim(name, event_key),
                    "pending": self.keys.pending(name, transaction_id),
                    "job": job_key_prefix + job_ids[i] if job_ids else queue,
                    "lease": int(lease_s * 1000),
                }
                for i, (name, lease_s) in enumerate(handlers)
            ],
        }
        replies = await self._claim(args=[_json(argument)])
        claims = []
        for raw_state, value in replies:
            state = raw_state.decode()
            if state == "claimed":
                claims.append(Claim("claimed", attempt=int(value)))
            elif state == "busy":
                claims.append(Claim("busy", busy_for_s=max(0, int(value)) / 1000))
            elif state in ("done", "dead"):
                claims.append(Claim(state, own=bool(int(value))))
            else:
                claims.append(Claim(state, retry_at_ms=int(value)))
        return claims

    async def settle(
        self,
        settlements: Sequence[Settlement],
        *,
        event_key: str,
        transaction_id: str,
        index: int,
        token: str,
        own_job_id: str,
        record_now_ms: int,
        remove_from_order: str = "",
        wake: Sequence[str] = (),
        finish: Sequence[str] = (),
    ) -> list[bool]:
        """Apply ``settlements`` for the run ``token`` of job ``own_job_id``; which applied.

        ``finish`` are arq's keys of the own job: given, the job is also finished as arq
        would (removed from the queue, its keys deleted), in the same script.
        """
        queue = self.ordering.queue_name
        enqueued_ms = self.ordering.now_ms() or now_ms()
        jobs: list[bytes] = []
        handlers = []
        for s in settlements:
            job = s.job
            if job is not None:
                jobs.append(self.ordering.serialize(job.function, job.args, enqueued_ms))
            handlers.append(
                {
                    "delivery": self.keys.delivery(s.handler, event_key),
                    "claim": self.keys.claim(s.handler, event_key),
                    "pending": self.keys.pending(s.handler, transaction_id),
                    "stats": self.keys.stats(s.handler),
                    "kind": s.kind,
                    "error_field": f"error:{s.error.attempt}" if s.error else "",
                    "error": s.error.model_dump_json() if s.error else "",
                    "retry_in": s.retry_in_ms,
                    "job_id": job.job_id if job else "",
                    "job_key": job_key_prefix + job.job_id if job else "",
                    "result_key": result_key_prefix + job.job_id if job else "",
                    "job_arg": len(jobs) + 1 if job else 0,
                    "dlq_id": s.letter.id if s.letter else "",
                    "letter": s.letter.model_dump_json() if s.letter else "",
                }
            )
        argument = {
            "queue": queue,
            "order": self.keys.order(transaction_id),
            "deferred": self.keys.deferred,
            "dlq": self.keys.dlq,
            "dlq_index": self.keys.dlq_index,
            **_now(self.ordering),
            "record_now": record_now_ms,
            "token": token,
            "retention": self._retention_ms,
            "own": own_job_id,
            "remove_from_order": remove_from_order,
            "index": index,
            "finish": list(finish) if finish else False,
            "wake": list(wake),
            "handlers": handlers,
        }
        applied = await self._settle(args=[_json(argument), *jobs])
        return [bool(a) for a in applied]

    async def park(self, job_id: str, wait_s: float) -> None:
        """Move a running job's score ``wait_s`` ahead of now (it returns with ``Retry(None)``)."""
        given_ms = self.ordering.now_ms()
        await self._park(
            keys=[self.ordering.queue_name],
            args=[job_id, int(wait_s * 1000), "" if given_ms is None else given_ms],
        )

    async def unclaim(self, handler: str, event_key: str, token: str) -> None:
        """Give back a claimed attempt that never really ran (the worker is stopping)."""
        await self._unclaim(
            keys=[self.keys.delivery(handler, event_key), self.keys.claim(handler, event_key)], args=[token]
        )
