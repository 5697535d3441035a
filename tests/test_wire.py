"""JSON and Transit encode to trees that decode identically; bad bodies give our error."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
