"""Sources turn the Integration API into transition events.

A source runs *cycles*: each reads from its cursor onwards, hands events to
``emit`` page by page (``emit`` returns once they are safely enqueued), and
returns a :class:`CycleReport`. The poller moves the cursor only with what a
completed cycle reports, through a lease-guarded write, so a cycle that fails half
way leaves the cursor where it was and the next one reads the same ground again
(the queue drops what it already has).

- :mod:`worker.poll.sources.transactions` — ``transactions/query`` with a watermark on
  ``lastTransitionedAt`` (the default).
- :mod:`worker.poll.sources.events` — ``events/query`` with a cursor on ``sequenceId``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from worker.events import SourceName, TransitionEvent

__all__ = ["CycleReport", "Emit", "Source"]

#: Callback taking one page's events; returns, once they are enqueued, how many were new.
Emit = Callable[[Sequence[TransitionEvent]], Awaitable[int]]


@dataclass(frozen=True)
class CycleReport:
    """What one cycle did and where the cursor may move."""

    #: new cursor value (watermark in ms, or sequence id); None leaves it unchanged.
    cursor: int | None
    #: events enqueued for the first time.
    events: int
    pages: int
    #: True when the source knows more is waiting (a full last page): poll again at once.
    more: bool = False
    #: the start floor this cycle fixed, to be kept beside the cursor (first cycle only).
    floor: int | None = None


class Source(Protocol):
    name: SourceName

    async def cycle(self, cursor: int | None, emit: Emit, *, floor: int | None = None) -> CycleReport:
        """Read from ``cursor`` (None: the configured start) and emit what is new.

        ``floor`` is what an earlier cycle reported in :attr:`CycleReport.floor`.
        """
        ...
