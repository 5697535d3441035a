"""Deleted and banned users, deleted listings and deleted transactions, as a client sees them over HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from tests.simkit import SimHttp
from worker.sim import Simulator

GONE_USER = {"createdAt": None, "email": None, "emailVerified": False, "profile": None}
DELETED_LISTING = {
    "title": None,
    "description": None,
    "createdAt": None,
    "state": None,
    "deleted": True,
    "geolocation": None,
    "price": None,
    "publicData": None,
    "privateData": None,
    "metadata": None,
}


@dataclass
class Deal:
    provider: str
    customer: str
    listing: str
    tx: str


@pytest.fixture
async def deal(sim_http: SimHttp) -> Deal:
    """A purchase paid for: the provider and the customer both have a profile image."""
    provider = (
        await sim_http.admin("POST", "users", {"email": "pro@example.com", "profileImage": True})
    ).body
    customer = (
        await sim_http.admin("POST", "users", {"email": "cus@example.com", "profileImage": True})
    ).body
    listing = await sim_http.admin(
        "POST", "listings", {"authorId": provider["data"]["id"], "processName": "default-purchase"}
    )
    tx = await sim_http.admin(
        "POST",
        "transactions",
        {"listingId": listing.body["data"]["id"], "customerId": customer["data"]["id"]},
    )
    tx_id = tx.body["data"]["id"]
    paid = await sim_http.admin(
        "POST", f"transactions/{tx_id}/transitions", {"transition": "transition/confirm-payment"}
    )
    assert paid.status == 200, paid.raw
    return Deal(provider["data"]["id"], customer["data"]["id"], listing.body["data"]["id"], tx_id)


async def _events_after(http: SimHttp, sequence_id: int, **params: str) -> list[dict[str, Any]]:
    body = (await http.get("events/query", {"startAfterSequenceId": str(sequence_id), **params})).body
    data: list[dict[str, Any]] = body["data"]
    return data


async def _last_sequence_id(http: SimHttp) -> int:
    value: int = (await http.admin("GET", "stats")).body["lastSequenceId"]
    return value


def _included(body: dict[str, Any], type_: str, id_: str) -> dict[str, Any]:
    (found,) = [r for r in body.get("included", []) if (r["type"], r["id"]) == (type_, id_)]
    return found


async def test_a_deleted_user_stays_reachable_with_attributes_at_defaults(
    deal: Deal, sim_http: SimHttp
) -> None:
    before = await _last_sequence_id(sim_http)
    answer = await sim_http.admin("POST", f"users/{deal.customer}/delete", {})
    assert answer.status == 200, answer.raw
    assert answer.body["meta"]["eventType"] == "user/deleted"
    expected = {"banned": False, "deleted": True, **GONE_USER}
    assert answer.body["data"]["attributes"] == expected

    shown = await sim_http.get("users/show", {"id": deal.customer, "include": "profileImage"})
    assert shown.status == 200 and shown.body["data"]["attributes"] == expected
    assert (
        shown.body["data"]["relationships"]["profileImage"]["data"] is None and shown.body["included"] == []
    )
    sparse = await sim_http.get(
        "users/show", {"id": deal.customer, "fields.user": "profile.displayName,deleted"}
    )
    assert sparse.body["data"]["attributes"] == {"profile": {"displayName": None}, "deleted": True}

    tx = (await sim_http.get("transactions/show", {"id": deal.tx, "include": "customer.profileImage"})).body
    assert _included(tx, "user", deal.customer)["attributes"] == expected
    assert [r["type"] for r in tx["included"]] == ["user"]

    (event,) = await _events_after(sim_http, before)
    attributes = event["attributes"]
    assert attributes["eventType"] == "user/deleted" and attributes["resourceId"] == deal.customer
    assert attributes["resource"] is None
    assert attributes["source"] == "source/marketplace-api"
    assert attributes["auditData"]["userId"] == deal.customer
    previous = attributes["previousValues"]
    assert previous["attributes"]["deleted"] is False
    assert previous["attributes"]["createdAt"] is not None
    # Personal data is not kept even in the deletion's previous values.
    assert previous["attributes"]["email"] is None and previous["attributes"]["profile"] is None
    assert previous["relationships"]["profileImage"]["data"]["type"] == "image"


async def test_a_deleted_party_freezes_the_transaction_and_takes_nothing_new(
    deal: Deal, sim_http: SimHttp
) -> None:
    await sim_http.admin("POST", f"users/{deal.customer}/delete", {})
    moved = await sim_http.command(
        "transactions/transition", {"id": deal.tx, "transition": "transition/operator-mark-delivered"}
    )
    assert moved.status == 409 and moved.error_codes == ["transaction-invalid-transition"]
    admin_move = await sim_http.admin(
        "POST", f"transactions/{deal.tx}/transitions", {"transition": "transition/mark-delivered"}
    )
    assert admin_move.status == 409
    new = await sim_http.admin(
        "POST", "transactions", {"listingId": deal.listing, "customerId": deal.customer}
    )
    assert new.status == 400 and new.error_codes == ["validation-invalid-value"]
    message = await sim_http.admin(
        "POST", f"transactions/{deal.tx}/messages", {"content": "hello?", "senderId": deal.customer}
    )
    assert message.status == 400
    again = await sim_http.admin("POST", f"users/{deal.customer}/delete", {})
    assert again.status == 400 and again.error_codes == ["validation-invalid-value"]


async def test_deleting_a_provider_deletes_their_listings_first(deal: Deal, sim_http: SimHttp) -> None:
    before = await _last_sequence_id(sim_http)
    await sim_http.admin("POST", f"users/{deal.provider}/delete", {})
    listing_deleted, user_deleted = await _events_after(sim_http, before)
    assert listing_deleted["attributes"]["eventType"] == "listing/deleted"
    assert listing_deleted["attributes"]["resourceId"] == deal.listing
    assert listing_deleted["attributes"]["resource"] is None
    assert listing_deleted["attributes"]["previousValues"]["attributes"]["state"] == "published"
    assert user_deleted["attributes"]["eventType"] == "user/deleted"
    listing = (await sim_http.get("listings/show", {"id": deal.listing, "include": "author"})).body
    assert listing["data"]["attributes"] == DELETED_LISTING
    author = _included(listing, "user", deal.provider)
    assert author["attributes"]["deleted"] is True


async def test_a_banned_user_and_their_closed_listings(deal: Deal, sim_http: SimHttp) -> None:
    before = await _last_sequence_id(sim_http)
    answer = await sim_http.admin("POST", f"users/{deal.provider}/ban", {"at": "2030-01-01T00:00:00Z"})
    assert answer.status == 200, answer.raw
    expected = {"banned": True, "deleted": False, **GONE_USER}
    assert answer.body["data"]["attributes"] == expected
    shown = (await sim_http.get("users/show", {"id": deal.provider})).body
    assert shown["data"]["attributes"] == expected

    banned, closed = await _events_after(sim_http, before)
    assert banned["attributes"]["eventType"] == "user/updated"
    assert banned["attributes"]["source"] == "source/console"
    assert banned["attributes"]["auditData"]["adminId"] is not None
    assert banned["attributes"]["createdAt"] == "2030-01-01T00:00:00.000Z"
    assert banned["attributes"]["resource"]["attributes"] == expected
    previous = banned["attributes"]["previousValues"]["attributes"]
    assert previous["banned"] is False and previous["email"] == "pro@example.com"
    assert closed["attributes"]["eventType"] == "listing/updated"
    assert closed["attributes"]["previousValues"] == {"attributes": {"state": "published"}}

    listing = (await sim_http.get("listings/show", {"id": deal.listing})).body["data"]["attributes"]
    assert listing["state"] == "closed" and listing["deleted"] is False and listing["title"]
    # Transactions with a banned party go on; new ones cannot start.
    moved = await sim_http.command(
        "transactions/transition", {"id": deal.tx, "transition": "transition/operator-mark-delivered"}
    )
    assert moved.status == 200, moved.raw
    other = (await sim_http.admin("POST", "users", {})).body["data"]["id"]
    new = await sim_http.admin("POST", "transactions", {"listingId": deal.listing, "customerId": other})
    assert new.status == 400
    again = await sim_http.admin("POST", f"users/{deal.provider}/ban", {})
    assert again.status == 400


async def test_a_deleted_listing(deal: Deal, sim_http: SimHttp) -> None:
    before = await _last_sequence_id(sim_http)
    answer = await sim_http.admin("POST", f"listings/{deal.listing}/delete", {})
    assert answer.status == 200 and answer.body["data"]["attributes"] == DELETED_LISTING
    (event,) = await _events_after(sim_http, before)
    assert event["attributes"]["eventType"] == "listing/deleted"
    assert event["attributes"]["source"] == "source/console"
    assert event["attributes"]["resource"] is None
    assert event["attributes"]["previousValues"]["relationships"]["author"]["data"]["id"] == deal.provider
    tx = (await sim_http.get("transactions/show", {"id": deal.tx, "include": "listing.author"})).body
    listing = _included(tx, "listing", deal.listing)
    assert listing["attributes"] == DELETED_LISTING
    assert listing["relationships"]["author"]["data"]["id"] == deal.provider
    assert _included(tx, "user", deal.provider)["attributes"]["deleted"] is False
    # Its transactions go on; it takes no new one.
    moved = await sim_http.command(
        "transactions/transition", {"id": deal.tx, "transition": "transition/operator-mark-delivered"}
    )
    assert moved.status == 200
    other = (await sim_http.admin("POST", "users", {})).body["data"]["id"]
    assert (
        await sim_http.admin("POST", "transactions", {"listingId": deal.listing, "customerId": other})
    ).status == 400


async def test_a_deleted_transaction_is_gone_from_the_api_but_not_from_ground_truth(
    deal: Deal, sim: Simulator, sim_http: SimHttp
) -> None:
    await sim_http.admin("POST", f"transactions/{deal.tx}/messages", {"content": "thanks"})
    before = await _last_sequence_id(sim_http)
    answer = await sim_http.admin("POST", f"transactions/{deal.tx}/delete", {"at": "2030-02-02T10:00:00Z"})
    assert answer.status == 200, answer.raw
    assert answer.body["data"] == {"id": deal.tx, "type": "transaction"}

    shown = await sim_http.get("transactions/show", {"id": deal.tx})
    assert shown.status == 404 and shown.error_codes == ["not-found"]
    listed = (await sim_http.get("transactions/query", {"customerId": deal.customer})).body
    assert listed["data"] == [] and listed["meta"]["totalItems"] == 0
    for path, body in (
        ("transactions/transition", {"id": deal.tx, "transition": "transition/operator-mark-delivered"}),
        ("transactions/update_metadata", {"id": deal.tx, "metadata": {"a": 1}}),
    ):
        refused = await sim_http.command(path, body)
        assert refused.status == 404 and refused.error_codes == ["not-found"]
    assert (await sim_http.admin("POST", f"transactions/{deal.tx}/delete", {})).status == 404

    (event,) = await _events_after(sim_http, before)
    attributes = event["attributes"]
    assert attributes["eventType"] == "transaction/deleted" and attributes["resource"] is None
    assert attributes["createdAt"] == "2030-02-02T10:00:00.000Z"
    assert attributes["previousValues"]["attributes"]["lastTransition"] == "transition/confirm-payment"
    assert attributes["previousValues"]["relationships"]["customer"]["data"]["id"] == deal.customer
    related = await _events_after(
        sim_http, 0, relatedResourceId=deal.customer, eventTypes="transaction/deleted"
    )
    assert [e["id"] for e in related] == [event["id"]]

    truth = (await sim_http.admin("GET", f"transitions?transactionId={deal.tx}")).body["data"]
    assert [t["transition"] for t in truth] == ["transition/request-payment", "transition/confirm-payment"]
    assert {t["transactionDeletedAt"] for t in truth} == {"2030-02-02T10:00:00.000Z"}
    kept = (await sim_http.admin("GET", "transitions?deleted=false")).body["data"]
    gone = (await sim_http.admin("GET", "transitions?deleted=true")).body["data"]
    assert gone == truth and all(t["transactionId"] != deal.tx for t in kept)
    assert len(kept) + len(gone) == len(sim.store.transition_log)
    assert not sim.store.messages


@pytest.mark.parametrize(
    "path", ["users/{id}/delete", "users/{id}/ban", "listings/{id}/delete", "transactions/{id}/delete"]
)
async def test_removing_what_does_not_exist_is_404(sim_http: SimHttp, path: str) -> None:
    answer = await sim_http.admin("POST", path.format(id="0f8fad5b-d9cb-469f-a165-70867728950e"), {})
    assert answer.status == 404 and answer.error_codes == ["not-found"]
