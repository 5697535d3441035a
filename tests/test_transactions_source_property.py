"""Property: however transitions interleave with page reads, the transactions source
delivers exactly the simulator's ground truth.

The simulator is driven in process on a manual clock: before answering each page
read, the fake API moves the clock by a hypothesis-chosen step and applies a
hypothesis-chosen number of transitions, all in that one millisecond (ties; never
more new transactions in one millisecond than paging can reach, as in reality),
so transactions move between
pages while the source pages, and time passes the lookback between cycles. Small
pages and a small page cap make moves and ``createdAt`` windows common.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Unpack
from uuid import UUID

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.dodge_kit import Clock as ManualClock
from tests.memory_sink import Crash, MemorySink
from worker.api import wire
from worker.api.client import TransactionFilters, encode_params, transaction_query_params
from worker.api.models import Page, Transaction, parse_page
from worker.events import event_key, from_ms, to_ms
from worker.poll.sources import CycleStopped
from worker.poll.sources.transactions import TransactionsSource
from worker.sim import SimConfig, Simulator
from worker.sim import query as simquery

PER_PAGE = 5
PAGE_CAP = 15
LOOKBACK_S = 0.5


#: One step before a page read: milliseconds to move the clock, transitions to make, transactions to delete.
Step = tuple[int, int, int]


class InterleavingApi:
    """``transactions_query`` on the simulator, applying a scheduled step before each read."""

    def __init__(self, sim: Simulator, clock: ManualClock, schedule: list[Step]) -> None:
        self.sim = sim
        self.clock = clock
        self.schedule = schedule
        self.reads = 0
        self.deleted: set[UUID] = set()
        #: transactions the API sends in a shape we cannot read, every time.
        self.poisoned: set[UUID] = set()
        #: the API's clock at each answer: a first start without --since begins at one of them.
        self.answered_at: list[datetime] = []

    def delete_some(self, count: int) -> None:
        """Delete ``count`` transactions, spread over the order the source pages in."""
        ids = sorted(self.sim.store.transactions)
        for k in range(min(count, len(ids))):
            victim = ids[(self.reads * 7 + k * 13) % len(ids)]
            if victim not in self.deleted:
                self.sim.store.delete_transaction(victim)
                self.deleted.add(victim)

    async def transactions_query(
        self,
        *,
        page: int | None = None,
        per_page: int | None = None,
        **filters: Unpack[TransactionFilters],
    ) -> Page[Transaction]:
        if self.schedule:
            advance_ms, transitions, deletions = self.schedule.pop(0)
            self.clock.advance(advance_ms)
            self.sim.traffic.step(transitions)
            self.delete_some(deletions)
        self.reads += 1
        self.answered_at.append(self.clock())
        params = encode_params({**transaction_query_params(filters), "page": page, "perPage": per_page})
        q = simquery.parse_transaction_query(params)
        found = simquery.query_transactions(self.sim.store, q, page_cap=PAGE_CAP)
        body = wire.decode(
            wire.encode(simquery.render_document(self.sim.store, found.items, meta=found.meta))
        )
        for item in body["data"]:
            if UUID(item["id"]) in self.poisoned:
                item["attributes"]["transitions"] = "not a list"
        page = parse_page(Transaction, body)
        # The API's clock rides on every answer (the host's, in the source, is offset from it).
        return page.model_copy(update={"served_at": self.clock()})


async def deliver_all(
    sim: Simulator,
    clock: ManualClock,
    schedule: list[Step],
    since: datetime | None,
    *,
    cuts: Sequence[int] = (),
    downtimes: Sequence[Sequence[tuple[int, int]]] = (),
    poisoned: int = 0,
    host_ahead_ms: int = 0,
) -> tuple[MemorySink, InterleavingApi]:
    """Cycle until quiet, each cycle with a fresh source (a new process, as for a CronJob).

    ``cuts``: per cycle, the save after which it dies (odd) or stops at its deadline
    (even); 0 lets it finish. ``downtimes``: per cycle, traffic made while no poller
    runs before it (clock steps and transitions).
    """
    api = InterleavingApi(sim, clock, schedule)
    api.poisoned = set(sorted(sim.store.transactions)[:poisoned])
    sink = MemorySink()

    def host_clock() -> datetime:
        return clock() + timedelta(milliseconds=host_ahead_ms)

    cut_plan, down_plan = list(cuts), list(downtimes)
    quiet_cycles = 0
    while quiet_cycles < 2:
        for advance_ms, transitions in down_plan.pop(0) if down_plan else ():
            clock.advance(advance_ms)
            sim.traffic.step(transitions)
        busy = bool(api.schedule)
        clock.advance(100)  # the idle interval between cycles
        source = TransactionsSource(
            api, lookback_s=LOOKBACK_S, start_at=since, per_page=PER_PAGE, page_cap=PAGE_CAP, clock=host_clock
        )
        cut = cut_plan.pop(0) if cut_plan else 0
        if cut:
            if cut % 2:
                sink.crash_at_save = sink.saves + cut
            else:
                sink.stop_at_save = sink.saves + cut
        try:
            await source.cycle(sink.state, sink)
        except (Crash, CycleStopped):
            sink.crash_at_save = sink.stop_at_save = None
            quiet_cycles = 0
            continue
        sink.crash_at_save = sink.stop_at_save = None
        quiet_cycles = 0 if busy or down_plan else quiet_cycles + 1
    return sink, api


STEPS = st.tuples(
    st.sampled_from([1, 1, 5, 200, 700, 3000]),
    st.integers(min_value=0, max_value=12),
    st.sampled_from([0, 0, 0, 0, 1, 2]),
)
#: Traffic while no poller runs: minutes to hours in steps, so a catch-up moves the watermark far.
DOWNTIME = st.lists(
    st.tuples(st.sampled_from([1, 60_000, 1_200_000, 2_700_000]), st.integers(min_value=0, max_value=6)),
    max_size=4,
)


#: CI runs a couple of hundred examples; FLEXWORKER_PROPERTY_EXAMPLES=5000 searches far longer.
EXAMPLES = int(os.environ.get("FLEXWORKER_PROPERTY_EXAMPLES", "200"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=10_000),
    initial=st.integers(min_value=0, max_value=40),
    schedule=st.lists(STEPS, min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=6), max_size=8),
    downtimes=st.lists(DOWNTIME, max_size=4),
    poisoned=st.sampled_from([0, 0, 1, 3]),
    host_ahead_ms=st.sampled_from([0, 60_000, -60_000]),
    from_api_clock=st.booleans(),
)
# Found by this test: a transaction moved while an earlier createdAt window was walked,
# and a later window showed a newer transition; the watermark must be the cycle's head.
@example(
    seed=0,
    initial=2,
    schedule=[
        (1, 12, 0),
        *[(1, 0, 0)] * 5,
        (1, 7, 0),
        (1, 12, 0),
        (1, 8, 0),
        (1, 0, 0),
        (1, 4, 0),
        (1, 0, 0),
        (1, 0, 0),
        (1, 2, 0),
        (700, 1, 0),
    ],
    cuts=[],
    downtimes=[],
    poisoned=0,
    host_ahead_ms=0,
    from_api_clock=False,
)
# Found by this test (issue 8 C): a cycle cut short, then 65 minutes of traffic while no poller
# ran; the catch-up stepped over a transaction whose older transitions were older than its
# threshold minus an hour, but newer than the previous cycle's threshold.
@example(
    seed=168,
    initial=5,
    schedule=[(1, 1, 0)],
    cuts=[1, 2],
    downtimes=[[(1, 2)], [(1_200_000, 6), (2_700_000, 6)], [(1, 3)]],
    poisoned=0,
    host_ahead_ms=0,
    from_api_clock=False,
)
# Found by this test: a transaction dodged two cycles in a row (it moved during each walk), with
# 65 minutes of downtime between them; the previous threshold alone no longer reached back.
@example(
    seed=249,
    initial=25,
    schedule=[(1, 6, 0), (1, 4, 0), (1, 0, 0), (1, 1, 0), (1, 5, 0)],
    cuts=[],
    downtimes=[[(1, 4), (1, 6), (1, 6), (60_000, 1)], [(1_200_000, 0), (2_700_000, 4)]],
    poisoned=0,
    host_ahead_ms=0,
    from_api_clock=False,
)
# Found by this test: the oldest transaction could not be read, and the windows walk that needs
# it found no start and walked nothing.
@example(
    seed=0,
    initial=1,
    schedule=[(1, 4, 0), (1, 12, 0), (1, 0, 0), (1, 4, 0), (1, 12, 0), (1, 12, 0)],
    cuts=[],
    downtimes=[],
    poisoned=1,
    host_ahead_ms=0,
    from_api_clock=False,
)
def test_delivered_equals_ground_truth(
    seed: int,
    initial: int,
    schedule: list[Step],
    cuts: list[int],
    downtimes: list[list[tuple[int, int]]],
    poisoned: int,
    host_ahead_ms: int,
    from_api_clock: bool,
) -> None:
    """Delivered == ground truth, however cycles are cut, the clocks disagree or items are bad.

    ``from_api_clock``: no ``--since``; the first start takes the API's clock from an answer,
    so what comes after it is due (and nothing a lookback before it is delivered).
    """
    clock = ManualClock()
    sim = Simulator(SimConfig(seed=seed, rate_limits=None, page_cap=PAGE_CAP, clock=clock))
    for _ in range(initial):
        clock.advance(1)
        sim.traffic.step(1)
    since = None if from_api_clock else datetime(2026, 6, 1, tzinfo=UTC) - timedelta(milliseconds=1)
    sink, api = asyncio.run(
        deliver_all(
            sim,
            clock,
            list(schedule),
            since,
            cuts=cuts,
            downtimes=downtimes,
            poisoned=poisoned,
            host_ahead_ms=host_ahead_ms,
        )
    )
    delivered = sink.delivered
    # Where the first start was pinned: with no --since, at the API's clock of an answer (never
    # the host's); a run that died before pinning it started nothing.
    assert sink.state.floor is not None
    started = from_ms(sink.state.floor + int(LOOKBACK_S * 1000))
    assert since is not None or started in api.answered_at
    truth = [event_key(t.transaction_id, t.transition, t.created_at) for t in sim.transition_log]
    made_down = sum(n for downtime in downtimes for _, n in downtime)
    assert len(truth) == initial + sum(n for _, n, _ in schedule) + made_down
    assert len(set(truth)) == len(truth)
    # Every transition due of a transaction that still exists and can be read is delivered, once;
    # of one deleted before the poller saw it, nothing can be; of a bad one, nothing is; nothing
    # is made up.
    due = [
        t
        for t in sim.transition_log
        if t.transaction_id not in api.deleted | api.poisoned
        and (since is not None or t.created_at > started)
    ]
    due_keys = {event_key(t.transaction_id, t.transition, t.created_at) for t in due}
    assert len(delivered) == len(set(delivered))
    assert due_keys <= set(delivered) <= set(truth)
    if from_api_clock:
        assert all(int(key.rsplit("/", 1)[1]) > to_ms(started) - 1000 * LOOKBACK_S for key in delivered)
    # A bad transaction is recorded and skipped, never a stall.
    read_poisoned = {UUID(resource_id) for _, resource_id, _ in sink.skipped}
    assert read_poisoned <= api.poisoned
    assert api.reads >= 1


def test_a_transaction_that_keeps_moving_is_caught() -> None:
    """The case that needs the history window: a transaction moves while its page is unread."""
    clock = ManualClock()
    since = clock() - timedelta(milliseconds=1)
    sim = Simulator(SimConfig(seed=11, rate_limits=None, page_cap=PAGE_CAP, clock=clock))
    sim.traffic.step(30)
    sink, _ = asyncio.run(deliver_all(sim, clock, [(0, 0, 0)] + [(1000, 3, 0)] * 9, since))
    delivered = sink.delivered
    truth = [event_key(t.transaction_id, t.transition, t.created_at) for t in sim.transition_log]
    assert sorted(delivered) == sorted(truth)
