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
  everything between the head and its old place moves one step back, and so does
  everything when a new transaction enters at the head. Moves and arrivals only ever
  shift the unread remainder *back*: we may read an item twice, never step over one
  that stays put.
* Items also *leave* the results (a deleted transaction), and that shifts everything
  below them *forward*, past a page boundary we already crossed. Each page's answer
  carries ``totalItems``: between two reads an item can move forward by at most the
  number that left minus the number that arrived, so by at most how much
  ``totalItems`` fell. The walk keeps a *frontier*, the first position that may hold
  an unread item: it moves back by every fall of ``totalItems``, forward past each
  page that covers it, and the next page read is the one holding the frontier. So a
  deletion costs a re-read of the boundary, and nothing is stepped over.
* The one we step over is the transaction that moved: cycle N does not read it, so
  its older transitions newer than cycle N's threshold are not emitted by N. It
  moved after the cycle's first page was read, so its new ``lastTransitionedAt`` is
  not older than the head of that page, which is the next watermark; the next
  cycle therefore reads it (it can dodge again only by transitioning again, and
  only for as long as it keeps doing so). The watermark must not be the newest time
  the cycle *saw*: a ``createdAt`` window walked late in the cycle can show a
  transaction that moved after the one we stepped over.
  When a later cycle reads it, its older transitions lie behind that cycle's
  threshold, but not behind N's. So emission goes back to the *emission floor*: the
  lower of the threshold minus :data:`HISTORY_WINDOW` and the *reach* kept beside the
  cursor (``previous``), never before the start floor. Only a cycle that reads more
  than one page can step over anything (on a single page nothing is read after the
  head), so a single-page cycle leaves its own threshold as the reach, and a longer
  one carries its emission floor on: however many cycles a transaction dodges in a
  row, and however long the downtime between them (a catch-up moves the watermark
  by hours or days), the floor still reaches back to the cycle that first stepped
  over it. Everything queued since still has its seen record, so going back costs
  Redis look-ups, not duplicates; to keep it so, the carried reach never goes back
  further than ``history_reach_s`` before the API's clock (the service sets it an
  hour inside the seen retention).
* Ties: many transitions may share a millisecond. The comparison is strict against
  ``watermark - lookback`` with ``lookback > 0``, so the watermark's own millisecond
  is always read again.
* Late visibility: a transition that becomes visible after a later one (the reason
  for the lookback) is found as long as it shows up within ``lookback``.
* The start: with no cursor, the watermark starts at ``--since``, or where the other
  source left off (a switch, :data:`~worker.poll.sources.HANDOFF_MARGIN` earlier),
  or the API's own clock (the first answer's ``Date``; never the host's, which may
  run ahead). It is pinned at once, with the start floor (start minus the lookback),
  before anything is walked: a first cycle that fails cannot slide its start, and
  the start floor keeps transitions from before the start out for good.
* Depth: paging reaches only ``page_cap`` items. When the threshold lies deeper, the
  cycle walks ``createdAt`` windows, each holding at most ``page_cap`` transactions;
  every transaction lies in exactly one window because ``createdAt`` never changes,
  and the newest window is open ended so transactions created during the walk are
  covered too. A window that turns out fuller than the cap is split and walked
  again; so is one that outgrows the cap while we walk it.
* Resuming: the cycle checkpoints after each page (threshold, emission floor, head,
  the windows left and the frontier with its ``totalItems``). A run that stops or
  dies resumes the same cycle there. The arguments above hold across the pause: the
  frontier still only needs moving back by what left, and whatever moved meanwhile
  is newer than the head and falls to the next cycle.

Requests stay near the minimum: one page per ``per_page`` transactions newer than
the threshold, plus, when the threshold is deeper than ``page_cap``, one probe of the
last reachable page and one query for the oldest transaction; windows are sized from
``totalItems`` (each planned at :data:`WINDOW_FILL` of the cap), so a window rarely
needs splitting, and the pages read before the cap are not read twice.

Memory stays flat: one page of transactions, the plan, and the last
:data:`RECENT_CAPACITY` transactions read (to skip a re-read page without asking Redis).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import structlog
from pydantic import ValidationError

from worker.api.client import TransactionFilters
from worker.api.models import Page, Transaction
from worker.api.walk import TransactionPages
from worker.errors import FlexworkerError, ResourceError
from worker.events import SourceName, TransitionEvent, events_from_transaction, from_ms, to_ms
from worker.poll.cursor import SourceState
from worker.poll.sources import HANDOFF_MARGIN, CycleProgress, CycleReport, Sink, api_time_ms, skip_reason

__all__ = ["HISTORY_WINDOW", "RECENT_CAPACITY", "WINDOW_FILL", "TransactionsSource"]

#: How far behind the threshold a transaction's history is emitted at least (see the module docstring).
HISTORY_WINDOW = timedelta(hours=1)
#: Windows are planned to hold this share of the page cap, leaving room to grow while walked.
WINDOW_FILL = 0.8
#: How many recently read transactions a cycle remembers.
RECENT_CAPACITY = 2_000
_HISTORY_MS = int(HISTORY_WINDOW.total_seconds() * 1000)

log = structlog.get_logger("flexworker.poll")
_HANDOFF_MS = int(HANDOFF_MARGIN.total_seconds() * 1000)


@dataclass
class _Window:
    """``[start_ms, end_ms)`` of ``createdAt``; the newest is open ended (``end_ms`` None)."""

    start_ms: int
    end_ms: int | None
    #: how many transactions it was planned to hold.
    estimate: int


@dataclass
class _Plan:
    """One cycle, as checkpointed: enough to resume it in another process."""

    watermark_ms: int
    threshold_ms: int
    emit_floor_ms: int
    #: the next watermark: the newest ``lastTransitionedAt`` on the cycle's first page.
    head_ms: int | None = None
    #: None while walking the whole list; else the windows left, the current first.
    windows: list[_Window] | None = None
    #: first position of the current listing that may hold an unread transaction.
    frontier: int = 0
    #: ``totalItems`` of the current listing at its last read.
    total: int | None = None
    #: the newest ``lastTransitionedAt`` the cycle has read (so no ``createdAt`` it read is newer).
    newest_ms: int = 0
    pages: int = 0
    events: int = 0
    recent: OrderedDict[UUID, int] = field(default_factory=OrderedDict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["recent"]
        return data

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> _Plan | None:
        """The plan a checkpoint holds; None for one this version cannot read (start afresh)."""
        try:
            data = dict(record)
            windows = data.pop("windows")
            plan = cls(**data)
            plan.windows = None if windows is None else [_Window(**w) for w in windows]
        except (KeyError, TypeError, ValueError):
            return None
        return plan if plan._well_typed() else None

    def _well_typed(self) -> bool:
        def whole(*values: object) -> bool:
            return all(isinstance(v, int) and not isinstance(v, bool) for v in values)

        def whole_or_none(*values: object) -> bool:
            return all(v is None or whole(v) for v in values)

        numbers = (self.watermark_ms, self.threshold_ms, self.emit_floor_ms, self.frontier, self.newest_ms)
        windows_ok = self.windows is None or (
            isinstance(self.windows, list)
            and all(whole(w.start_ms, w.estimate) and whole_or_none(w.end_ms) for w in self.windows)
        )
        return (
            whole(*numbers, self.pages, self.events)
            and whole_or_none(self.head_ms, self.total)
            and windows_ok
        )

    @property
    def threshold(self) -> datetime:
        return from_ms(self.threshold_ms)

    def left(self) -> int | None:
        here = None if self.total is None else max(0, self.total - self.frontier)
        if self.windows is None:
            return here
        rest = sum(w.estimate for w in self.windows[1:])
        return rest + (here if here is not None else self.windows[0].estimate if self.windows else 0)


class _Outcome:
    DONE = "done"
    #: the page cap came before the threshold (or the window holds more than the cap).
    TOO_DEEP = "too deep"


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
        history_reach_s: float | None = None,
    ) -> None:
        if lookback_s <= 0:
            raise ValueError("lookback_s must be > 0: the watermark's millisecond must be read again")
        self._api = api
        self._lookback_ms = int(lookback_s * 1000)
        self._start_at = start_at
        self._include = list(include)
        self._per_page = per_page
        self._page_cap = page_cap
        self._clock = clock
        self._history_reach_ms = None if history_reach_s is None else int(history_reach_s * 1000)
        #: the newest API time seen (``Date``), to bound the open window when splitting it.
        self._api_ms_seen = 0

    async def cycle(self, state: SourceState, sink: Sink) -> CycleReport:
        first_page: Page[Transaction] | None = None
        plan = _Plan.from_json(state.resume) if state.resume is not None else None
        if plan is None and state.resume is not None:
            log.warning("resume record of another version ignored; the cycle starts afresh")
        if plan is None:
            watermark_ms, floor_ms = state.cursor, state.floor
            if watermark_ms is None:
                if floor_ms is not None:
                    watermark_ms = floor_ms + self._lookback_ms
                elif self._start_at is not None:
                    watermark_ms = to_ms(self._start_at)
                elif state.handoff is not None:
                    watermark_ms = state.handoff - _HANDOFF_MS
                else:
                    first_page = await self._query(1, {})
                    watermark_ms = self._api_now_ms(first_page)
            threshold_ms = watermark_ms - self._lookback_ms
            if floor_ms is None or state.cursor is None:
                # Pin the start before walking: a first cycle that fails must not slide it.
                floor_ms = threshold_ms if floor_ms is None else floor_ms
                await sink.save(cursor=watermark_ms, floor=floor_ms)
            reach_ms = min(threshold_ms - _HISTORY_MS, self._carried_reach_ms(state, threshold_ms))
            plan = _Plan(
                watermark_ms=watermark_ms,
                threshold_ms=threshold_ms,
                emit_floor_ms=max(floor_ms, reach_ms),
            )
        await self._walk(plan, sink, first_page)
        cursor = max(plan.watermark_ms, plan.head_ms if plan.head_ms is not None else plan.watermark_ms)
        # A cycle of one page stepped over nothing: its threshold is reach enough for the next.
        reach_ms = plan.threshold_ms if plan.pages <= 1 else min(plan.threshold_ms, plan.emit_floor_ms)
        await sink.save(cursor=cursor, previous=reach_ms, resume=None)
        return CycleReport(cursor=cursor, events=plan.events, pages=plan.pages)

    def _carried_reach_ms(self, state: SourceState, threshold_ms: int) -> int:
        """How far back the cycles before this one need emission to go (see the module docstring)."""
        reach_ms = state.previous if state.previous is not None else threshold_ms
        if self._history_reach_ms is not None:
            # Older seen records may have expired: going back further could queue an event twice.
            # (The bound is an hour inside the retention, far more than two clocks disagree by.)
            now_ms = max(self._api_ms_seen, to_ms(self._clock()))
            reach_ms = max(reach_ms, now_ms - self._history_reach_ms)
        return reach_ms

    async def _walk(self, plan: _Plan, sink: Sink, first_page: Page[Transaction] | None) -> None:
        if plan.windows is None:
            outcome = await self._walk_listing(plan, sink, None, first_page)
            if outcome == _Outcome.DONE:
                return
            plan.windows = await self._plan_windows(plan)
            plan.frontier, plan.total = 0, None
            await sink.save(resume=plan.to_json())
        while plan.windows:
            window = plan.windows[0]
            outcome = await self._walk_listing(plan, sink, window, None)
            if outcome == _Outcome.TOO_DEEP:
                count = max(plan.total or 0, self._page_cap + 1)
                plan.windows[:1] = self._split(window, count, shrink=True, now_ms=self._now_ms(plan))
            else:
                plan.windows.pop(0)
            plan.frontier, plan.total = 0, None
            sink.progress(self._progress(plan, window, done=outcome == _Outcome.DONE))
            await sink.save(resume=plan.to_json())

    async def _walk_listing(
        self, plan: _Plan, sink: Sink, window: _Window | None, first_page: Page[Transaction] | None
    ) -> str:
        """Page one listing (the whole list, or a window) newest first until the threshold."""
        while True:
            page_number = plan.frontier // self._per_page + 1
            offset = (page_number - 1) * self._per_page
            if offset >= self._page_cap:
                return _Outcome.TOO_DEEP
            if first_page is not None and page_number == 1:
                result, first_page = first_page, None
            else:
                result = await self._query(page_number, self._window_filters(window))
            # Positions count every item the server sent, readable or not (a skipped one too).
            data, received, total = result.data, result.received, result.meta.total_items
            if plan.total is not None and total is not None and total < plan.total:
                plan.frontier = max(0, plan.frontier - (plan.total - total))
            covered = offset <= plan.frontier
            if covered:
                plan.frontier = max(plan.frontier, offset + received)
            plan.total = total
            if plan.head_ms is None:
                plan.head_ms = max(
                    (to_ms(tx.attributes.last_transitioned_at) for tx in data), default=plan.watermark_ms
                )
            await self._take(plan, sink, result)
            plan.pages += 1
            sink.progress(self._progress(plan, window))
            end_of_list = offset + received >= total if total is not None else received < self._per_page
            # The order is by lastTransitionedAt: after a readable item at or below the threshold,
            # every later one is too, skipped ones included.
            past_threshold = bool(data) and data[-1].attributes.last_transitioned_at <= plan.threshold
            if covered and (end_of_list or past_threshold):
                return _Outcome.DONE
            if covered and received < self._per_page:
                return _Outcome.TOO_DEEP  # the page cap cut the answer short
            if window is not None and offset == 0 and total is not None and total > self._page_cap:
                return _Outcome.TOO_DEEP  # the window holds more than paging reaches: split it first
            deep = window is None and offset == 0 and total is not None and total > self._page_cap
            if deep and not await self._threshold_within_reach(plan, sink):
                return _Outcome.TOO_DEEP
            await sink.save(resume=plan.to_json())

    async def _threshold_within_reach(self, plan: _Plan, sink: Sink) -> bool:
        """Probe the last page paging reaches: is the threshold before it?"""
        last_page = self._page_cap // self._per_page
        probe = await self._query(last_page, {})
        plan.pages += 1
        await self._take(plan, sink, probe)
        return probe.received < self._per_page or (
            bool(probe.data) and probe.data[-1].attributes.last_transitioned_at <= plan.threshold
        )

    async def _take(self, plan: _Plan, sink: Sink, result: Page[Transaction]) -> None:
        for rejected in result.rejected:
            await sink.skip(rejected.type or "transaction", rejected.id or "(no id)", rejected.reason)
        batch: list[TransitionEvent] = []
        detected_at = self._clock()
        floor = from_ms(plan.emit_floor_ms)
        for tx in result.data:
            moved_at_ms = to_ms(tx.attributes.last_transitioned_at)
            plan.newest_ms = max(plan.newest_ms, moved_at_ms)
            if moved_at_ms <= plan.threshold_ms or plan.recent.get(tx.id) == moved_at_ms:
                continue
            plan.recent[tx.id] = moved_at_ms
            plan.recent.move_to_end(tx.id)
            if len(plan.recent) > RECENT_CAPACITY:
                plan.recent.popitem(last=False)
            try:
                batch += events_from_transaction(
                    tx, newer_than=floor, source="transactions", detected_at=detected_at
                )
            except (ResourceError, ValidationError) as exc:
                await sink.skip("transaction", str(tx.id), skip_reason(exc))
        if batch:
            plan.events += await sink.emit(batch)

    async def _plan_windows(self, plan: _Plan) -> list[_Window]:
        """``createdAt`` windows over every transaction, each planned to hold a share of the cap."""
        oldest = await self._api.transactions_query(page=1, per_page=1, sort=["-createdAt"])
        plan.pages += 1
        if oldest.received and not oldest.data:
            # The oldest cannot be read: the oldest readable one is on the first full page.
            oldest = await self._api.transactions_query(page=1, per_page=self._per_page, sort=["-createdAt"])
            plan.pages += 1
        self._api_ms_seen = max(self._api_ms_seen, api_time_ms(oldest) or 0)
        if not oldest.received:
            return []
        # With a whole page unreadable, start at the beginning of time: splitting finds the rest.
        start_ms = min((to_ms(tx.attributes.created_at) for tx in oldest.data), default=0)
        whole = _Window(start_ms, None, plan.total or oldest.meta.total_items or self._page_cap + 1)
        return self._split(whole, whole.estimate, shrink=False, now_ms=self._now_ms(plan))

    def _now_ms(self, plan: _Plan) -> int:
        """Where the open window's span ends for planning: the API's clock, else the newest time read.

        Not the host's clock, which may be far off. Transactions created later fall
        into the open window all the same.
        """
        return max(self._api_ms_seen, plan.newest_ms, plan.head_ms or plan.watermark_ms)

    def _split(self, window: _Window, count: int, *, shrink: bool, now_ms: int) -> list[_Window]:
        """Cut ``window`` (``count`` transactions) into equal spans planned at the fill share of the cap.

        ``shrink``: the window did not fit, so it must become at least two.
        """
        pieces = max(2 if shrink else 1, math.ceil(count / (self._page_cap * WINDOW_FILL)))
        upper_ms = window.end_ms if window.end_ms is not None else max(now_ms, window.start_ms) + 1
        span_ms = upper_ms - window.start_ms
        if span_ms <= 1 and shrink:
            raise FlexworkerError(
                f"more than {self._page_cap} transactions created at {from_ms(window.start_ms).isoformat()}"
            )
        pieces = max(1, min(pieces, span_ms))
        bounds = [window.start_ms + span_ms * i // pieces for i in range(pieces)] + [window.end_ms]
        estimate = math.ceil(count / pieces)
        return [_Window(bounds[i], bounds[i + 1], estimate) for i in range(pieces)]  # type: ignore[arg-type]

    def _window_filters(self, window: _Window | None) -> TransactionFilters:
        if window is None:
            return {}
        filters: TransactionFilters = {"created_at_start": from_ms(window.start_ms)}
        if window.end_ms is not None:
            filters["created_at_end"] = from_ms(window.end_ms)
        return filters

    async def _query(self, page_number: int, window: TransactionFilters) -> Page[Transaction]:
        query: TransactionFilters = {**window, "sort": ["lastTransitionedAt"], "include": self._include}
        result = await self._api.transactions_query(page=page_number, per_page=self._per_page, **query)
        self._api_ms_seen = max(self._api_ms_seen, api_time_ms(result) or 0)
        return result

    def _api_now_ms(self, page: Page[Transaction]) -> int:
        """The API's clock: its ``Date``, else the newest transaction it shows (else the start of time)."""
        served_ms = api_time_ms(page)
        if served_ms is not None:
            return served_ms
        return max((to_ms(tx.attributes.last_transitioned_at) for tx in page.data), default=0)

    def _progress(self, plan: _Plan, window: _Window | None, *, done: bool = False) -> CycleProgress:
        part = None
        if window is not None:
            end = "now" if window.end_ms is None else from_ms(window.end_ms).isoformat()
            part = f"createdAt {from_ms(window.start_ms).isoformat()} .. {end}"
        return CycleProgress(
            pages=plan.pages, events=plan.events, left=plan.left(), part=part, part_done=done
        )
