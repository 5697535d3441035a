"""The poll path where deployments meet it: dodges across downtimes, switches after a catch-up,
resume records of another version, related resources that no longer read."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from arq.connections import ArqRedis

from tests.dodge_kit import Clock, EventsApi, HookApi, make_sim, move, new_tx, truth
from tests.memory_sink import MemorySink
from tests.test_poller import T0, EventPagesFake, api_event, transaction
from worker.api.models import Transaction
from worker.errors import ResourceError
from worker.events import to_ms
from worker.poll.cursor import CursorStore, SourceState
from worker.poll.lease import Lease
from worker.poll.poller import Poller
from worker.poll.skipped import SkippedItems
from worker.poll.sources.events import EventsSource
from worker.poll.sources.transactions import TransactionsSource
from worker.queue.enqueue import EventQueue

CAP = 10_000


def catch_up_with_a_dodge(*, dodge_again: bool) -> tuple[Any, Clock, MemorySink, HookApi]:
    """Two hours down (T starts ten minutes in, twenty others after it); T moves during the
    catch-up's walk, and, with ``dodge_again``, again during the next cycle's."""
    clock = Clock()
    sim = make_sim(clock, CAP)
    api = HookApi(sim, clock, CAP)
    since = clock() - timedelta(milliseconds=1)
    sink = MemorySink()

    def cycle() -> None:
        source = TransactionsSource(
            api, lookback_s=0.5, start_at=since, per_page=5, page_cap=CAP, clock=clock
        )
        asyncio.run(source.cycle(sink.state, sink))

    cycle()  # nothing yet: the start is pinned
    clock.advance(10 * 60_000)
    t = new_tx(sim)
    for i in range(20):
        clock.advance(5 * 60_000)
        new_tx(sim, i + 1)
    api.hooks[api.reads + 2] = lambda: move(sim, t)  # after the catch-up's first page
    cycle()
    clock.advance(1000)
    for i in range(6):  # six newer ones push T to the next cycle's second page
        clock.advance(10)
        new_tx(sim, i)
    if dodge_again:
        api.hooks[api.reads + 2] = lambda: move(sim, t)
    cycle()
    return sim, clock, sink, api


@pytest.mark.parametrize("dodge_again", [False, True], ids=["one dodge", "two dodges in a row"])
def test_a_transaction_that_dodges_a_catch_up_is_delivered_whole(dodge_again: bool) -> None:
    sim, clock, sink, api = catch_up_with_a_dodge(dodge_again=dodge_again)
    for _ in range(3):
        clock.advance(1000)
        source = TransactionsSource(api, lookback_s=0.5, per_page=5, page_cap=CAP, clock=clock)
        asyncio.run(source.cycle(sink.state, sink))
    assert sorted(set(truth(sim)) - set(sink.delivered)) == []


def test_a_switch_to_events_after_a_catch_up_reaches_back_as_far_as_the_catch_up_needed() -> None:
    sim, clock, sink, _ = catch_up_with_a_dodge(dodge_again=False)
    clock.advance(1000)
    # What CursorStore.load hands the events source (checked against Redis below).
    assert sink.state.cursor is not None and sink.state.previous is not None
    events_sink = MemorySink(SourceState(handoff=min(sink.state.cursor, sink.state.previous)))
    events_sink.seen, events_sink.delivered = sink.seen, sink.delivered
    source = EventsSource(EventsApi(sim, clock), clock=clock)
    for _ in range(3):
        asyncio.run(source.cycle(events_sink.state, events_sink))
        clock.advance(1000)
    assert sorted(set(truth(sim)) - set(sink.delivered)) == []


async def test_the_handoff_is_the_lowest_point_the_transactions_source_must_reach(
    arq_redis: ArqRedis,
) -> None:
    cursors = CursorStore(arq_redis, "p")
    lease = Lease(arq_redis, "p:lease:poller", ttl_s=10)
    assert await lease.acquire() and lease.token is not None
    await cursors.save(
        "transactions",
        cursor=9_000,
        fields={"previous": "4_000".replace("_", "")},
        lease_key=lease.key,
        token=lease.token,
        generation=0,
    )
    assert (await cursors.load("events")).handoff == 4_000
    await cursors.save(
        "transactions",
        fields={"resume": '{"emit_floor_ms": 1000}'},
        lease_key=lease.key,
        token=lease.token,
        generation=0,
    )
    assert (await cursors.load("events")).handoff == 1_000


RECORDS: dict[str, Any] = {
    "not an object": ["not", "an", "object"],
    "strings for numbers": {
        "watermark_ms": "1780272000000",
        "threshold_ms": "1780271999500",
        "emit_floor_ms": "1780271999500",
        "windows": None,
    },
    "a window as a list": {
        "watermark_ms": 1,
        "threshold_ms": 0,
        "emit_floor_ms": 0,
        "windows": [[0, None, 5]],
    },
    "an object for the frontier": {
        "watermark_ms": 1,
        "threshold_ms": 0,
        "emit_floor_ms": 0,
        "windows": None,
        "frontier": {"position": 3},
    },
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_a_resume_record_this_version_cannot_read_starts_the_cycle_afresh(name: str) -> None:
    clock = Clock()
    sim = make_sim(clock, 100)
    new_tx(sim)
    api = HookApi(sim, clock, 100)
    now_ms = to_ms(clock())
    sink = MemorySink(SourceState(cursor=now_ms - 5000, floor=now_ms - 5500, resume=RECORDS[name]))
    asyncio.run(
        TransactionsSource(api, lookback_s=0.5, per_page=5, page_cap=100, clock=clock).cycle(sink.state, sink)
    )
    assert len(sink.delivered) == 1


@pytest.mark.parametrize("record", ["{not json", '["v2", {"w": 1}]'])
async def test_the_poller_survives_a_resume_record_that_is_not_json_of_this_version(
    arq_redis: ArqRedis, record: str
) -> None:
    clock = Clock()
    sim = make_sim(clock, 100)
    new_tx(sim)
    cursors = CursorStore(arq_redis, "p")
    await cursors.set("transactions", to_ms(clock()) - 5000)
    await arq_redis.hset("p:cursor:transactions:state", "resume", record)  # type: ignore[misc]
    source = TransactionsSource(
        HookApi(sim, clock, 100), lookback_s=0.5, per_page=5, page_cap=100, clock=clock
    )
    poller = Poller(
        source,
        EventQueue(arq_redis, prefix="p", queue_name="p:queue", seen_retention_s=3600),
        cursors,
        Lease(arq_redis, "p:lease:poller", ttl_s=10),
        idle_interval_s=0.01,
        skipped=SkippedItems(arq_redis, "p", retention_s=3600, clock=lambda: 0),
    )
    report = await poller.run_once()
    assert report.complete
    assert poller.stats.events_enqueued == 1


async def test_events_source_goes_on_when_the_related_resources_no_longer_read() -> None:
    tx = transaction(5, ["transition/inquire"])

    async def fetch_related(transaction_id: Any) -> Transaction:
        raise ResourceError("transaction: field 'attributes.processName': missing")

    api = EventPagesFake([[api_event(1, "transaction/initiated", tx)]])
    sink = MemorySink()
    report = await EventsSource(api, start_at=T0, fetch_related=fetch_related).cycle(sink.state, sink)
    assert report.events == 1
    assert sink.state.cursor == 1
