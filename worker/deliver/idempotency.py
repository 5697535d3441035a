"""Each handler acts on each event once: delivery records, claims and recorded steps.

One hash per (handler, event key), ``P:delivery:<handler>:<event key>``, holds the
delivery's state (see :mod:`worker.queue.keys`):

- a **claim** (``P:claim:...``, the running attempt's token, ``<job id>#<arq try>``,
  with a lease) while an attempt runs. The lease is the handler's timeout plus
  :data:`LEASE_MARGIN_S`, and the attempt is cancelled at its timeout, so a live
  claim means an attempt really is running; a claim left by a worker that died
  expires, and the delivery runs again then.
- ``attempts``, counted when an attempt is claimed, ``error:<n>`` per failed one,
  and ``retry_at`` (queue clock, ms) while a retry waits.
- ``status``: ``done`` makes any later delivery of the event to the handler a no-op
  (also after a replay, unless the replay is forced); ``dead`` while dead-lettered.
- ``step:<name>`` per :meth:`~worker.plugin.HandlerContext.step`: started, or done
  with its JSON result. A step whose function raised is forgotten (it did not
  happen), unless what it raised is, or was raised from, a
  :class:`~worker.errors.CommandOutcomeUnknownError`: then it stays started, which
  the next attempt treats like a step cut off by a dead worker (uncertain).

Records expire ``FLEXWORKER_IDEMPOTENCY_RETENTION_S`` (default 30 days, never
shorter than the queue's seen retention) after their last write; a dead-lettered
one is kept until it is replayed or purged, so its step results survive the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio.client import Pipeline

from worker.deliver.failures import ErrorRecord
from worker.errors import CommandOutcomeUnknownError, PermanentError, StepUncertainError
from worker.events import from_ms
from worker.queue.keys import Keys

__all__ = ["LEASE_MARGIN_S", "STEP_GRACE_S", "DeliveryRecord", "DeliveryRecords", "RecordedSteps"]

#: A claim outlives its attempt's timeout by this much: a step in flight gets
#: :data:`STEP_GRACE_S` to finish, then the settle. So a killed worker's deliveries run
#: again within the handler's timeout plus this.
LEASE_MARGIN_S = 10.0
#: A step cut off (timeout, or a stopping worker) this long before it is cancelled: a step
#: that finishes in that time records its result instead of being left uncertain.
STEP_GRACE_S = 5.0

# ARGV: force, forget uncertain steps, retention ms. Returns 0 when a done record was kept.
_RESET = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'done' and ARGV[1] ~= '1' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 0
end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if f == 'status' or f == 'attempts' or f == 'first_attempt_at' or f == 'settled_at'
      or f == 'settled_by' or f == 'run' or f == 'retry_at' or string.sub(f, 1, 6) == 'error:' then
    redis.call('HDEL', KEYS[1], f)
  elseif ARGV[2] == '1' and string.sub(f, 1, 5) == 'step:' then
    local step = cjson.decode(redis.call('HGET', KEYS[1], f))
    if step['state'] ~= 'done' then redis.call('HDEL', KEYS[1], f) end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


@dataclass(frozen=True)
class DeliveryRecord:
    """A delivery record as read back (for the dead-letter queue, the CLI and tests)."""

    status: str | None
    attempts: int
    first_attempt_at: datetime | None
    settled_at: datetime | None
    errors: list[ErrorRecord] = field(default_factory=list)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)


def _from_ms(value: bytes | None) -> datetime | None:
    return None if value is None else from_ms(int(value))


class DeliveryRecords:
    """The delivery records of one namespace. ``clock`` is Unix time in seconds."""

    def __init__(
        self,
        redis: ArqRedis,
        keys: Keys,
        *,
        retention_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self.keys = keys
        self._retention_ms = int(retention_s * 1000)
        self._clock = clock

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def status(self, handler: str, event_key: str) -> str | None:
        value = await self._redis.hget(self.keys.delivery(handler, event_key), "status")  # type: ignore[misc]
        return value.decode() if isinstance(value, bytes) else None

    def reset_in(
        self, pipe: Pipeline, handler: str, event_key: str, *, force: bool, forget_uncertain: bool
    ) -> None:
        """Queue, for a replay: attempts start again; ``force`` also forgets a done mark.

        Completed steps keep their results, so a replay never repeats a side effect
        that is known to have happened; ``forget_uncertain`` drops the steps that
        started without a result (a person checked: they did not happen).
        """
        pipe.eval(
            _RESET,
            1,
            self.keys.delivery(handler, event_key),
            "1" if force else "0",
            "1" if forget_uncertain else "0",
            str(self._retention_ms),
        )

    async def read(self, handler: str, event_key: str) -> DeliveryRecord:
        raw: dict[bytes, bytes] = await self._redis.hgetall(self.keys.delivery(handler, event_key))  # type: ignore[misc]
        fields = {k.decode(): v for k, v in raw.items()}
        errors = [ErrorRecord.model_validate_json(v) for k, v in fields.items() if k.startswith("error:")]
        errors.sort(key=lambda e: e.attempt)
        steps = {k.removeprefix("step:"): json.loads(v) for k, v in fields.items() if k.startswith("step:")}
        status = fields.get("status")
        return DeliveryRecord(
            status=status.decode() if status is not None else None,
            attempts=int(fields.get("attempts", b"0")),
            first_attempt_at=_from_ms(fields.get("first_attempt_at")),
            settled_at=_from_ms(fields.get("settled_at")),
            errors=errors,
            steps=steps,
        )

    def steps(self, handler: str, event_key: str, attempt: int) -> RecordedSteps:
        """The step recorder for one attempt."""
        return RecordedSteps(
            self._redis,
            self.keys.delivery(handler, event_key),
            attempt,
            retention_ms=self._retention_ms,
            clock=self._clock,
        )


class RecordedSteps:
    """Runs :meth:`~worker.plugin.HandlerContext.step` against a delivery record."""

    def __init__(
        self,
        redis: ArqRedis,
        key: str,
        attempt: int,
        *,
        retention_ms: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._key = key
        self._attempt = attempt
        self._retention_ms = retention_ms
        self._clock = clock

    async def _write(self, name: str, value: dict[str, Any]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key, f"step:{name}", json.dumps(value, separators=(",", ":")))
            pipe.pexpire(self._key, self._retention_ms)
            await pipe.execute()

    async def _done(self, name: str, result: Any) -> Any:
        try:
            encoded = json.dumps(result, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            # The side effect happened but cannot be recorded: retrying would repeat it.
            raise PermanentError(
                f"step {name!r} returned {type(result).__name__}, which is not JSON; "
                "its result was not recorded"
            ) from exc
        await self._write(name, {"state": "done", "attempt": self._attempt, "result": json.loads(encoded)})
        return json.loads(encoded)

    async def run(
        self,
        name: str,
        fn: Callable[[], Awaitable[Any]],
        if_uncertain: Callable[[], Awaitable[Any]] | None,
    ) -> Any:
        if not isinstance(name, str) or not name:
            raise ValueError("a step needs a non-empty name")
        raw = await self._redis.hget(self._key, f"step:{name}")  # type: ignore[misc]
        if raw is not None:
            record = json.loads(raw)
            if record.get("state") == "done":
                return record.get("result")
            if if_uncertain is None:
                raise StepUncertainError(
                    f"step {name!r} started in attempt {record.get('attempt')} but its result was never "
                    "recorded; check whether it happened, then replay "
                    "(with --forget-uncertain-steps if it did not)"
                )
            found = await if_uncertain()
            if found is not None:
                return await self._done(name, found)
        await self._write(
            name, {"state": "started", "attempt": self._attempt, "at": int(self._clock() * 1000)}
        )
        call = asyncio.ensure_future(fn())
        try:
            result = await asyncio.shield(call)
        except asyncio.CancelledError:
            # Cut off (the attempt's timeout, a stopping worker): let the step in flight finish
            # for a moment, so that what it did is recorded rather than left uncertain.
            await asyncio.wait({call}, timeout=STEP_GRACE_S)
            if not call.done():
                call.cancel()  # still running: it stays started, which the next attempt sees
            elif not call.cancelled():
                await asyncio.shield(self._settle(name, call))
            raise
        except Exception as exc:
            await self._forget_unless_uncertain(name, exc)
            raise
        return await self._done(name, result)

    async def _settle(self, name: str, call: asyncio.Future[Any]) -> None:
        exc = call.exception()
        if exc is None:
            with contextlib.suppress(PermanentError):  # not JSON: it stays started (uncertain)
                await self._done(name, call.result())
        else:
            await self._forget_unless_uncertain(name, exc)

    async def _forget_unless_uncertain(self, name: str, exc: BaseException) -> None:
        if _outcome_unknown(exc):
            # The side effect may have happened: the started record stays, so the next
            # attempt asks if_uncertain (or dead-letters) rather than doing it again.
            return
        # fn saw its own failure: nothing is stored, and a retry calls it again.
        await self._redis.hdel(self._key, f"step:{name}")  # type: ignore[misc]


def _outcome_unknown(exc: BaseException) -> bool:
    """Whether ``exc`` is, or came out of, a command whose outcome is unknown.

    "Came out of": raised from it or while handling it (``__cause__``, ``__context__``), or
    grouped with it (an ``ExceptionGroup`` from a ``TaskGroup``). Erring towards uncertain
    costs a look with ``if_uncertain``; erring the other way sends a command twice.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, CommandOutcomeUnknownError):
            return True
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False
