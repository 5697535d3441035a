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


def test_broken_included_resource_is_absent_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    broken_user = {"id": CUSTOMER_ID, "type": "user", "attributes": {"email": "x@example.com", "banned": "?"}}
    page = parse_page(Transaction, {"data": [transaction()], "included": [broken_user, INCLUDED[1]]})
    (tx,) = page.data
    assert page.rejected == []
    assert tx.customer is None  # unreadable: absent, and the transaction is not lost
    assert tx.related_id("customer") == UUID(CUSTOMER_ID)
    assert tx.listing is not None and tx.listing.attributes.title == "Bike"
    assert f"transaction {TX_ID}: related customer left out: user {CUSTOMER_ID}" in caplog.text
    assert "x@example.com" not in caplog.text


def test_gone_or_broken_relationships_are_absent() -> None:
    raw = transaction()
    raw["relationships"] = {
        "customer": {"data": None},  # the user is gone
        "provider": {"data": {"id": "not-a-uuid", "type": "user"}},
        "listing": {"data": {"id": LISTING_ID, "type": "listing"}},  # not in included
    }
    tx = parse_document(Transaction, {"data": raw, "included": [INCLUDED[0]]})
    assert (tx.customer, tx.provider, tx.listing) == (None, None, None)
    assert tx.related_id("customer") is None and tx.related_id("provider") is None
    assert tx.related_id("listing") == UUID(LISTING_ID)


DELETED_USER = {
    "id": CUSTOMER_ID,
    "type": "user",
    "attributes": {"banned": False, "deleted": True, "createdAt": None, "email": None, "profile": None},
}
BANNED_USER = {
    "id": "9d7a2b47-3a52-4d38-9d3c-0b9fbb9e4d11",
    "type": "user",
    "attributes": {
        "banned": True,
        "deleted": False,
        "createdAt": None,
        "email": None,
        "profile": {
            "displayName": None,
            "abbreviatedName": None,
            "bio": None,
            "publicData": None,
            "protectedData": None,
            "privateData": None,
            "metadata": None,
        },
    },
}
DELETED_LISTING = {
    "id": LISTING_ID,
    "type": "listing",
    "attributes": {
        "deleted": True,
        "closed": False,
        "createdAt": None,
        "title": None,
        "description": None,
        "state": None,
        "price": None,
        "geolocation": None,
        "publicData": None,
        "privateData": None,
        "metadata": None,
    },
    "relationships": {"author": {"data": None}},
}


def test_deleted_and_banned_users_and_deleted_listings_are_read() -> None:
    raw = transaction(protectedData=None, metadata=None, lineItems=None)
    raw["relationships"]["provider"] = {"data": {"id": BANNED_USER["id"], "type": "user"}}
    page = parse_page(Transaction, {"data": [raw], "included": [DELETED_USER, BANNED_USER, DELETED_LISTING]})
    assert page.rejected == []
    (tx,) = page.data
    assert (tx.attributes.protected_data, tx.attributes.metadata, tx.attributes.line_items) == ({}, {}, [])
    assert tx.customer is not None and tx.provider is not None and tx.listing is not None
    deleted = tx.customer.attributes
    assert deleted.deleted and deleted.created_at is None and deleted.email is None
    assert deleted.profile.display_name is None and deleted.profile.protected_data == {}
    banned = tx.provider.attributes
    assert banned.banned and banned.profile.public_data == {} and banned.profile.metadata == {}
    listing = tx.listing.attributes
    assert listing.deleted and listing.created_at is None and listing.public_data == {}
    assert listing.price is None and tx.listing.author is None


def test_one_unreadable_item_does_not_fail_the_page() -> None:
    missing = transaction()
    missing["id"] = "5f0e8f80-0000-4000-8000-000000000001"
    del missing["attributes"]["lastTransition"]
    personal = transaction()
    personal["id"] = "5f0e8f80-0000-4000-8000-000000000002"
    personal["attributes"]["lastTransitionedAt"] = "joe@example.com"
    body = {"data": [transaction(), missing, "junk", personal, None], "meta": {"totalItems": 5}}
    page = parse_page(Transaction, body)
    assert [str(tx.id) for tx in page.data] == [TX_ID]
    assert page.received == 5
    first, junk, bad_time, null = page.rejected
    assert (first.index, first.id, first.type) == (1, missing["id"], "transaction")
    assert first.reason == f"transaction {missing['id']}: field 'attributes.lastTransition': field required"
    assert (junk.index, junk.id, junk.type, null.index, null.id) == (2, None, None, 4, None)
    assert bad_time.index == 3 and "attributes.lastTransitionedAt" in bad_time.reason
    assert all("joe@example.com" not in item.model_dump_json() for item in page.rejected)


def test_an_event_whose_transaction_cannot_be_read_is_rejected_with_its_sequence_id() -> None:
    def event(sequence_id: int, resource: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"11111111-5b81-49a5-aca6-0000000000{sequence_id:02d}",
            "type": "event",
            "attributes": {
                "sequenceId": sequence_id,
                "createdAt": "2024-03-27T12:30:03.150Z",
                "eventType": "transaction/transitioned",
                "resourceId": TX_ID,
                "resourceType": "transaction",
                "resource": resource,
            },
        }

    broken = transaction()
    del broken["attributes"]["transitions"]
    page = parse_page(
        Event, {"data": [event(41, transaction()), event(42, broken), event(43, transaction())]}
    )
    assert [e.attributes.sequence_id for e in page.data] == [41, 43]
    (rejected,) = page.rejected
    assert (rejected.index, rejected.sequence_id, rejected.type) == (1, 42, "event")
    assert "its resource: transaction" in rejected.reason and "attributes.transitions" in rejected.reason


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
