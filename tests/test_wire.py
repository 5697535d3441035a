"""JSON and Transit encode to trees that decode identically; bad bodies give our error."""

from __future__ import annotations

import io
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transit.reader import Reader
from transit.transit_types import Keyword

from worker.api.wire import (
    JSON_MIME,
    TRANSIT_MIME,
    Money,
    WireFormatError,
    decode,
    encode,
    format_time,
    parse_time,
)

instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
).map(lambda at: at.replace(microsecond=at.microsecond // 1000 * 1000))
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.text(max_size=20).filter(lambda s: not s.startswith(("~", "^"))),
    st.uuids(),
    instants,
    st.builds(Money, st.integers(min_value=-(10**9), max_value=10**9), st.sampled_from(["EUR", "USD"])),
)
keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC/-", min_size=1, max_size=12)
trees = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=20,
)


@given(trees)
def test_transit_and_json_decode_to_the_same_tree(tree: object) -> None:
    assert decode(encode(tree, TRANSIT_MIME), TRANSIT_MIME) == decode(encode(tree, JSON_MIME), JSON_MIME)


def test_flex_tags_are_used() -> None:
    tx_id = uuid.UUID("3c073fae-6172-4e75-8b92-f560d58cd47c")
    at = datetime(2018, 3, 27, 12, 30, 3, 100000, tzinfo=UTC)
    body = encode(
        {"data": {"id": tx_id, "type": "transaction", "attributes": {"at": at, "total": Money(3180, "USD")}}},
        TRANSIT_MIME,
    ).decode()
    assert "~u3c073fae-6172-4e75-8b92-f560d58cd47c" in body
    assert "~m1522153803100" in body
    assert '["~#mn",[3180,"USD"]]' in body
    assert '"~:type","~:transaction"' in body


def test_decodes_transit_written_with_caching() -> None:
    # Map keys repeated in one document are sent as cache references (^0, ^1...).
    body = (
        b'["^ ","~:data",[["^ ","~:id","~u3c073fae-6172-4e75-8b92-f560d58cd47c","~:type","~:user"],'
        b'["^ ","^1","~u6a177221-247e-42a9-9cca-403238b86d7c","^2","^3"]]]'
    )
    assert decode(body, TRANSIT_MIME) == {
        "data": [
            {"id": "3c073fae-6172-4e75-8b92-f560d58cd47c", "type": "user"},
            {"id": "6a177221-247e-42a9-9cca-403238b86d7c", "type": "user"},
        ]
    }


def test_time_format_is_utc_milliseconds() -> None:
    at = datetime(2024, 5, 1, 14, 0, 0, 123999, tzinfo=UTC) + timedelta(0)
    assert format_time(at) == "2024-05-01T14:00:00.123Z"
    assert parse_time("2024-05-01T16:00:00.123+02:00") == datetime(2024, 5, 1, 14, 0, 0, 123000, tzinfo=UTC)
    with pytest.raises(ValueError, match="naive"):
        format_time(datetime(2024, 5, 1))


@pytest.mark.parametrize(
    ("body", "mime"),
    [
        (b'{"data": [', JSON_MIME),
        (b"\xff\xfe", JSON_MIME),
        (b'["^ ","~:a"', TRANSIT_MIME),
        (b'["^ ","~:a"]', TRANSIT_MIME),
    ],
)
def test_malformed_bodies_raise_our_error(body: bytes, mime: str) -> None:
    with pytest.raises(WireFormatError, match="malformed"):
        decode(body, mime)


def keyword_values(body: bytes) -> list[str]:
    """Every keyword a Transit body holds as a value (map keys are keywords anyway)."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, Mapping):
            for value in node.values():
                walk(value)
        elif isinstance(node, list | tuple):
            for value in node:
                walk(value)
        elif isinstance(node, Keyword):
            found.append(str(node))

    walk(Reader("json").read(io.StringIO(body.decode())))
    return found


def test_transit_decimals_stay_exact() -> None:
    body = b'["^ ","~:quantity","~f12345678901234567.891","~:units",["~f0.1","~f-2E+3"]]'
    decoded = decode(body, TRANSIT_MIME)
    assert decoded == {
        "quantity": Decimal("12345678901234567.891"),
        "units": [Decimal("0.1"), Decimal("-2E+3")],
    }
    assert all(isinstance(v, Decimal) for v in [decoded["quantity"], *decoded["units"]])


def test_decimals_are_encoded_exactly_in_both_formats() -> None:
    tree = {"id": uuid.UUID(int=1), "metadata": {"price": Decimal("12345678901234567.891"), "n": 1.5}}
    assert encode(tree, JSON_MIME) == (
        b'{"id":"00000000-0000-0000-0000-000000000001","metadata":{"price":12345678901234567.891,"n":1.5}}'
    )
    transit = encode(tree, TRANSIT_MIME)
    assert b'"~f12345678901234567.891"' in transit
    assert decode(transit, TRANSIT_MIME)["metadata"]["price"] == Decimal("12345678901234567.891")
    with pytest.raises(TypeError, match="decimal"):
        encode({"x": Decimal("NaN")}, JSON_MIME)


def test_only_resource_types_become_keywords() -> None:
    user_id = uuid.UUID("3c073fae-6172-4e75-8b92-f560d58cd47c")
    tx_id = uuid.UUID("6a177221-247e-42a9-9cca-403238b86d7c")
    document = {
        "data": {
            "id": tx_id,
            "type": "transaction",
            "attributes": {"metadata": {"type": "vip", "tags": [{"type": "gold"}]}},
            "relationships": {"customer": {"data": {"id": user_id, "type": "user"}}},
        },
        "included": [
            {"id": user_id, "type": "user", "attributes": {"profile": {"publicData": {"type": "pro"}}}}
        ],
    }
    body = encode(document, TRANSIT_MIME)
    # The resource types, and nothing the user wrote.
    assert sorted(keyword_values(body)) == ["transaction", "user", "user"]
    assert decode(body, TRANSIT_MIME) == decode(encode(document), JSON_MIME)
    # A command body is all user data: nothing in it is a resource type.
    command = encode({"id": tx_id, "metadata": {"type": "vip"}}, TRANSIT_MIME)
    assert keyword_values(command) == []
    assert b'"~:type","vip"' in command


def test_an_events_resource_is_a_resource() -> None:
    event = {
        "data": [
            {
                "id": uuid.UUID(int=7),
                "type": "event",
                "attributes": {
                    "resourceType": "transaction",
                    "resource": {"id": uuid.UUID(int=8), "type": "transaction", "attributes": {}},
                    "previousValues": {"attributes": {"metadata": {"type": "old"}}},
                },
            }
        ]
    }
    assert sorted(keyword_values(encode(event, TRANSIT_MIME))) == ["event", "transaction"]
