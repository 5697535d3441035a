"""The poller: runs a source's cycles under the lease, checkpoint by checkpoint.

One cycle: load the source's state, let the source emit every new event page by
page into the queue and checkpoint after each page (see :mod:`worker.poll.sources`).
Every write of progress is guarded by the lease's fencing token and the cursor's
generation, so a poller that lost its lease, or whose cursor an operator rewound,
writes nothing more; a cycle that fails half way keeps what it checkpointed, and
the next one resumes there.

The lease is renewed for as long as a cycle runs, in the long-running loop and in
``poll --once`` alike, however long a catch-up takes. A run may be told to stop
(``--max-duration``, SIGTERM): the cycle then ends at its next checkpoint, with
nothing lost and nothing to redo.

Pacing: after a cycle that reports more waiting, the next starts at once (the
client's rate limiter keeps it within the API's limits); otherwise the poller
waits the idle interval, so an idle marketplace costs one request per interval.

Only the holder of the lease polls. Other replicas wait in standby and take over
when the holder releases it on shutdown or stops renewing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from worker.api.backoff import Backoff
from worker.errors import CursorChangedError, FlexworkerError, LeaseHeldError, LeaseLostError, StoreError
from worker.events import TransitionEvent
from worker.poll.cursor import CursorStore, SourceState
from worker.poll.lease import Lease
from worker.poll.skipped import SkippedItems
from worker.poll.sources import KEEP, CycleProgress, CycleReport, CycleStopped, Keep, Source
from worker.queue.enqueue import EventQueue

__all__ = ["LeaseHeldError", "LeaseLostError", "PollStats", "Poller", "ProgressWatcher"]

log = structlog.get_logger(__name__)

#: Called with each progress report of a cycle (the CLI's progress bar).
ProgressWatcher = Callable[[CycleProgress], None]


@dataclass
class PollStats:
    cycles: int = 0
    failed_cycles: int = 0
    events_enqueued: int = 0
    last_report: CycleReport | None = None


class _Sink:
    """One cycle's :class:`~worker.poll.sources.Sink`: the queue, the guarded store, the stop rule."""

    def __init__(
        self,
        poller: Poller,
        state: SourceState,
        token: int,
        should_stop: Callable[[], bool],
        watcher: ProgressWatcher | None,
    ) -> None:
        self._poller = poller
        self._generation = state.generation
        self._token = token
        self._should_stop = should_stop
        self._watcher = watcher
        self.cursor = state.cursor
        self.events = 0
        self.checkpoints = 0
        #: the source's last word on how far it is (pages read, transactions left).
        self.last_progress: CycleProgress | None = None

    async def emit(self, events: Sequence[TransitionEvent]) -> int:
        created = await self._poller._queue.enqueue(events)
        self.events += created
        self._poller.stats.events_enqueued += created
        return created

    async def skip(self, resource_type: str, resource_id: str, reason: str) -> None:
        await self._poller._skipped.record(self._poller.source.name, resource_type, resource_id, reason)

    async def save(
        self,
        *,
        cursor: int | None = None,
        floor: int | None = None,
        previous: int | None = None,
        at: int | None = None,
        resume: dict[str, Any] | Keep | None = KEEP,
    ) -> None:
        fields: dict[str, str | None] = {}
        if previous is not None:
            fields["previous"] = str(previous)
        if at is not None:
            fields["at"] = str(at)
        if resume is not KEEP:
            fields["resume"] = None if resume is None else _dumps(resume)
        await self._poller._cursors.save(
            self._poller.source.name,
            lease_key=self._poller._lease.key,
            token=self._token,
            generation=self._generation,
            cursor=cursor,
            floor=floor,
            fields=fields,
        )
        if cursor is not None:
            self.cursor = cursor
        self.checkpoints += 1
        # A save that clears the resume record ends the cycle: nothing is left to stop.
        if resume is not None and self._should_stop():
            raise CycleStopped

    def progress(self, progress: CycleProgress) -> None:
        self.last_progress = progress
        if self._watcher is not None:
            self._watcher(progress)
        elif progress.part_done:
            log.info(
                "cycle progress",
                source=self._poller.source.name,
                part=progress.part,
                pages=progress.pages,
                events=progress.events,
                left=progress.left,
            )


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


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
        skipped: SkippedItems,
        error_backoff_cap_s: float = 60.0,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._queue = queue
        self._cursors = cursors
        self._lease = lease
        self._skipped = skipped
        self._idle_interval_s = idle_interval_s
        # Failed cycles back off from the idle interval up to the cap, with full jitter.
        self._error_backoff = Backoff(
            base_s=idle_interval_s, cap_s=max(idle_interval_s, error_backoff_cap_s), max_attempts=1
        )
        self._rng = rng or random.Random()
        self._monotonic = monotonic
        self._failures_in_a_row = 0
        self.stats = PollStats()

    async def cycle(
        self, *, should_stop: Callable[[], bool] = lambda: False, watcher: ProgressWatcher | None = None
    ) -> CycleReport:
        """One cycle, to its end or to the first checkpoint where ``should_stop()``; hold the lease."""
        try:
            return await self._cycle(should_stop, watcher)
        except redis.RedisError as exc:
            raise StoreError(f"Redis failed during the cycle: {exc}") from exc

    async def _acquire(self) -> bool:
        try:
            return await self._lease.acquire()
        except redis.RedisError as exc:
            raise StoreError(f"Redis failed taking the lease: {exc}") from exc

    async def _cycle(self, should_stop: Callable[[], bool], watcher: ProgressWatcher | None) -> CycleReport:
        token = self._lease.token
        if token is None:
            raise LeaseLostError("poller lease is not held")
        state = await self._cursors.load(self.source.name)
        sink = _Sink(self, state, token, should_stop, watcher)
        try:
            report = await self.source.cycle(state, sink)
        except CycleStopped:
            last = sink.last_progress
            report = CycleReport(
                cursor=sink.cursor,
                events=sink.events,
                # The events source reports no progress; it saves once a page.
                pages=last.pages if last is not None else sink.checkpoints,
                more=True,
                complete=False,
                left=last.left if last is not None else None,
            )
        self.stats.cycles += 1
        self.stats.last_report = report
        log.info(
            "cycle done" if report.complete else "cycle stopped at a checkpoint; the next run resumes",
            source=self.source.name,
            events=report.events,
            pages=report.pages,
            cursor=report.cursor,
            more=report.more,
        )
        return report

    async def run_once(
        self,
        *,
        max_duration_s: float | None = None,
        stop: asyncio.Event | None = None,
        watcher: ProgressWatcher | None = None,
    ) -> CycleReport:
        """Take the lease, run one cycle while renewing it, give it back (``poll --once``).

        A lease still held is waited for up to one and a half lease lifetimes (the holder
        may be a run that was killed and whose lease is running out) before
        :class:`LeaseHeldError`. With
        ``max_duration_s`` or ``stop`` the cycle may end at a checkpoint before its end
        (``report.complete`` is then False; the next run resumes).
        """
        deadline_s = self._monotonic() + 1.5 * self._lease.ttl_ms / 1000
        while not await self._acquire():
            if self._monotonic() >= deadline_s or (stop is not None and stop.is_set()):
                raise LeaseHeldError(f"another poller holds the lease {self._lease.key}")
            await asyncio.sleep(min(0.5, self._lease.ttl_ms / 10_000))
        started_s = self._monotonic()

        def should_stop() -> bool:
            over = max_duration_s is not None and self._monotonic() - started_s >= max_duration_s
            return over or (stop is not None and stop.is_set())

        renewing = asyncio.Event()
        renewer = asyncio.create_task(self._renew_until_lost(renewing))
        try:
            return await self.cycle(should_stop=should_stop, watcher=watcher)
        finally:
            renewing.set()
            await _finish(renewer)
            with contextlib.suppress(redis.RedisError):  # the lease then simply expires
                await self._lease.release()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; standby while another replica holds the lease."""
        renewer: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                if self._lease.token is None:
                    if renewer is not None:
                        await _finish(renewer)
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
                    report = await self.cycle(should_stop=stop.is_set)
                    self._failures_in_a_row = 0
                    if report.more:
                        delay_s = 0.0
                except CursorChangedError as exc:
                    # An operator's rewind wins: start over from it at once.
                    log.warning("cycle gave way to an operator", source=self.source.name, error=str(exc))
                    delay_s = 0.0
                except FlexworkerError as exc:
                    self.stats.failed_cycles += 1
                    log.warning(
                        "cycle failed; progress kept up to its last checkpoint",
                        source=self.source.name,
                        error=str(exc),
                    )
                    delay_s = self._idle_interval_s + self._error_backoff.delay_s(
                        self._failures_in_a_row, self._rng
                    )
                    self._failures_in_a_row += 1
                await self._wait(stop, delay_s)
        finally:
            if renewer is not None:
                renewer.cancel()
                await _finish(renewer)
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


async def _finish(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
