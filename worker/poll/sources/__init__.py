"""Sources turn the Integration API into transition events.

A source runs *cycles*. Each starts from the :class:`~worker.poll.cursor.SourceState`
the poller loaded and talks to the poller only through a :class:`Sink`: it hands
events to :meth:`Sink.emit` page by page (which returns once they are safely
enqueued), records items it cannot turn into events with :meth:`Sink.skip`, and
checkpoints how far it got with :meth:`Sink.save` after each page's events are
queued. Saves are guarded by the lease and the cursor's generation, so progress is
durable: a cycle cut short (a deadline, SIGKILL, a lost lease, the API or Redis
failing past the retries) keeps everything up to its last checkpoint, and the next
cycle resumes from there. What was queued after the last checkpoint is offered again
and the queue drops it.

A save is also the one place a cycle may stop early: when the run must end (its
``--max-duration`` passed, or the service is shutting down), :meth:`Sink.save` raises
:class:`CycleStopped` right after writing.

- :mod:`worker.poll.sources.transactions` — ``transactions/query`` with a watermark on
  ``lastTransitionedAt`` (the default).
- :mod:`worker.poll.sources.events` — ``events/query`` with a cursor on ``sequenceId``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from pydantic import ValidationError

from worker.api.models import Page
from worker.events import SourceName, TransitionEvent, to_ms
from worker.poll.cursor import SourceState

__all__ = [
    "HANDOFF_MARGIN",
    "KEEP",
    "CycleProgress",
    "CycleReport",
    "CycleStopped",
    "Keep",
    "Sink",
    "Source",
    "api_time_ms",
    "skip_reason",
]

#: A source starting from where the *other* source left off (a switch) starts this much earlier:
#: the two sources give the same keys, so the overlap costs seen-record look-ups, not duplicates.
HANDOFF_MARGIN = timedelta(minutes=5)


class Keep(enum.Enum):
    """Marks a saved field to be left as it is."""

    KEEP = "keep"


KEEP = Keep.KEEP


class CycleStopped(Exception):
    """Raised by :meth:`Sink.save` after writing, when the run must stop at this safe point."""


@dataclass(frozen=True)
class CycleReport:
    """What one cycle did."""

    #: the cursor the cycle left (watermark in ms, or sequence id); None if it never had one.
    cursor: int | None
    #: events enqueued for the first time.
    events: int
    pages: int
    #: True when the source knows more is waiting (a full last page): poll again at once.
    more: bool = False
    #: False when the cycle stopped at a checkpoint before its end; the next one resumes.
    complete: bool = True
    #: an estimate of the transactions still to read (from ``totalItems``), when known.
    left: int | None = None


@dataclass(frozen=True)
class CycleProgress:
    """How far a cycle is, for a progress bar or a log line."""

    pages: int
    events: int
    #: transactions still to read, at most (from ``totalItems``); None when unknown.
    left: int | None = None
    #: what is being walked now, e.g. a ``createdAt`` window, for humans.
    part: str | None = None
    #: True when this ends a part (a window): a line worth logging off a TTY.
    part_done: bool = False


class Sink(Protocol):
    """The poller's side of one cycle."""

    async def emit(self, events: Sequence[TransitionEvent]) -> int:
        """Enqueue one page's events; return, once they are queued, how many were new."""
        ...

    async def skip(self, resource_type: str, resource_id: str, reason: str) -> None:
        """Record an item that cannot be turned into an event (it is skipped, never a stall)."""
        ...

    async def save(
        self,
        *,
        cursor: int | None = None,
        floor: int | None = None,
        previous: int | None = None,
        at: int | None = None,
        resume: dict[str, Any] | Keep | None = KEEP,
    ) -> None:
        """Checkpoint: None leaves a value as it is, except ``resume=None``, which clears it.

        Raises :class:`~worker.errors.LeaseLostError` or
        :class:`~worker.errors.CursorChangedError` (nothing written), or
        :class:`CycleStopped` (written) when the run must stop here — except after a
        save with ``resume=None``, which ends the cycle.
        """
        ...

    def progress(self, progress: CycleProgress) -> None:
        """Tell whoever watches how far the cycle is."""
        ...


class Source(Protocol):
    name: SourceName

    async def cycle(self, state: SourceState, sink: Sink) -> CycleReport:
        """Read from where ``state`` says and emit what is new, checkpointing through ``sink``."""
        ...


def skip_reason(exc: Exception) -> str:
    """Why an item was skipped, in one line without its values (they may be personal data)."""
    if isinstance(exc, ValidationError):
        fields = sorted({".".join(str(part) for part in error["loc"]) for error in exc.errors()})
        return f"invalid fields: {', '.join(fields)}"[:300]
    return " ".join(str(exc).split())[:300]


def api_time_ms(page: Page[Any]) -> int | None:
    """The API's own clock from an answer's ``Date`` header, in ms; None when it sent none."""
    return None if page.served_at is None else to_ms(page.served_at)
