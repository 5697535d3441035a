"""The events source: ``events/query`` from a ``sequenceId`` cursor.

``sequenceId`` is unique and strictly increasing, so it is the one safe cursor
(``createdAt`` is not unique). Without a stored cursor the first cycle starts at
``createdAtStart`` = the configured start (or now). ``transaction/initiated`` and
``transaction/transitioned`` events become transition events with the same keys
the transactions source gives; other types are skipped. A full page means more
is waiting, so the cycle asks again at once; a short page ends it.

An event carries the transaction as it was right after the change, but no related
resources. When ``include`` asks for them, the source fetches each transaction of a
page once with ``transactions/show?include=…`` and attaches the customer, provider
and listing as they are now: one more query per transaction, paced by the rate
limiter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol
from uuid import UUID

import structlog

from worker.api.models import Event, Page, Transaction
from worker.events import SourceName, TransitionEvent, event_from_api_event
from worker.poll.sources import CycleReport, Emit

__all__ = ["EVENT_TYPES", "EventPages", "EventsSource", "FetchRelated"]

EVENT_TYPES = ("transaction/initiated", "transaction/transitioned")
PAGE_SIZE = 100

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

    async def cycle(self, cursor: int | None, emit: Emit, *, floor: int | None = None) -> CycleReport:
        sequence_id = cursor
        if self._start_at is None:
            # Fixed at the first cycle: a start that moved with the clock would skip
            # events created between two empty cycles.
            self._start_at = self._clock()
        start_at = self._start_at
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
            full = len(page.data) >= PAGE_SIZE
            batch = await self._with_related(self._transition_events(page.data))
            if batch:
                events += await emit(batch)
            if page.data:
                sequence_id = page.data[-1].attributes.sequence_id
        return CycleReport(cursor=sequence_id, events=events, pages=pages, more=full)

    async def _with_related(self, batch: list[TransitionEvent]) -> list[TransitionEvent]:
        if self._fetch_related is None or not batch:
            return batch
        related: dict[UUID, Transaction] = {}
        for event in batch:
            if event.transaction_id not in related:
                related[event.transaction_id] = await self._fetch_related(event.transaction_id)
        return [
            event.model_copy(
                update={
                    "customer": related[event.transaction_id].customer,
                    "provider": related[event.transaction_id].provider,
                    "listing": related[event.transaction_id].listing,
                }
            )
            for event in batch
        ]

    def _transition_events(self, api_events: Sequence[Event]) -> list[TransitionEvent]:
        detected_at = self._clock()
        batch = []
        for api_event in api_events:
            attributes = api_event.attributes
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
            if event is None:
                log.debug("event skipped", type=attributes.event_type, sequence_id=attributes.sequence_id)
                continue
            batch.append(event)
        return batch
