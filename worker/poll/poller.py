"""The poller: runs a source's cycles under the lease and moves the cursor.

One cycle: read the cursor, let the source emit every new event page by page into
the queue, then move the cursor to what the cycle reports with a lease-guarded
write. Any failure before that write leaves the cursor where it was.

Pacing: after a cycle that reports more waiting, the next starts at once (the
client's rate limiter keeps it within the API's limits); otherwise the poller
waits the idle interval, so an idle marketplace costs one request per interval.

Only the holder of the lease polls. Other replicas wait in standby and take over
when the holder releases it on shutdown or stops renewing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import redis
import structlog

from worker.api.backoff import Backoff
from worker.errors import FlexworkerError, StoreError
from worker.events import TransitionEvent
from worker.poll.cursor import CursorStore
from worker.poll.lease import Lease
from worker.poll.sources import CycleReport, Source
from worker.queue.enqueue import EventQueue

__all__ = ["LeaseHeldError", "LeaseLostError", "PollStats", "Poller"]

log = structlog.get_logger(__name__)


class LeaseHeldError(FlexworkerError):
    """Another poller holds the lease of this namespace."""


class LeaseLostError(FlexworkerError):
    """The lease was lost mid-cycle; the cycle's cursor was not written."""


@dataclass
class PollStats:
    cycles: int = 0
    failed_cycles: int = 0
    events_enqueued: int = 0
    last_report: CycleReport | None = None


class Poller:
    """Drive one source into the queue."""

    def __init__(
        self,
        source: Source,
        queue: EventQueue,
        cursors: CursorStore,
        lease: Lease,
        *,
        idle_interval_s: float,
        error_backoff_cap_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self._queue = queue
        self._cursors = cursors
        self._lease = lease
        self._idle_interval_s = idle_interval_s
        # Failed cycles back off from the idle interval up to the cap, with full jitter.
        self._error_backoff = Backoff(
            base_s=idle_interval_s, cap_s=max(idle_interval_s, error_backoff_cap_s), max_attempts=1
        )
        self._rng = rng or random.Random()
        self._failures_in_a_row = 0
        self.stats = PollStats()

    async def _emit(self, events: Sequence[TransitionEvent]) -> int:
        created = await self._queue.enqueue(events)
        self.stats.events_enqueued += created
        return created

    async def cycle(self) -> CycleReport:
        """One complete cycle; the caller must hold the lease."""
        try:
            return await self._cycle()
        except redis.RedisError as exc:
            raise StoreError(f"Redis failed during the cycle: {exc}") from exc

    async def _acquire(self) -> bool:
        try:
            return await self._lease.acquire()
        except redis.RedisError as exc:
            raise StoreError(f"Redis failed taking the lease: {exc}") from exc

    async def _cycle(self) -> CycleReport:
        token = self._lease.token
        if token is None:
            raise LeaseLostError("poller lease is not held")
        cursor = await self._cursors.get(self.source.name)
        floor = await self._cursors.get_floor(self.source.name)
        report = await self.source.cycle(cursor, self._emit, floor=floor)
        new_floor = report.floor if floor is None else None
        if (report.cursor is not None and report.cursor != cursor) or new_floor is not None:
            moved = await self._cursors.set_guarded(
                self.source.name,
                report.cursor if report.cursor is not None else cursor,
                lease_key=self._lease.key,
                token=token,
                floor=new_floor,
            )
            if not moved:
                raise LeaseLostError("poller lease lost during the cycle; cursor left unchanged")
        self.stats.cycles += 1
        self.stats.last_report = report
        log.info(
            "cycle done",
            source=self.source.name,
            events=report.events,
            pages=report.pages,
            cursor=report.cursor,
            more=report.more,
        )
        return report

    async def run_once(self) -> CycleReport:
        """Take the lease, run one cycle, give the lease back (``poll --once``)."""
        if not await self._acquire():
            raise LeaseHeldError(f"another poller holds the lease {self._lease.key}")
        try:
            return await self.cycle()
        finally:
            await self._lease.release()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; standby while another replica holds the lease."""
        renewer: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                if self._lease.token is None:
                    try:
                        acquired = await self._acquire()
                    except StoreError as exc:
                        log.warning("cannot reach Redis for the lease", error=str(exc))
                        acquired = False
                    if not acquired:
                        await self._wait(stop, self._lease.ttl_ms / 3000)
                        continue
                    log.info("poller lease taken", key=self._lease.key, token=self._lease.token)
                    renewer = asyncio.create_task(self._renew_until_lost(stop))
                delay_s = self._idle_interval_s
                try:
                    report = await self.cycle()
                    self._failures_in_a_row = 0
                    if report.more:
                        delay_s = 0.0
                except FlexworkerError as exc:
                    self.stats.failed_cycles += 1
                    log.warning("cycle failed; cursor unchanged", source=self.source.name, error=str(exc))
                    delay_s = self._idle_interval_s + self._error_backoff.delay_s(
                        self._failures_in_a_row, self._rng
                    )
                    self._failures_in_a_row += 1
                await self._wait(stop, delay_s)
        finally:
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            with contextlib.suppress(redis.RedisError):  # the lease then simply expires
                await self._lease.release()

    async def _renew_until_lost(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._wait(stop, self._lease.ttl_ms / 3000)
            if stop.is_set():
                return
            try:
                renewed = await self._lease.renew()
            except redis.RedisError as exc:
                # Keep trying: the lease is ours until its TTL runs out.
                log.warning("cannot renew the poller lease", error=str(exc))
                continue
            if not renewed:
                log.warning("poller lease lost", key=self._lease.key)
                return

    async def _wait(self, stop: asyncio.Event, delay_s: float) -> None:
        if delay_s <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay_s)
