"""The events source: ``events/query`` from a ``sequenceId`` cursor.

``sequenceId`` is unique and strictly increasing, so it is the one safe cursor
(``createdAt`` is not unique). ``transaction/initiated`` and
``transaction/transitioned`` events become transition events with the same keys
the transactions source gives; other types are skipped. A full page means more
is waiting, so the cycle asks again at once; a short page ends it.

Progress is durable page by page: after each page's events are queued, the cursor
moves to the page's last ``sequenceId`` (with the ``createdAt`` it has read up to),
so a run cut short resumes after the last page it finished.

The first start (no cursor) reads from ``createdAtStart`` = ``--since``, or where the
transactions source left off (a switch, :data:`~worker.poll.sources.HANDOFF_MARGIN`
earlier), or the API's own clock (an answer's ``Date``; the host's clock may run
ahead, and then the first minute would be lost). That start is stored as the
source's floor before the first query, so a restart, or a ``poll --once`` run that
finds no event yet, starts from the same point: nothing between two runs is lost.

An event carries the transaction as it was right after the change, but no related
resources. When ``include`` asks for them, the source fetches each transaction of a
page once with ``transactions/show?include=…`` and attaches the customer, provider
and listing as they are now: one more query per transaction, paced by the rate
limiter. A transaction deleted since (404) has no related resources to give: its
event goes on without them. An event that cannot be turned into a transition event
is recorded as skipped, never a stall.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol
from uuid import UUID

import structlog
from pydantic import ValidationError

from worker.api.models import Event, Page, Transaction
from worker.errors import DecodeError, NotFoundError, ResourceError
from worker.events import SourceName, TransitionEvent, event_from_api_event, from_ms, to_ms
from worker.poll.cursor import SourceState
from worker.poll.sources import HANDOFF_MARGIN, CycleReport, Sink, api_time_ms, skip_reason

__all__ = ["EVENT_TYPES", "EventPages", "EventsSource", "FetchRelated"]

EVENT_TYPES = ("transaction/initiated", "transaction/transitioned")
PAGE_SIZE = 100
#: Without a ``Date`` from the API, a first start trusts the host's clock only this far.
CLOCK_MARGIN = timedelta(minutes=10)

log = structlog.get_logger(__name__)

#: Fetches a transaction with its related resources (``transactions/show?include=…``).
FetchRelated = Callable[[UUID], Awaitable[Transaction]]


class EventPages(Protocol):
    """The part of :class:`~worker.api.client.IntegrationClient` this source uses."""

    async def events_query(
        self,
        *,
        start_after_sequence_id: int | None = None,
        created_at_start: datetime | None = None,
        event_types: Sequence[str] | None = None,
        resource_id: UUID | str | None = None,
        related_resource_id: UUID | str | None = None,
        per_page: int | None = None,
    ) -> Page[Event]: ...


class EventsSource:
    """Sequence-id polling of ``events/query``."""

    name: SourceName = "events"

    def __init__(
        self,
        api: EventPages,
        *,
        start_at: datetime | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_pages_per_cycle: int = 50,
        fetch_related: FetchRelated | None = None,
    ) -> None:
        self._api = api
        self._fetch_related = fetch_related
        self._start_at = start_at
        self._clock = clock
        self._max_pages = max_pages_per_cycle

    async def cycle(self, state: SourceState, sink: Sink) -> CycleReport:
        sequence_id = state.cursor
        start_at: datetime | None = None
        if sequence_id is None:
            if state.floor is not None:
                start_at = from_ms(state.floor)
            else:
                start_at = await self._first_start(state)
                await sink.save(floor=to_ms(start_at))
        events = pages = 0
        full = True
        while full and pages < self._max_pages:
            page = await self._api.events_query(
                start_after_sequence_id=sequence_id,
                created_at_start=start_at if sequence_id is None else None,
                event_types=EVENT_TYPES,
                per_page=PAGE_SIZE,
            )
            pages += 1
            full = page.received >= PAGE_SIZE
            for rejected in page.rejected:
                name = str(rejected.sequence_id) if rejected.sequence_id is not None else rejected.id
                await sink.skip("event", name or "(no sequence id)", rejected.reason)
            batch = await self._with_related(await self._transition_events(page.data, sink))
            if batch:
                events += await sink.emit(batch)
            last_id = max(
                [e.attributes.sequence_id for e in page.data[-1:]]
                + [r.sequence_id for r in page.rejected if r.sequence_id is not None],
                default=None,
            )
            if last_id is not None and (sequence_id is None or last_id > sequence_id):
                sequence_id = last_id
                at = to_ms(page.data[-1].attributes.created_at) if page.data else None
                await sink.save(cursor=sequence_id, at=at)
        return CycleReport(cursor=sequence_id, events=events, pages=pages, more=full)

    async def _first_start(self, state: SourceState) -> datetime:
        if self._start_at is not None:
            return self._start_at
        if state.handoff is not None:
            return from_ms(state.handoff) - HANDOFF_MARGIN
        local = self._clock()
        probe = await self._api.events_query(created_at_start=local, event_types=EVENT_TYPES, per_page=1)
        served_ms = api_time_ms(probe)
        return from_ms(served_ms) if served_ms is not None else local - CLOCK_MARGIN

    async def _with_related(self, batch: list[TransitionEvent]) -> list[TransitionEvent]:
        if self._fetch_related is None or not batch:
            return batch
        related: dict[UUID, Transaction | None] = {}
        for event in batch:
            if event.transaction_id not in related:
                related[event.transaction_id] = await self._related(event.transaction_id)
        with_related = []
        for event in batch:
            tx = related[event.transaction_id]
            if tx is not None:
                event = event.model_copy(
                    update={"customer": tx.customer, "provider": tx.provider, "listing": tx.listing}
                )
            with_related.append(event)
        return with_related

    async def _related(self, transaction_id: UUID) -> Transaction | None:
        assert self._fetch_related is not None
        try:
            return await self._fetch_related(transaction_id)
        except (NotFoundError, DecodeError):
            # Deleted since its event, or no longer readable: the transition happened all the same;
            # it goes on without them.
            log.info(
                "transaction gone; event goes on without related resources", transaction=str(transaction_id)
            )
            return None

    async def _transition_events(self, api_events: Sequence[Event], sink: Sink) -> list[TransitionEvent]:
        detected_at = self._clock()
        batch = []
        for api_event in api_events:
            attributes = api_event.attributes
            try:
                tx = api_event.transaction()
                event = (
                    event_from_api_event(
                        tx,
                        attributes.event_type,
                        sequence_id=attributes.sequence_id,
                        previous_values=attributes.previous_values,
                        detected_at=detected_at,
                    )
                    if tx is not None
                    else None
                )
            except (ResourceError, ValidationError) as exc:
                await sink.skip("event", str(attributes.sequence_id), skip_reason(exc))
                continue
            if event is None:
                log.debug("event skipped", type=attributes.event_type, sequence_id=attributes.sequence_id)
                continue
            batch.append(event)
        return batch
