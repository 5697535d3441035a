"""The poll loop's promises, with scripted sources and a real redis-server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest
from arq.connections import ArqRedis

from tests.memory_sink import MemorySink
from worker.api.models import Event, Page, PageMeta, Transaction
from worker.errors import CursorChangedError, NotFoundError, ServerError
from worker.events import SourceName, TransitionEvent, events_from_transaction
from worker.poll.cursor import CursorStore, SourceState
from worker.poll.lease import Lease
from worker.poll.poller import LeaseHeldError, LeaseLostError, Poller
from worker.poll.skipped import SkippedItems
from worker.poll.sources import CycleReport, Sink
from worker.poll.sources.events import EventsSource
from worker.queue.enqueue import EventQueue

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def transaction(number: int, transitions: list[str]) -> Transaction:
    return Transaction.model_validate(
        {
            "id": UUID(int=number),
            "type": "transaction",
            "attributes": {
                "createdAt": T0,
                "processName": "default-purchase",
                "processVersion": 1,
                "lastTransition": transitions[-1],
                "lastTransitionedAt": T0 + timedelta(seconds=len(transitions)),
                "transitions": [
                    {"transition": name, "createdAt": T0 + timedelta(seconds=i + 1), "by": "customer"}
                    for i, name in enumerate(transitions)
                ],
            },
        }
    )


def some_events(number: int) -> list[TransitionEvent]:
    tx = transaction(number, ["transition/inquire", "transition/request-payment-after-inquiry"])
    return events_from_transaction(tx, newer_than=None, source="transactions")


class ScriptedSource:
    """Emits the given batches, then fails or reports ``cursor``."""

    name: SourceName = "transactions"

    def __init__(self, batches: list[list[TransitionEvent]], *, cursor: int, fail: bool = False) -> None:
        self.batches = batches
        self.cursor = cursor
        self.fail = fail
        self.seen_cursors: list[int | None] = []

    async def cycle(self, state: SourceState, sink: Sink) -> CycleReport:
        self.seen_cursors.append(state.cursor)
        new = 0
        for batch in self.batches:
            new += await sink.emit(batch)
        if self.fail:
            raise ServerError("Integration API answered 503", status=503)
        await sink.save(cursor=self.cursor, floor=self.cursor - 1000 if state.floor is None else None)
        return CycleReport(cursor=self.cursor, events=new, pages=len(self.batches))


def make_poller(
    redis: ArqRedis, source: ScriptedSource, *, lease_ttl_s: float = 10
) -> tuple[Poller, EventQueue, CursorStore]:
    queue = EventQueue(redis, prefix="p", queue_name="p:queue", seen_retention_s=3600)
    cursors = CursorStore(redis, "p")
    lease = Lease(redis, "p:lease:poller", ttl_s=lease_ttl_s)
    skipped = SkippedItems(redis, "p", retention_s=3600, clock=lambda: 0)
    return Poller(source, queue, cursors, lease, idle_interval_s=0.01, skipped=skipped), queue, cursors


async def test_failed_cycle_keeps_cursor_but_keeps_what_it_queued(arq_redis: ArqRedis) -> None:
    cursors = CursorStore(arq_redis, "p")
    await cursors.set("transactions", 5_000)
    failing = ScriptedSource([some_events(1)], cursor=9_000, fail=True)
    poller, _, _ = make_poller(arq_redis, failing)
    with pytest.raises(ServerError):
        await poller.run_once()
    assert await cursors.get("transactions") == 5_000
    assert await arq_redis.zcard("p:queue") == 2
    # The next cycle reads the same ground again: nothing is queued twice, and now the cursor moves.
    healthy = ScriptedSource([some_events(1), some_events(2)], cursor=9_000)
    poller, _, _ = make_poller(arq_redis, healthy)
    report = await poller.run_once()
    assert report.events == 2
    assert await arq_redis.zcard("p:queue") == 4
    assert await cursors.get("transactions") == 9_000
    assert (await cursors.load("transactions")).floor == 8_000
    assert healthy.seen_cursors == [5_000]


async def test_poll_once_refuses_while_another_poller_holds_the_lease(arq_redis: ArqRedis) -> None:
    holder = Lease(arq_redis, "p:lease:poller", ttl_s=0.6)
    assert await holder.acquire()
    stop = asyncio.Event()

    async def keep_renewing() -> None:  # a live poller
        while not stop.is_set():
            assert await holder.renew()
            await asyncio.sleep(0.1)

    renewer = asyncio.create_task(keep_renewing())
    poller, _, cursors = make_poller(
        arq_redis, ScriptedSource([some_events(1)], cursor=9_000), lease_ttl_s=0.6
    )
    try:
        with pytest.raises(LeaseHeldError):
            await poller.run_once()
    finally:
        stop.set()
        await renewer
    assert await arq_redis.zcard("p:queue") == 0
    assert await cursors.get("transactions") is None


async def test_poll_once_waits_out_the_lease_of_a_run_that_died(arq_redis: ArqRedis) -> None:
    dead = Lease(arq_redis, "p:lease:poller", ttl_s=0.5)
    assert await dead.acquire()  # and never renewed: the run was SIGKILLed
    poller, _, cursors = make_poller(
        arq_redis, ScriptedSource([some_events(1)], cursor=9_000), lease_ttl_s=0.5
    )
    report = await poller.run_once()
    assert report.complete
    assert await cursors.get("transactions") == 9_000


async def test_lease_lost_mid_cycle_leaves_cursor(arq_redis: ArqRedis) -> None:
    poller, _, cursors = make_poller(arq_redis, ScriptedSource([some_events(1)], cursor=9_000))
    lease = poller._lease
    assert await lease.acquire()
    # Another replica takes over (our lease expired during a long pause).
    await arq_redis.set(lease.key, "999")
    with pytest.raises(LeaseLostError):
        await poller.cycle()
    assert await cursors.get("transactions") is None


async def test_run_stands_by_until_the_lease_is_free(arq_redis: ArqRedis) -> None:
    holder = Lease(arq_redis, "p:lease:poller", ttl_s=0.6)
    assert await holder.acquire()
    source = ScriptedSource([some_events(1)], cursor=9_000)
    poller, _, cursors = make_poller(arq_redis, source)
    stop = asyncio.Event()
    task = asyncio.create_task(poller.run(stop))
    try:
        await asyncio.sleep(0.3)
        assert source.seen_cursors == []  # standing by
        await holder.release()
        deadline = asyncio.get_running_loop().time() + 5
        while await cursors.get("transactions") != 9_000:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    assert await arq_redis.get("p:lease:poller") is None  # released on shutdown


class EventPagesFake:
    def __init__(self, pages: list[list[dict[str, object]]]) -> None:
        self.pages = pages
        self.calls: list[dict[str, object]] = []

    async def events_query(self, **params: object) -> Page[Event]:
        self.calls.append(params)
        data = self.pages.pop(0) if self.pages else []
        return Page[Event](data=[Event.model_validate(item) for item in data], meta=PageMeta())


def api_event(sequence_id: int, event_type: str, tx: Transaction | None) -> dict[str, object]:
    return {
        "id": UUID(int=10_000 + sequence_id),
        "type": "event",
        "attributes": {
            "sequenceId": sequence_id,
            "createdAt": T0,
            "eventType": event_type,
            "resourceId": tx.id if tx else UUID(int=1),
            "resourceType": "transaction" if tx else "user",
            "resource": tx.model_dump(mode="json", by_alias=True) if tx else {"id": str(UUID(int=1))},
        },
    }


async def test_events_source_skips_unknown_types_and_keys_like_the_transactions_source() -> None:
    first = transaction(3, ["transition/inquire"])
    second = transaction(3, ["transition/inquire", "transition/request-payment-after-inquiry"])
    api = EventPagesFake(
        [
            [
                api_event(7, "transaction/initiated", first),
                api_event(8, "user/created", None),
                api_event(9, "transaction/some-future-type", second),
                api_event(10, "transaction/transitioned", second),
            ]
        ]
    )
    emitted: list[TransitionEvent] = []

    async def emit(events: list[TransitionEvent]) -> int:
        emitted.extend(events)
        return len(events)

    source = EventsSource(api, start_at=T0)
    sink = MemorySink()
    sink.emit = emit  # type: ignore[method-assign]
    report = await source.cycle(sink.state, sink)
    assert [e.transition for e in emitted] == [
        "transition/inquire",
        "transition/request-payment-after-inquiry",
    ]
    expected = {e.key for e in events_from_transaction(second, newer_than=None, source="transactions")}
    assert {e.key for e in emitted} == expected
    assert report.cursor == 10
    assert report.more is False
    assert api.calls[0]["created_at_start"] == T0
    assert api.calls[0]["start_after_sequence_id"] is None
    # Next cycle resumes after the last sequence id, not from the start time.
    assert sink.state.cursor == report.cursor
    await source.cycle(sink.state, sink)
    assert api.calls[1]["start_after_sequence_id"] == 10
    assert api.calls[1]["created_at_start"] is None


class SlowSource:
    """A long cycle: a page's worth of events, then checkpoints spread over ``duration_s``."""

    name: SourceName = "transactions"

    def __init__(self, duration_s: float, *, checkpoints: int = 6) -> None:
        self.duration_s = duration_s
        self.checkpoints = checkpoints

    async def cycle(self, state: SourceState, sink: Sink) -> CycleReport:
        new = await sink.emit(some_events(1))
        for page in range(self.checkpoints):
            await asyncio.sleep(self.duration_s / self.checkpoints)  # the API is slow today
            await sink.save(resume={"page": page})
        await sink.save(cursor=9_000, resume=None)
        return CycleReport(cursor=9_000, events=new, pages=self.checkpoints)


async def test_poll_once_renews_its_lease_for_as_long_as_its_cycle_runs(arq_redis: ArqRedis) -> None:
    # The cycle lasts four lease lifetimes; without renewal its first checkpoint finds the lease gone.
    poller, _, cursors = make_poller(arq_redis, SlowSource(2.0), lease_ttl_s=0.5)  # type: ignore[arg-type]
    report = await poller.run_once()
    assert report.complete
    assert await cursors.get("transactions") == 9_000


async def test_poll_once_stops_at_a_checkpoint_after_max_duration(arq_redis: ArqRedis) -> None:
    poller, _, cursors = make_poller(arq_redis, SlowSource(1.0, checkpoints=10))  # type: ignore[arg-type]
    report = await poller.run_once(max_duration_s=0.25)
    assert not report.complete
    assert 1 <= report.pages < 10
    state = await cursors.load("transactions")
    assert state.cursor is None
    assert state.resume == {"page": report.pages - 1}
    assert await arq_redis.get("p:lease:poller") is None


class PausingSource:
    """Emits, then waits for the test at a point between two checkpoints."""

    name: SourceName = "transactions"

    def __init__(self) -> None:
        self.paused = asyncio.Event()
        self.go_on = asyncio.Event()

    async def cycle(self, state: SourceState, sink: Sink) -> CycleReport:
        new = await sink.emit(some_events(1))
        await sink.save(resume={"page": 1})
        self.paused.set()
        await self.go_on.wait()
        await sink.save(cursor=9_000, resume=None)
        return CycleReport(cursor=9_000, events=new, pages=2)


async def test_an_operator_rewind_during_a_cycle_is_not_undone(arq_redis: ArqRedis) -> None:
    source = PausingSource()
    poller, _, cursors = make_poller(arq_redis, source)  # type: ignore[arg-type]
    await cursors.set("transactions", 5_000)
    running = asyncio.create_task(poller.run_once())
    await asyncio.wait_for(source.paused.wait(), timeout=5)
    await cursors.set("transactions", 1_000)  # `flexworker cursor set` while the cycle runs
    source.go_on.set()
    with pytest.raises(CursorChangedError):
        await running
    state = await cursors.load("transactions")
    assert state.cursor == 1_000
    assert state.resume is None


async def test_events_source_goes_on_without_related_resources_of_a_deleted_transaction() -> None:
    tx = transaction(5, ["transition/inquire"])
    api = EventPagesFake([[api_event(1, "transaction/initiated", tx)]])

    async def fetch_related(transaction_id: UUID) -> Transaction:
        raise NotFoundError("Integration API answered 404 (not-found: Not found)", status=404)

    source = EventsSource(api, start_at=T0, fetch_related=fetch_related)
    sink = MemorySink()
    report = await source.cycle(sink.state, sink)
    assert report.events == 1
    assert sink.delivered == [events_from_transaction(tx, newer_than=None, source="events")[0].key]
    assert sink.state.cursor == 1
