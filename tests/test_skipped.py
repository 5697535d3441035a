"""Items a source cannot turn into events: recorded once, counted, listed, kept within bounds."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest
from arq.connections import ArqRedis

from tests.memory_sink import MemorySink
from tests.test_cli import env_for, flexworker
from tests.test_poller import T0, api_event, transaction
from worker.api.models import Event, Page, PageMeta, RejectedItem
from worker.ops.redis_server import RedisServer
from worker.poll import skipped as skipped_module
from worker.poll.skipped import SkippedItems
from worker.poll.sources.events import EventsSource
from worker.sim import SimConfig, Simulator


class Clock:
    def __init__(self) -> None:
        self.now_ms = 1_000_000

    def __call__(self) -> int:
        return self.now_ms


async def test_an_item_met_again_is_one_record_and_counted_once(arq_redis: ArqRedis) -> None:
    clock = Clock()
    items = SkippedItems(arq_redis, "p", retention_s=3600, clock=clock)
    assert await items.record("transactions", "transaction", "tx-1", "field 'attributes.transitions': bad")
    clock.now_ms += 5_000
    assert not await items.record(
        "transactions", "transaction", "tx-1", "field 'attributes.transitions': bad"
    )
    clock.now_ms += 1
    assert await items.record("events", "event", "42", "field 'attributes.eventType': missing")
    [first, second] = await items.list()
    assert (first.resource_id, first.times, second.resource_id) == ("tx-1", 2, "42")
    assert (first.last_seen - first.first_seen).total_seconds() == 5
    assert await items.count() == 2


async def test_records_are_kept_within_the_retention_and_the_cap(
    arq_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    items = SkippedItems(arq_redis, "p", retention_s=60, clock=clock)
    await items.record("transactions", "transaction", "old", "bad")
    clock.now_ms += 61_000
    await items.record("transactions", "transaction", "new", "bad")
    assert [item.resource_id for item in await items.list()] == ["new"]
    monkeypatch.setattr(skipped_module, "MAX_RECORDS", 3)
    for n in range(5):
        clock.now_ms += 1
        await items.record("transactions", "transaction", f"many-{n}", "bad")
    assert [item.resource_id for item in await items.list()] == ["many-2", "many-3", "many-4"]
    assert await items.count() == 7  # the counter counts every item ever skipped


async def test_events_source_steps_past_an_event_it_cannot_read() -> None:
    tx = transaction(6, ["transition/inquire"])

    class Pages:
        async def events_query(self, **params: object) -> Page[Event]:
            good = Event.model_validate(api_event(7, "transaction/initiated", tx))
            bad = RejectedItem(index=1, id=str(UUID(int=8)), type="event", reason="bad", sequence_id=8)
            return Page[Event](data=[good], rejected=[bad], meta=PageMeta())

    sink = MemorySink()
    report = await EventsSource(Pages(), start_at=T0).cycle(sink.state, sink)
    assert report.events == 1
    assert sink.state.cursor == 8  # past the unreadable last event: no stall on it
    assert sink.skipped == [("event", "8", "bad")]


async def test_skipped_list_names_the_items(
    redis_server: RedisServer, arq_redis: ArqRedis, tmp_path: Path
) -> None:
    items = SkippedItems(arq_redis, "flexworker:cli", retention_s=3600, clock=Clock())
    await items.record("transactions", "transaction", "tx-9", "field 'attributes.transitions': bad")
    sim = Simulator(SimConfig(seed=1, rate_limits=None))
    env = env_for(sim, "http://127.0.0.1:9", redis_server.url)
    code, out, err = await flexworker("skipped", "list", env=env, cwd=tmp_path)
    assert code == 0, err
    assert "transactions  transaction tx-9  seen 1x  field 'attributes.transitions': bad" in out
    assert "1 skipped item" in out
    code, out, _ = await flexworker("status", env=env, cwd=tmp_path)
    assert "skipped items:       1" in out
