"""Wire formats of the Integration API: JSON and Transit, both ways.

Documents are built as plain trees (dicts, lists, str, numbers, bools, None) whose
leaves may also be :class:`uuid.UUID`, aware :class:`datetime.datetime`,
:class:`decimal.Decimal` and :class:`Money`. :func:`encode` writes such a tree as
JSON (UUIDs as strings, times as ISO 8601 with milliseconds, decimals as exact
numbers, money as ``{"amount", "currency"}``) or as Transit with the tags Flex uses
(``~u`` UUIDs, ``~m`` instants, ``~f`` decimals, ``mn`` money, ``geo`` points,
keyword keys). :func:`decode` turns either format back into the JSON form, so
everything above this module sees one shape whatever the server spoke; a Transit
``~f`` decimal stays a :class:`~decimal.Decimal`, never a float that drops digits.

Flex writes the ``type`` of a resource as a keyword (``~:transaction``). Only
resources get that: the members ``data`` and ``included`` of a document, the
references under ``relationships`` and an event's ``resource``. Everything else,
extended data above all, is user data and keeps its strings: metadata
``{"type": "vip"}`` travels as the string ``"vip"``.
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


class _ExactDecimal(Exception):
    """The tree holds a Decimal: the fast encoder cannot write it exactly."""


def _json_default(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, Money):
        return {"amount": value.amount, "currency": value.currency}
    if isinstance(value, Decimal):
        raise _ExactDecimal
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _json_exact(value: Any, out: list[str]) -> None:
    """Write ``value`` as JSON into ``out``, decimals as the exact numbers they are.

    The standard encoder can only write a Decimal through float, which drops digits
    (``12345678901234567.891`` becomes ``12345678901234568``); this slower walk is
    used only for trees that hold one.
    """
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise TypeError(f"cannot encode the decimal {value} as JSON")
        out.append(str(value))  # Decimal's str is a valid JSON number (``1E+2``, ``-0.5``)
    elif isinstance(value, Mapping):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise TypeError(f"cannot encode a {type(key).__name__} key as JSON")
            out.append(("," if i else "") + json.dumps(str(key)) + ":")
            _json_exact(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _json_exact(item, out)
        out.append("]")
    elif value is None or isinstance(value, str | int | float):
        out.append(json.dumps(value))
    else:
        _json_exact(_json_default(value), out)


def _to_transit(value: Any) -> Any:
    """Plain data for Transit: keyword keys, tagged money and times; strings stay strings."""
    if isinstance(value, Mapping):
        return {Keyword(k) if isinstance(k, str) else k: _to_transit(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_transit(v) for v in value]
    if isinstance(value, Money):
        return TaggedValue("mn", [value.amount, value.currency])
    if isinstance(value, datetime):
        # transit-python writes datetimes as ~m milliseconds, which is what Flex sends.
        return value.astimezone(UTC)
    # Decimals pass through: transit-python writes them as ~f with every digit.
    return value


def _typed(value: Any) -> Any:
    """A resource or a reference: its ``type`` becomes a keyword, as Flex sends it."""
    if not isinstance(value, Mapping):
        return _to_transit(value)
    out = _to_transit(value)
    if isinstance(value.get("type"), str):
        out[Keyword("type")] = Keyword(value["type"])
    relationships = value.get("relationships")
    if isinstance(relationships, Mapping):
        out[Keyword("relationships")] = {
            Keyword(name) if isinstance(name, str) else name: _relationship(rel)
            for name, rel in relationships.items()
        }
    attributes = value.get("attributes")
    if value.get("type") == "event" and isinstance(attributes, Mapping):
        # An event carries the changed resource whole; it is a resource like any other.
        out[Keyword("attributes")] = {
            **_to_transit(attributes),
            **({Keyword("resource"): _typed(attributes["resource"])} if "resource" in attributes else {}),
        }
    return out


def _relationship(rel: Any) -> Any:
    if isinstance(rel, Mapping) and "data" in rel:
        return {**_to_transit(rel), Keyword("data"): _resources(rel["data"])}
    return _to_transit(rel)


def _resources(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_typed(v) for v in value]
    return _typed(value)


def _document_to_transit(tree: Any) -> Any:
    """A whole document: resources where JSON:API puts them, user data left as it is."""
    if not isinstance(tree, Mapping):
        return _to_transit(tree)
    out = _to_transit(tree)
    for member in ("data", "included"):
        if member in tree:
            out[Keyword(member)] = _resources(tree[member])
    return out


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
    if isinstance(value, TaggedValue):
        rep = list(value.rep) if isinstance(value.rep, list | tuple) else value.rep
        if value.tag == "mn" and isinstance(rep, list) and len(rep) == 2:
            return {"amount": int(rep[0]), "currency": str(rep[1])}
        if value.tag == "geo" and isinstance(rep, list) and len(rep) == 2:
            return {"lat": float(rep[0]), "lng": float(rep[1])}
        return {"tag": value.tag, "value": _from_transit(value.rep)}
    return value


def encode(tree: Any, mime: str = JSON_MIME) -> bytes:
    """Serialise a document tree (or a command body) as JSON (default) or Transit."""
    if mime == TRANSIT_MIME:
        out = io.StringIO()
        Writer(out, "json").write(_document_to_transit(tree))
        return out.getvalue().encode()
    try:
        return json.dumps(tree, default=_json_default, separators=(",", ":")).encode()
    except _ExactDecimal:
        parts: list[str] = []
        _json_exact(tree, parts)
        return "".join(parts).encode()


def decode(body: bytes, mime: str = JSON_MIME) -> Any:
    """Parse a JSON or Transit body into the JSON form; raise :class:`WireFormatError`."""
    try:
        text = body.decode("utf-8")
        if mime == TRANSIT_MIME:
            return _from_transit(Reader("json").read(io.StringIO(text)))
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise WireFormatError(f"malformed {mime} body: {exc}") from exc
