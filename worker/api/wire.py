"""Wire formats of the Integration API: JSON and Transit, both ways.

Documents are built as plain trees (dicts, lists, str, numbers, bools, None) whose
leaves may also be :class:`uuid.UUID`, aware :class:`datetime.datetime` and
:class:`Money`. :func:`encode` writes such a tree as JSON (UUIDs as strings, times
as ISO 8601 with milliseconds, money as ``{"amount", "currency"}``) or as Transit
with the tags Flex uses (``~u`` UUIDs, ``~m`` instants, ``mn`` money, ``geo``
points, keyword keys). :func:`decode` turns either format back into the JSON form,
so everything above this module sees one shape whatever the server spoke.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from transit.reader import Reader
from transit.transit_types import Boolean, Keyword, Symbol, TaggedValue
from transit.writer import Writer

__all__ = [
    "JSON_MIME",
    "TRANSIT_MIME",
    "Money",
    "WireFormatError",
    "decode",
    "encode",
    "format_time",
    "parse_time",
]

JSON_MIME = "application/json"
TRANSIT_MIME = "application/transit+json"


class WireFormatError(ValueError):
    """A body could not be decoded (callers wrap it in their own error)."""


@dataclass(frozen=True)
class Money:
    """An amount in the currency's minor units, as the API carries it."""

    amount: int
    currency: str


def format_time(at: datetime) -> str:
    """ISO 8601 in UTC with millisecond precision and a ``Z``, as the API writes times."""
    if at.tzinfo is None:
        raise ValueError("naive datetime: the API only speaks UTC instants")
    at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 instant (``Z`` or an offset) into an aware UTC datetime."""
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC)


def _json_default(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, Money):
        return {"amount": value.amount, "currency": value.currency}
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _to_transit(value: Any) -> Any:
    if isinstance(value, Mapping):
        out = {Keyword(k) if isinstance(k, str) else k: _to_transit(v) for k, v in value.items()}
        if isinstance(value.get("type"), str):
            # Flex sends resource types as keywords (``~:transaction``).
            out[Keyword("type")] = Keyword(value["type"])
        return out
    if isinstance(value, list | tuple):
        return [_to_transit(v) for v in value]
    if isinstance(value, Money):
        return TaggedValue("mn", [value.amount, value.currency])
    if isinstance(value, datetime):
        # transit-python writes datetimes as ~m milliseconds, which is what Flex sends.
        return value.astimezone(UTC)
    return value


def _from_transit(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {_from_transit(k): _from_transit(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_from_transit(v) for v in value]
    if isinstance(value, Keyword | Symbol):
        return str(value)
    if isinstance(value, Boolean):
        # transit-python's own booleans keep true apart from 1 in sets; we want plain bools.
        return bool(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return format_time(value if value.tzinfo else value.replace(tzinfo=UTC))
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, TaggedValue):
        rep = list(value.rep) if isinstance(value.rep, list | tuple) else value.rep
        if value.tag == "mn" and isinstance(rep, list) and len(rep) == 2:
            return {"amount": int(rep[0]), "currency": str(rep[1])}
        if value.tag == "geo" and isinstance(rep, list) and len(rep) == 2:
            return {"lat": float(rep[0]), "lng": float(rep[1])}
        return {"tag": value.tag, "value": _from_transit(value.rep)}
    return value


def encode(tree: Any, mime: str = JSON_MIME) -> bytes:
    """Serialise a document tree as JSON (default) or Transit."""
    if mime == TRANSIT_MIME:
        out = io.StringIO()
        Writer(out, "json").write(_to_transit(tree))
        return out.getvalue().encode()
    return json.dumps(tree, default=_json_default, separators=(",", ":")).encode()


def decode(body: bytes, mime: str = JSON_MIME) -> Any:
    """Parse a JSON or Transit body into the JSON form; raise :class:`WireFormatError`."""
    try:
        text = body.decode("utf-8")
        if mime == TRANSIT_MIME:
            return _from_transit(Reader("json").read(io.StringIO(text)))
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise WireFormatError(f"malformed {mime} body: {exc}") from exc
