"""Resource models: typed reads, included resolution, tolerance of unknown fields, clear errors."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest

from worker.api.models import Event, Transaction, parse_document, parse_error_details, parse_page
from worker.errors import DecodeError, ResourceError

TX_ID = "ef98e897-5b81-49a5-aca6-01d9759df075"
CUSTOMER_ID = "3c073fae-6172-4e75-8b92-f560d58cd47c"
LISTING_ID = "c6ff7190-bdf7-47a0-8a2b-e3136e74334f"


def transaction(**overrides: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "createdAt": "2024-03-27T12:30:02.000Z",
        "processName": "default-booking",
        "processVersion": 1,
        "state": "state/preauthorized",
        "lastTransition": "transition/confirm-payment",
        "lastTransitionedAt": "2024-03-27T12:30:03.100Z",
        "payinTotal": {"amount": 3180, "currency": "USD"},
        "lineItems": [
            {
                "code": "line-item/night",
                "quantity": 2,
                "unitPrice": {"amount": 1590, "currency": "USD"},
                "lineTotal": {"amount": 3180, "currency": "USD"},
                "includeFor": ["customer", "provider"],
                "reversal": False,
            }
        ],
        "protectedData": {},
        "metadata": {"crm": "x"},
        "transitions": [
            {
                "transition": "transition/request-payment",
                "createdAt": "2024-03-27T12:30:02.000Z",
                "by": "customer",
            },
            {
                "transition": "transition/confirm-payment",
                "createdAt": "2024-03-27T12:30:03.100Z",
                "by": "customer",
            },
        ],
        "someFutureAttribute": {"nested": True},
    }
    attributes.update(overrides)
    return {
        "id": TX_ID,
        "type": "transaction",
        "attributes": attributes,
        "relationships": {
            "customer": {"data": {"id": CUSTOMER_ID, "type": "user"}},
            "listing": {"data": {"id": LISTING_ID, "type": "listing"}},
        },
    }


INCLUDED = [
    {
        "id": CUSTOMER_ID,
        "type": "user",
        "attributes": {
            "createdAt": "2020-01-01T00:00:00.000Z",
            "email": "joe@example.com",
            "profile": {"displayName": "Joe D", "protectedData": {"phoneNumber": "+358401234567"}},
        },
    },
    {
        "id": LISTING_ID,
        "type": "listing",
        "attributes": {"createdAt": "2020-01-01T00:00:00.000Z", "title": "Bike", "price": None},
    },
]


def test_transaction_is_typed_and_keeps_unknown_fields() -> None:
    tx = parse_document(Transaction, {"data": transaction()})
    assert tx.id == UUID(TX_ID)
    assert tx.attributes.last_transitioned_at == datetime(2024, 3, 27, 12, 30, 3, 100000, tzinfo=UTC)
    assert [t.transition for t in tx.attributes.transitions] == [
        "transition/request-payment",
        "transition/confirm-payment",
    ]
    assert tx.attributes.payin_total is not None and tx.attributes.payin_total.amount == 3180
    assert tx.attributes.line_items[0].include_for == ["customer", "provider"]
    assert tx.attributes.model_extra == {"someFutureAttribute": {"nested": True}}
    assert tx.related_id("customer") == UUID(CUSTOMER_ID)
    assert tx.customer is None  # not included in this answer


def test_included_resources_are_resolved() -> None:
    page = parse_page(Transaction, {"data": [transaction()], "included": INCLUDED, "meta": {"totalItems": 1}})
    (tx,) = page.data
    assert tx.customer is not None and tx.customer.attributes.email == "joe@example.com"
    assert tx.customer.attributes.profile.protected_data["phoneNumber"] == "+358401234567"
    assert tx.listing is not None and tx.listing.attributes.title == "Bike"
    assert tx.provider is None
    assert page.meta.total_items == 1


def test_missing_required_field_names_resource() -> None:
    raw = transaction()
    del raw["attributes"]["lastTransitionedAt"]
    with pytest.raises(ResourceError) as info:
        parse_document(Transaction, {"data": raw})
    assert str(info.value).startswith(f"transaction {TX_ID}: field 'attributes.lastTransitionedAt'")


def test_broken_included_resource_is_named() -> None:
    broken_user = {"id": CUSTOMER_ID, "type": "user", "attributes": {"email": "x"}}
    with pytest.raises(ResourceError, match=f"user {CUSTOMER_ID}: field 'attributes.createdAt'"):
        parse_page(Transaction, {"data": [transaction()], "included": [broken_user]})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "no 'data'"),
        ({"errors": []}, "no 'data'"),
        ({"data": {}}, "not an array"),
        ({"data": [], "included": {}}, "'included' is not an array"),
        ({"data": [], "meta": {"totalItems": "many"}}, "'meta' is invalid"),
    ],
)
def test_malformed_documents(body: Any, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        parse_page(Transaction, body)


def test_event_carries_transaction_snapshot() -> None:
    raw = {
        "id": "11111111-5b81-49a5-aca6-01d9759df075",
        "type": "event",
        "attributes": {
            "sequenceId": 42,
            "createdAt": "2024-03-27T12:30:03.150Z",
            "eventType": "transaction/transitioned",
            "source": "source/transaction",
            "resourceId": TX_ID,
            "resourceType": "transaction",
            "resource": transaction(),
            "previousValues": {"attributes": {"lastTransition": "transition/request-payment"}},
        },
    }
    (event,) = parse_page(Event, {"data": [raw]}).data
    assert event.attributes.sequence_id == 42
    snapshot = event.transaction()
    assert snapshot is not None and snapshot.attributes.last_transition == "transition/confirm-payment"


def test_error_envelope_parsing_tolerates_junk() -> None:
    details = parse_error_details(
        {
            "errors": [
                {
                    "id": "x",
                    "status": 400,
                    "code": "validation-invalid-params",
                    "title": "Invalid params",
                    "source": {"path": ["perPage"], "type": "query"},
                },
                "junk",
                {"status": "oops"},
            ]
        }
    )
    assert details[0].code == "validation-invalid-params"
    assert details[0].source_path == ("perPage",)
    assert len(details) == 2 and details[1].code == "unknown"
    assert parse_error_details("<html>502</html>") == []
