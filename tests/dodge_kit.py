"""The simulator in process, driven by hand: hooks before chosen page reads, single moves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Unpack
from uuid import UUID

from worker.api import wire
from worker.api.client import TransactionFilters, encode_params, transaction_query_params
from worker.api.models import Event, Page, Transaction, parse_page
from worker.events import event_key
from worker.processes import PROCESSES
from worker.sim import SimConfig, Simulator
from worker.sim import query as simquery


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 6, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += timedelta(milliseconds=ms)


class HookApi:
    """transactions_query on the sim; ``hooks[n]`` runs before the n-th read (1-based)."""

    def __init__(self, sim: Simulator, clock: Clock, page_cap: int) -> None:
        self.sim, self.clock, self.page_cap = sim, clock, page_cap
        self.reads = 0
        self.hooks: dict[int, Callable[[], None]] = {}
        self.log: list[tuple[int, Any]] = []
        self.send_date = True

    async def transactions_query(
        self, *, page: int | None = None, per_page: int | None = None, **filters: Unpack[TransactionFilters]
    ) -> Page[Transaction]:
        self.reads += 1
        hook = self.hooks.pop(self.reads, None)
        if hook:
            hook()
        self.clock.advance(1)
        params = encode_params({**transaction_query_params(filters), "page": page, "perPage": per_page})
        self.log.append((self.reads, params))
        q = simquery.parse_transaction_query(params)
        found = simquery.query_transactions(self.sim.store, q, page_cap=self.page_cap)
        document = simquery.render_document(self.sim.store, found.items, meta=found.meta)
        body = wire.decode(wire.encode(document))
        p = parse_page(Transaction, body)
        return p.model_copy(update={"served_at": self.clock() if self.send_date else None})


def make_sim(clock: Clock, page_cap: int) -> Simulator:
    sim = Simulator(SimConfig(seed=1, rate_limits=None, page_cap=page_cap, clock=clock))
    sim.traffic.setup()
    return sim


def new_tx(sim: Simulator, i: int = 0) -> UUID:
    """A new transaction (its initial transition now)."""
    listing = sim.traffic.listings[i % len(sim.traffic.listings)]
    customer = next(u for u in sim.traffic.users if u.id != listing.author_id)
    proc = PROCESSES[listing.process_name]
    first = proc.initial_transitions[0]
    return sim.store.initiate_transaction(listing.id, customer.id, first.name).id


def move(sim: Simulator, tx_id: UUID) -> str:
    """Apply one transition now (preferring one that leaves it open)."""
    tx = sim.store.transaction(tx_id)
    options = tx.process.next_transitions(tx.state)
    assert options, "final"
    options = sorted(options, key=lambda t: tx.process.is_final(t.to_state))
    sim.store.apply_transition(tx_id, options[0].name)
    return options[0].name


def truth(sim: Simulator) -> list[str]:
    return [event_key(t.transaction_id, t.transition, t.created_at) for t in sim.transition_log]


class EventsApi:
    def __init__(self, sim: Simulator, clock: Clock) -> None:
        self.sim, self.clock = sim, clock
        self.reads = 0
        self.send_date = True

    async def events_query(
        self,
        *,
        start_after_sequence_id: int | None = None,
        created_at_start: datetime | None = None,
        event_types: Sequence[str] | None = None,
        resource_id: UUID | str | None = None,
        related_resource_id: UUID | str | None = None,
        per_page: int | None = None,
    ) -> Page[Event]:
        self.reads += 1
        params = encode_params(
            {
                "startAfterSequenceId": start_after_sequence_id,
                "createdAtStart": created_at_start,
                "eventTypes": event_types,
                "resourceId": resource_id,
                "relatedResourceId": related_resource_id,
                "perPage": per_page,
            }
        )
        q = simquery.parse_events_query(params)
        events = simquery.query_events(self.sim.store, q)
        document = simquery.render_document(self.sim.store, events, meta=simquery.events_meta(q))
        body = wire.decode(wire.encode(document))
        p = parse_page(Event, body)
        return p.model_copy(update={"served_at": self.clock() if self.send_date else None})
