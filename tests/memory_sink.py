"""A source's :class:`~worker.poll.sources.Sink` in memory: the poller's side without Redis.

It keeps the source's state across cycles the way the cursor store does, drops event
keys it has seen the way the queue does, and can be told to fail a chosen save (a
crash before the checkpoint lands) or to stop after one (a deadline).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from worker.events import TransitionEvent
from worker.poll.cursor import SourceState
from worker.poll.sources import KEEP, CycleProgress, CycleStopped, Keep


class Crash(Exception):
    """The process died before this save reached Redis."""


class MemorySink:
    def __init__(self, state: SourceState | None = None) -> None:
        self.state = state or SourceState()
        self.seen: set[str] = set()
        self.delivered: list[str] = []
        self.skipped: list[tuple[str, str, str]] = []
        self.progress_reports: list[CycleProgress] = []
        self.saves = 0
        #: fail the save with this number (1 = the next one) as if the process died first.
        self.crash_at_save: int | None = None
        #: stop the cycle after the save with this number.
        self.stop_at_save: int | None = None

    async def emit(self, events: Sequence[TransitionEvent]) -> int:
        fresh = [event.key for event in events if event.key not in self.seen]
        self.seen.update(fresh)
        self.delivered.extend(fresh)
        return len(fresh)

    async def skip(self, resource_type: str, resource_id: str, reason: str) -> None:
        self.skipped.append((resource_type, resource_id, reason))

    async def save(
        self,
        *,
        cursor: int | None = None,
        floor: int | None = None,
        previous: int | None = None,
        at: int | None = None,
        resume: dict[str, Any] | Keep | None = KEEP,
    ) -> None:
        self.saves += 1
        if self.crash_at_save is not None and self.saves >= self.crash_at_save:
            self.crash_at_save = None
            raise Crash
        changes: dict[str, Any] = {
            name: value
            for name, value in (("cursor", cursor), ("floor", floor), ("previous", previous), ("at", at))
            if value is not None
        }
        if resume is not KEEP:
            changes["resume"] = resume
        self.state = dataclasses.replace(self.state, **changes)
        if self.stop_at_save is not None and self.saves >= self.stop_at_save:
            self.stop_at_save = None
            raise CycleStopped

    def progress(self, progress: CycleProgress) -> None:
        self.progress_reports.append(progress)
