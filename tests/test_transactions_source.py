"""The transactions source against a scripted listing: starts, deletions, memory, windows."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Unpack
from uuid import UUID

import pytest

from tests.memory_sink import Crash, MemorySink
from worker.api.client import TransactionFilters
from worker.api.models import Page, PageMeta, Transaction
from worker.errors import ServerError
from worker.events import event_key, to_ms
from worker.poll.cursor import SourceState
from worker.poll.sources.transactions import TransactionsSource

T0 = datetime(2026, 6, 1, tzinfo=UTC)


def make_tx(number: int, moved_at: list[datetime], *, created_at: datetime | None = None) -> Transaction:
    names = ["transition/inquire", "transition/request-payment-after-inquiry", "transition/confirm-payment"]
    return Transaction.model_validate(
        {
            "id": UUID(int=number),
            "type": "transaction",
            "attributes": {
                "createdAt": created_at or moved_at[0],
                "processName": "default-booking",
                "processVersion": 1,
                "lastTransition": names[len(moved_at) - 1],
                "lastTransitionedAt": moved_at[-1],
                "transitions": [
                    {"transition": names[i], "createdAt": at, "by": "customer"}
                    for i, at in enumerate(moved_at)
                ],
            },
        }
    )


class Listing:
    """``transactions_query`` over transactions the test controls; ``before_read`` runs before each page."""

    def __init__(self, page_cap: int = 10_000) -> None:
        self.transactions: dict[UUID, Transaction] = {}
        self.page_cap = page_cap
        self.reads = 0
        self.before_read: Callable[[int], None] = lambda read: None
        self._sorted: dict[tuple[str, ...], list[Transaction]] = {}

    def put(self, tx: Transaction) -> None:
        self.transactions[tx.id] = tx
        self._sorted.clear()

    def delete(self, number: int) -> None:
        del self.transactions[UUID(int=number)]
        self._sorted.clear()

    def warm_up(self) -> None:
        self._in_order(("lastTransitionedAt",))

    def _in_order(self, sort: tuple[str, ...]) -> list[Transaction]:
        # Sorted once per change, so a read allocates no more than its page (the memory test).
        if sort not in self._sorted:
            oldest_first = sort == ("-createdAt",)

            def key(tx: Transaction) -> tuple[datetime, UUID]:
                at = tx.attributes.created_at if oldest_first else tx.attributes.last_transitioned_at
                return at, tx.id

            self._sorted[sort] = sorted(self.transactions.values(), key=key, reverse=not oldest_first)
        return self._sorted[sort]

    def event_keys(self) -> set[str]:
        return {
            event_key(tx.id, t.transition, t.created_at)
            for tx in self.transactions.values()
            for t in tx.attributes.transitions
        }

    async def transactions_query(
        self, *, page: int | None = None, per_page: int | None = None, **filters: Unpack[TransactionFilters]
    ) -> Page[Transaction]:
        self.reads += 1
        self.before_read(self.reads)
        page, per_page = page or 1, per_page or 100
        found = self._in_order(tuple(filters.get("sort") or ()))
        if "created_at_start" in filters or "created_at_end" in filters:
            start_at, end_at = filters.get("created_at_start"), filters.get("created_at_end")
            found = [
                tx
                for tx in found
                if (start_at is None or tx.attributes.created_at >= start_at)
                and (end_at is None or tx.attributes.created_at < end_at)
            ]
        start = (page - 1) * per_page
        data = found[start : min(start + per_page, self.page_cap)]
        return Page[Transaction](data=data, meta=PageMeta(total_items=len(found)))


def source(listing: Listing, **kw: Any) -> TransactionsSource:
    options: dict[str, Any] = {"lookback_s": 1.0, "per_page": 5, "start_at": T0 - timedelta(seconds=10)}
    options.update(kw)
    return TransactionsSource(listing, **options)


async def test_a_deletion_above_the_read_position_steps_over_nothing() -> None:
    listing = Listing()
    for n in range(12):
        listing.put(make_tx(n, [T0 + timedelta(seconds=n)]))

    def delete_above(read: int) -> None:
        if read == 2:  # after page 1 was read: an item on it goes away, the rest moves forward
            listing.delete(9)

    listing.before_read = delete_above
    sink = MemorySink()
    await source(listing).cycle(sink.state, sink)
    assert set(sink.delivered) >= listing.event_keys()
    assert len(listing.event_keys()) == 11


async def test_the_start_is_pinned_at_first_use_whatever_fails_after() -> None:
    listing = Listing()
    moment = T0
    made = 0

    def traffic() -> None:
        nonlocal moment, made
        moment += timedelta(seconds=30)  # more than the lookback apart
        made += 1
        listing.put(make_tx(made, [moment]))

    traffic()
    sink = MemorySink()
    for attempt in range(7):
        # Six start-up cycles fail (Redis, say) after the first one's first answer; traffic goes on.
        sink.crash_at_save = None if attempt == 6 else sink.saves + (2 if attempt == 0 else 1)
        with pytest.raises(Crash) if attempt < 6 else _nothing():
            await source(listing, start_at=None).cycle(sink.state, sink)
        traffic()
    await source(listing, start_at=None).cycle(sink.state, sink)
    started = sink.state.floor
    assert started is not None
    # Everything made after the first attempt's start is delivered, none of it slid away.
    expected = {key for key in listing.event_keys() if int(key.rsplit("/", 1)[1]) > started}
    assert len(expected) == made == 8
    assert expected <= set(sink.delivered)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_a_failed_query_keeps_the_checkpointed_pages() -> None:
    listing = Listing()
    for n in range(23):
        listing.put(make_tx(n, [T0 + timedelta(seconds=n)]))

    def fail_once(read: int) -> None:
        if read == 3:
            raise ServerError("Integration API answered 503", status=503)

    listing.before_read = fail_once
    sink = MemorySink()
    with pytest.raises(ServerError):
        await source(listing).cycle(sink.state, sink)
    assert sink.state.resume is not None
    assert len(sink.delivered) == 10  # two pages
    reads_before = listing.reads
    await source(listing).cycle(sink.state, sink)
    assert set(sink.delivered) == listing.event_keys()
    assert listing.reads - reads_before == 3  # pages 3, 4 and 5; not the first two again
    assert sink.state.resume is None


async def test_windows_are_sized_to_fit_and_the_pages_before_the_cap_are_not_read_again() -> None:
    listing = Listing(page_cap=50)
    for n in range(200):
        listing.put(make_tx(n, [T0 + timedelta(seconds=n)]))
    sink = MemorySink()
    await source(listing, per_page=10, page_cap=50).cycle(sink.state, sink)
    assert set(sink.delivered) == listing.event_keys()
    # 20 pages of transactions, page 1 and the probe of the last reachable page, the oldest one,
    # and the windows' partly filled last pages.
    assert listing.reads <= 20 + 3 + 6


async def test_a_cycle_remembers_a_bounded_number_of_transactions() -> None:
    async def peak_bytes(count: int) -> int:
        listing = Listing(page_cap=100_000)
        for n in range(count):
            listing.put(make_tx(n, [T0 + timedelta(milliseconds=n)]))
        sink = MemorySink()
        sink.emit = _count_only  # type: ignore[method-assign]
        listing.warm_up()
        cycle = source(listing, per_page=100, page_cap=100_000).cycle(sink.state, sink)
        tracemalloc.start()
        try:
            await cycle
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # Four times the transactions: a set of every key read would grow by ~1.5 MB (about 160
    # bytes a key) over a peak of well under 1 MB; what a cycle keeps is bounded instead.
    small, large = await peak_bytes(3_000), await peak_bytes(12_000)
    assert large < small * 2, (small, large)


async def _count_only(events: Any) -> int:
    return len(events)


def test_a_cycle_that_starts_with_no_cursor_from_an_empty_marketplace_starts_at_its_beginning() -> None:
    listing = Listing()
    sink = MemorySink()
    asyncio.run(source(listing, start_at=None).cycle(sink.state, sink))
    assert sink.state.cursor == 0
    listing.put(make_tx(1, [T0]))
    asyncio.run(source(listing, start_at=None).cycle(sink.state, sink))
    assert sink.delivered == [event_key(UUID(int=1), "transition/inquire", T0)]
    assert sink.state.cursor == to_ms(T0)


async def test_the_carried_reach_never_goes_back_past_the_seen_retention() -> None:
    # A reach carried from long ago (busy, many-page cycles) would re-queue transitions whose
    # seen records have expired: history_reach_s bounds it.
    now = T0 + timedelta(days=10)
    listing = Listing()
    listing.put(make_tx(1, [T0, now - timedelta(minutes=30), now]))
    state = SourceState(cursor=to_ms(now), floor=to_ms(T0), previous=to_ms(T0))
    sink = MemorySink(state)
    cycle = source(listing, start_at=None, clock=lambda: now, history_reach_s=3600).cycle(sink.state, sink)
    await cycle
    assert sorted(key.split("/")[1] + "/" + key.split("/")[2] for key in sink.delivered) == [
        "transition/confirm-payment",
        "transition/request-payment-after-inquiry",
    ]
