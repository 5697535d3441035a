"""The transition event: one per transaction transition, whichever source saw it.

An event's :attr:`TransitionEvent.key` is derived from the transaction id, the
transition name and the transition's ``createdAt`` only, so the transactions
source, the events source, a re-poll after a crash and a replay all produce the
same key for the same transition, and the queue can refuse the second copy.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from worker.api.models import Listing, Transaction, TransitionRecord, User
from worker.api.wire import Money

# The resource types an event carries are part of the plugin API: handler authors import them
# from here, never from worker.api, whose layout may change.
__all__ = [
    "Listing",
    "Money",
    "SourceName",
    "Transaction",
    "TransitionEvent",
    "User",
    "event_from_api_event",
    "event_key",
    "events_from_transaction",
    "from_ms",
    "to_ms",
]

SourceName = Literal["transactions", "events"]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(at: datetime) -> int:
    """Milliseconds since the epoch, the API's time resolution (integer maths: floats drift)."""
    return (at - _EPOCH) // timedelta(milliseconds=1)


def from_ms(at_ms: int) -> datetime:
    """The aware UTC time ``at_ms`` milliseconds after the epoch (the inverse of :func:`to_ms`)."""
    return _EPOCH + at_ms * timedelta(milliseconds=1)


def event_key(transaction_id: UUID, transition: str, at: datetime) -> str:
    """The deterministic key of one transition."""
    return f"{transaction_id}/{transition}/{to_ms(at)}"


class TransitionEvent(BaseModel):
    """One transaction transition, as queued and handed to handlers."""

    model_config = ConfigDict(frozen=True)

    key: str
    transaction_id: UUID
    transition: str
    at: datetime
    by: str
    process_name: str
    process_version: int
    source: SourceName
    detected_at: datetime
    #: position of the transition in the transaction's history (0 = the first).
    index: int
    #: the transaction as the source saw it (for the events source: right after this transition).
    transaction: Transaction
    customer: User | None = None
    provider: User | None = None
    listing: Listing | None = None
    #: events source only: the event's sequence id and the changed attributes before the change.
    sequence_id: int | None = None
    previous_values: dict[str, Any] | None = None

    @property
    def at_ms(self) -> int:
        return to_ms(self.at)


def _event(
    tx: Transaction,
    record: TransitionRecord,
    index: int,
    *,
    source: SourceName,
    detected_at: datetime,
    sequence_id: int | None = None,
    previous_values: dict[str, Any] | None = None,
) -> TransitionEvent:
    return TransitionEvent(
        key=event_key(tx.id, record.transition, record.created_at),
        transaction_id=tx.id,
        transition=record.transition,
        at=record.created_at,
        by=record.by,
        process_name=tx.attributes.process_name,
        process_version=tx.attributes.process_version,
        source=source,
        detected_at=detected_at,
        index=index,
        transaction=tx,
        customer=tx.customer,
        provider=tx.provider,
        listing=tx.listing,
        sequence_id=sequence_id,
        previous_values=previous_values,
    )


def events_from_transaction(
    tx: Transaction,
    *,
    newer_than: datetime | None,
    source: SourceName,
    detected_at: datetime | None = None,
) -> list[TransitionEvent]:
    """Every transition of ``tx`` with ``createdAt`` after ``newer_than`` (all when None), in order."""
    detected_at = detected_at or datetime.now(UTC)
    return [
        _event(tx, record, index, source=source, detected_at=detected_at)
        for index, record in enumerate(tx.attributes.transitions)
        if newer_than is None or record.created_at > newer_than
    ]


def event_from_api_event(
    tx: Transaction,
    event_type: str,
    *,
    sequence_id: int,
    previous_values: dict[str, Any] | None,
    detected_at: datetime | None = None,
) -> TransitionEvent | None:
    """The transition an Integration API ``transaction/*`` event reports, or None for other types."""
    transitions = tx.attributes.transitions
    if not transitions or event_type not in ("transaction/initiated", "transaction/transitioned"):
        return None
    index = 0 if event_type == "transaction/initiated" else len(transitions) - 1
    return _event(
        tx,
        transitions[index],
        index,
        source="events",
        detected_at=detected_at or datetime.now(UTC),
        sequence_id=sequence_id,
        previous_values=previous_values,
    )
