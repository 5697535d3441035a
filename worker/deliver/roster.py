"""The roster: which handlers the workers of a namespace run.

Replicas may run different handler lists for a while (a rolling deploy adds
``crm`` to one replica before the next). An event job delivers inline to the
handlers its own worker runs, and queues a handler job for every handler another
worker has run lately (within :data:`ORPHAN_GRACE_S`) whose transition and process
patterns match (its predicate, if any, is asked by a worker that runs it). A worker
that takes a handler job for a handler it does not run hands it back untouched: no
attempt, no record, a short park (:data:`HANDBACK_S`, growing and jittered), after
which it leaves the job to the others for a moment (:data:`HANDBACK_LEAVE_S`). So
during a deploy, or while the only replica running a handler restarts, no delivery
is lost and none burns its attempts on the wrong replica.

Each worker writes its handlers to ``P:handlers`` (name -> JSON with the patterns and
``at_ms``, on Redis's clock) when it starts and every :data:`HEARTBEAT_S` after. What
that means for the lists an operator changes:

- **Enabling** a handler: it receives the events whose jobs run after the first
  worker running it has started (on a worker without it, from at most
  :data:`REFRESH_S` later); earlier events were never queued for it (a backfill's job).
- **Disabling** it on every worker: for :data:`ORPHAN_GRACE_S` after the last worker
  running it stopped, events are still queued for it and wait (a restart or a slow
  deploy brings it back in time). After that no new event is queued for it, and the
  deliveries waiting for it are dead-lettered with reason ``internal`` ("no live
  worker runs handler ..."), by a worker that has itself been up for at least
  :data:`SETTLE_S` (so a fleet starting after an outage sees its own roster first):
  the queue drains and nothing is dropped silently; ``flexworker dlq replay`` once it
  runs again, or ``purge``. A worker that cannot run a handler never spends its retries.
- A whole fleet down for longer than :data:`ORPHAN_GRACE_S` and brought back in
  mixed lists (itself a second fault during a deploy) forgets handlers until a worker
  running them is up again.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from arq.connections import ArqRedis

from worker.queue.keys import Keys
from worker.registry import LoadedHandler

__all__ = [
    "HANDBACK_LEAVE_S",
    "HANDBACK_MAX_S",
    "HANDBACK_S",
    "HEARTBEAT_S",
    "ORPHAN_GRACE_S",
    "SETTLE_S",
    "Registration",
    "Roster",
]

#: How often a worker renews its roster entries.
HEARTBEAT_S = 30.0
#: An entry not renewed for this long (three missed heartbeats): no worker runs it now.
LIVE_S = 90.0
#: A handler no worker has run for this long is no longer queued for, and its waiting
#: deliveries are dead-lettered.
ORPHAN_GRACE_S = 600.0
#: A worker judges a handler gone only after it has been up this long (two heartbeats).
SETTLE_S = 2 * HEARTBEAT_S
#: How often the roster is read again by an event job's worker.
REFRESH_S = 5.0
#: Park of a handed-back handler job: doubled at each hand-back of the same job up to
#: :data:`HANDBACK_MAX_S`, jittered by ±50%.
HANDBACK_S = 0.2
HANDBACK_MAX_S = 5.0
#: For this long after a handed-back job comes due, the worker that handed it back does not
#: take it again: the first worker to poll takes a due job, so the others get their turn.
HANDBACK_LEAVE_S = 1.0


@dataclass(frozen=True)
class Registration:
    """One handler as the roster knows it."""

    name: str
    transitions: tuple[str, ...]
    processes: tuple[str, ...]
    at_ms: int

    def matches_names(self, transition: str, process_name: str) -> bool:
        return any(fnmatch.fnmatchcase(transition, p) for p in self.transitions) and any(
            fnmatch.fnmatchcase(process_name, p) for p in self.processes
        )


class Roster:
    """This worker's view of the namespace's handlers.

    Entry times are on Redis's clock (so hosts whose clocks disagree agree) unless a
    test pins ``clock`` (Unix seconds).
    """

    def __init__(
        self,
        redis: ArqRedis,
        keys: Keys,
        local: Mapping[str, LoadedHandler],
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._local = local
        self._clock = clock
        self._remote: list[Registration] = []
        self._live: set[str] = set(local)
        self._seen_ms: dict[str, int] = {}
        self._read_at_s = -float("inf")  # monotonic
        self._read_now_s = 0.0  # the roster's clock at that read
        self._started_s = time.monotonic()

    async def _now_s(self) -> float:
        if self._clock is not None:
            return self._clock()
        seconds, micros = await self._redis.time()
        return float(seconds) + float(micros) / 1e6

    async def announce(self) -> None:
        """Write (renew) this worker's entries."""
        if not self._local:
            return
        at_ms = int(await self._now_s() * 1000)
        entries = {
            name: json.dumps(
                {
                    "transitions": list(h.spec.subscription.transitions),
                    "processes": list(h.spec.subscription.processes),
                    "at_ms": at_ms,
                },
                separators=(",", ":"),
            )
            for name, h in self._local.items()
        }
        await self._redis.hset(self._keys.handlers, mapping=entries)  # type: ignore[misc]

    async def refresh(self, *, force: bool = False) -> None:
        """Read the roster again when the last read is older than :data:`REFRESH_S`."""
        if not force and time.monotonic() - self._read_at_s < REFRESH_S:
            return
        now_s = await self._now_s()
        raw: dict[bytes, bytes] = await self._redis.hgetall(self._keys.handlers)  # type: ignore[misc]
        remote, live, seen_ms = [], set(self._local), {}
        for name_b, value in raw.items():
            name = name_b.decode()
            try:
                data = json.loads(value)
                registration = Registration(
                    name, tuple(data["transitions"]), tuple(data["processes"]), int(data["at_ms"])
                )
            except (ValueError, KeyError, TypeError):
                continue  # not ours to judge; a worker running it rewrites it
            seen_ms[name] = registration.at_ms
            age_s = now_s - registration.at_ms / 1000
            if age_s <= LIVE_S:
                live.add(name)
            if age_s <= ORPHAN_GRACE_S and name not in self._local:
                remote.append(registration)
        self._remote, self._live, self._seen_ms = remote, live, seen_ms
        self._read_at_s, self._read_now_s = time.monotonic(), now_s

    def remote_targets(self, transition: str, process_name: str) -> list[str]:
        """Handlers only other workers run (or ran lately) whose patterns match the event."""
        return [r.name for r in self._remote if r.matches_names(transition, process_name)]

    def is_live(self, name: str) -> bool:
        """Whether some live worker (this one included) runs ``name``."""
        return name in self._live

    def absent_s(self, name: str) -> float:
        """How long no live worker has run ``name`` (0 while one does; infinite if none ever did)."""
        if self.is_live(name):
            return 0.0
        seen_ms = self._seen_ms.get(name)
        if seen_ms is None:
            return float("inf")
        now_s = self._read_now_s + (time.monotonic() - self._read_at_s)
        return max(0.0, now_s - seen_ms / 1000)

    @property
    def settled(self) -> bool:
        """Whether this worker has been up long enough to judge a handler gone."""
        return time.monotonic() - self._started_s >= SETTLE_S

    @property
    def all_names(self) -> Sequence[str]:
        """Every handler's name (local first, then those run lately): the pending sets to wake."""
        return [*self._local, *(r.name for r in self._remote)]
