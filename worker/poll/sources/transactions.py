"""The transactions source: ``transactions/query`` newest first, from a watermark.

Each cycle pages ``transactions/query?sort=lastTransitionedAt`` (newest first) and
stops after the first page whose last transaction is not newer than
``threshold = watermark - lookback``. For every transaction read that is newer than
the threshold, each transition in its history newer than the *emission floor*
becomes an event, so several transitions between two cycles are several events,
in order. The next watermark is the ``lastTransitionedAt`` at the head of the
cycle's first page: the newest that existed when the cycle began. The queue's seen
records drop the transitions an earlier cycle already queued.

Why no transition can be missed:

* ``lastTransitionedAt`` only grows. A transaction that transitions while we page
  leaves its place and jumps to the head of the order, into pages already read;
  everything between the head and its old place moves one step back. So the
  unread remainder only ever shifts *back*: we may read an item twice, never step
  over one that stays put. New transactions also enter at the head.
* The one we step over is the transaction that moved: cycle N does not read it, so
  its older transitions newer than cycle N's threshold are not emitted by N. It
  moved after the cycle's first page was read, so its new ``lastTransitionedAt`` is
  not older than the head of that page, which is the next watermark; the next
  cycle therefore reads it (it can dodge again only by transitioning again, and
  only for as long as it keeps doing so). The watermark must not be the newest time
  the cycle *saw*: a ``createdAt`` window walked late in the cycle can show a
  transaction that moved after the one we stepped over.
  When that cycle reads it, the older transitions may lie *behind* that cycle's
  threshold; that is why emission does not stop at the threshold but goes back to
  the emission floor, ``max(start floor, threshold - HISTORY_WINDOW)``, an hour
  behind. Everything queued within the window still has its seen record (the
  retention is days), so going back costs Redis look-ups, not duplicates.
* Ties: many transitions may share a millisecond. The comparison is strict against
  ``watermark - lookback`` with ``lookback > 0``, so the watermark's own millisecond
  is always read again.
* Late visibility: a transition that becomes visible after a later one (the reason
  for the lookback) is found as long as it shows up within ``lookback``.
* The start floor (``--since`` minus the lookback, fixed by the first cycle and
  stored beside the cursor) keeps transitions from before the start out for good.
* Depth: paging reaches only ``page_cap`` items. When a walk hits the cap before
  the threshold, the cycle walks ``createdAt`` windows, each holding at most
  ``page_cap`` transactions (found by halving); every transaction lies in exactly
  one window because ``createdAt`` never changes, and the newest window is open
  ended so transactions created during the walk are covered too.

Memory stays flat: one page of transactions and the cycle's event keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol, Unpack

from worker.api.client import TransactionFilters
from worker.api.models import Page, Transaction
from worker.errors import FlexworkerError
from worker.events import SourceName, TransitionEvent, events_from_transaction, from_ms, to_ms
from worker.poll.sources import CycleReport, Emit

__all__ = ["TransactionPages", "TransactionsSource"]

ONE_MS = timedelta(milliseconds=1)
#: How far behind the threshold a transaction's history is emitted (see the module docstring).
HISTORY_WINDOW = timedelta(hours=1)


class TransactionPages(Protocol):
    """The part of :class:`~worker.api.client.IntegrationClient` this source uses."""

    async def transactions_query(
        self,
        *,
        page: int | None = None,
        per_page: int | None = None,
        **filters: Unpack[TransactionFilters],
    ) -> Page[Transaction]: ...


class _Walk:
    """State of one cycle: threshold, emission floor, keys already emitted, newest time seen."""

    def __init__(
        self, threshold: datetime, floor: datetime, watermark_ms: int, emit: Emit, detected_at: datetime
    ) -> None:
        self.threshold = threshold
        self.floor = floor
        #: the next watermark: the newest ``lastTransitionedAt`` at the head of the
        #: cycle's first page (see the module docstring), or the old one if empty.
        self.head_ms: int | None = None
        self.watermark_ms = watermark_ms
        self.emit = emit
        self.detected_at = detected_at
        self.keys: set[str] = set()
        self.events = 0
        self.pages = 0

    async def take(self, transactions: Sequence[Transaction]) -> None:
        self.pages += 1
        if self.head_ms is None:
            self.head_ms = max(
                (to_ms(tx.attributes.last_transitioned_at) for tx in transactions), default=self.watermark_ms
            )
        batch: list[TransitionEvent] = []
        for tx in transactions:
            if tx.attributes.last_transitioned_at <= self.threshold:
                continue
            for event in events_from_transaction(
                tx, newer_than=self.floor, source="transactions", detected_at=self.detected_at
            ):
                if event.key not in self.keys:
                    self.keys.add(event.key)
                    batch.append(event)
        if batch:
            self.events += await self.emit(batch)


class TransactionsSource:
    """Watermark-based polling of ``transactions/query``."""

    name: SourceName = "transactions"

    def __init__(
        self,
        api: TransactionPages,
        *,
        lookback_s: float,
        start_at: datetime | None = None,
        include: Sequence[str] = (),
        per_page: int = 100,
        page_cap: int = 10_000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if lookback_s <= 0:
            raise ValueError("lookback_s must be > 0: the watermark's millisecond must be read again")
        self._api = api
        self._lookback = timedelta(seconds=lookback_s)
        self._start_at = start_at
        self._include = list(include)
        self._per_page = per_page
        self._page_cap = page_cap
        self._clock = clock

    async def cycle(self, cursor: int | None, emit: Emit, *, floor: int | None = None) -> CycleReport:
        now = self._clock()
        watermark_ms = cursor if cursor is not None else to_ms(self._start_at or now)
        threshold = from_ms(watermark_ms) - self._lookback
        start_floor = from_ms(floor) if floor is not None else threshold
        walk = _Walk(threshold, max(start_floor, threshold - HISTORY_WINDOW), watermark_ms, emit, now)
        if not await self._walk(walk, {}):
            await self._walk_windows(walk)
        return CycleReport(
            cursor=max(walk.watermark_ms, walk.head_ms or walk.watermark_ms),
            events=walk.events,
            pages=walk.pages,
            floor=to_ms(start_floor) if floor is None else None,
        )

    async def _walk(self, walk: _Walk, window: TransactionFilters) -> bool:
        """Page newest first until the threshold; False if the page cap came first."""
        page = 1
        while (page - 1) * self._per_page < self._page_cap:
            query: TransactionFilters = {**window, "sort": ["lastTransitionedAt"], "include": self._include}
            result = await self._api.transactions_query(page=page, per_page=self._per_page, **query)
            await walk.take(result.data)
            if len(result.data) < self._per_page:
                # Short because the results ended, or because the page cap cut them
                # (totalItems, from the same answer, then counts more than we reached).
                reached = (page - 1) * self._per_page + len(result.data)
                total = result.meta.total_items
                return total is None or reached >= total
            if result.data[-1].attributes.last_transitioned_at <= walk.threshold:
                return True
            page += 1
        return False

    async def _walk_windows(self, walk: _Walk) -> None:
        """Walk ``createdAt`` windows of at most ``page_cap`` transactions each.

        Windows are ``[start, end)``, the newest open ended (``end`` None). A window
        is halved until its count fits; the open one can still outgrow the cap while
        we walk it (transactions keep being created), and is then halved again.
        """
        oldest = await self._api.transactions_query(page=1, per_page=1, sort=["-createdAt"])
        if not oldest.data:
            return
        pending: list[tuple[datetime, datetime | None]] = [(oldest.data[0].attributes.created_at, None)]
        while pending:
            start, end = pending.pop()
            window: TransactionFilters = {"created_at_start": start}
            if end is not None:
                window["created_at_end"] = end
            if await self._count(window) <= self._page_cap and await self._walk(walk, window):
                continue
            upper = end or self._clock() + ONE_MS
            if upper - start <= ONE_MS:
                raise FlexworkerError(f"more than {self._page_cap} transactions created at {start}")
            middle = from_ms((to_ms(start) + to_ms(upper)) // 2)
            pending += [(start, middle), (middle, end)]

    async def _count(self, window: TransactionFilters) -> int:
        result = await self._api.transactions_query(page=1, per_page=1, **window)
        return result.meta.total_items if result.meta.total_items is not None else len(result.data)
