"""Query parameters of the Integration API: names, filters and their encoding.

The API reads arrays comma-joined, times as ISO 8601 UTC with milliseconds, and
booleans as ``true``/``false``; :func:`encode_params` writes every value that way.
:class:`TransactionFilters` are the typed filters of ``transactions/query`` under
Python names, :func:`transaction_query_params` their wire names.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import TypedDict
from uuid import UUID

from worker.api import wire

__all__ = [
    "FieldSets",
    "Id",
    "Names",
    "TransactionFilters",
    "encode_params",
    "shape_params",
    "transaction_query_params",
]

#: A resource id, as a UUID or its string.
Id = UUID | str
#: One name or several (sent comma-joined).
Names = str | Sequence[str]
#: Sparse attributes: resource type -> the attributes to return.
FieldSets = Mapping[str, Sequence[str]]


class TransactionFilters(TypedDict, total=False):
    """Filters and shaping of ``transactions/query``.

    ``sort`` keys follow Sharetribe's convention: a bare key sorts newest first, a
    ``-`` prefix oldest first (``"lastTransitionedAt"`` = most recently transitioned).
    """

    created_at_start: datetime
    created_at_end: datetime
    customer_id: Id
    provider_id: Id
    listing_id: Id
    last_transitions: Names
    process_names: Names
    states: Names
    booking_start: datetime
    booking_end: datetime
    has_booking: bool
    has_payin: bool
    has_message: bool
    sort: Names
    include: Names
    fields: FieldSets


_TRANSACTION_FILTER_NAMES: Mapping[str, str] = {
    "created_at_start": "createdAtStart",
    "created_at_end": "createdAtEnd",
    "customer_id": "customerId",
    "provider_id": "providerId",
    "listing_id": "listingId",
    "last_transitions": "lastTransitions",
    "process_names": "processNames",
    "states": "states",
    "booking_start": "bookingStart",
    "booking_end": "bookingEnd",
    "has_booking": "hasBooking",
    "has_payin": "hasPayin",
    "has_message": "hasMessage",
    "sort": "sort",
}


def _encode_value(value: object) -> str | None:
    # bool before int: bool is an int, and the API wants "true", not "True" or "1".
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return wire.format_time(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple | set | frozenset):
        items = [_encode_value(v) for v in value if v is not None]
        # Sets have no order; sorting keeps URLs (and caches, logs, tests) stable.
        parts = [p for p in items if p is not None]
        return ",".join(sorted(parts) if isinstance(value, set | frozenset) else parts)
    raise TypeError(f"cannot encode {type(value).__name__} as a query parameter")


def encode_params(params: Mapping[str, object]) -> dict[str, str]:
    """Query parameters as the API reads them.

    Sequences are comma-joined, datetimes ISO 8601 UTC with milliseconds, UUIDs as
    strings, booleans ``true``/``false``; ``None`` values and empty sequences are left out.
    """
    out: dict[str, str] = {}
    for name, value in params.items():
        if value is None or (isinstance(value, list | tuple | set | frozenset) and not value):
            continue
        encoded = _encode_value(value)
        if encoded is not None:
            out[name] = encoded
    return out


def transaction_query_params(filters: TransactionFilters) -> dict[str, object]:
    """The ``transactions/query`` parameters (wire names, unencoded) for ``filters``."""
    params: dict[str, object] = {}
    for name, value in filters.items():
        wire_name = _TRANSACTION_FILTER_NAMES.get(name)
        if wire_name is not None:
            params[wire_name] = value
    params.update(shape_params(filters.get("include"), filters.get("fields")))
    return params


def shape_params(include: Names | None, fields: FieldSets | None) -> dict[str, object]:
    """``include`` and sparse ``fields.<type>`` parameters (unencoded)."""
    params: dict[str, object] = {"include": include}
    for resource_type, names in (fields or {}).items():
        params[f"fields.{resource_type}"] = names
    return params
