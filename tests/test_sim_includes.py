"""The nested includes the reference lists, over HTTP: profile images and message senders."""

from __future__ import annotations

from typing import Any

import pytest

from tests.simkit import SimHttp


def _included(body: dict[str, Any], type_: str, id_: str) -> dict[str, Any]:
    found = [r for r in body.get("included", []) if r["type"] == type_ and r["id"] == id_]
    assert len(found) == 1, (type_, id_, body.get("included"))
    return found[0]


def _rel(resource: dict[str, Any], name: str) -> Any:
    return resource["relationships"][name]["data"]


@pytest.fixture
async def deal(sim_http: SimHttp) -> dict[str, str]:
    """A provider with a profile image, a customer without one, a transaction with two messages."""
    provider = (await sim_http.admin("POST", "users", {"profileImage": True})).body["data"]["id"]
    customer = (await sim_http.admin("POST", "users", {"profileImage": False})).body["data"]["id"]
    listing = await sim_http.admin(
        "POST", "listings", {"authorId": provider, "processName": "default-purchase"}
    )
    listing_id = listing.body["data"]["id"]
    tx = await sim_http.admin(
        "POST",
        "transactions",
        {"listingId": listing_id, "customerId": customer, "transition": "transition/inquire"},
    )
    tx_id = tx.body["data"]["id"]
    for sender, text in ((customer, "Is it still there?"), (provider, "Yes!")):
        sent = await sim_http.admin(
            "POST", f"transactions/{tx_id}/messages", {"content": text, "senderId": sender}
        )
        assert sent.status == 201, sent.raw
    return {"provider": provider, "customer": customer, "listing": listing_id, "tx": tx_id}


async def test_party_profile_images(deal: dict[str, str], sim_http: SimHttp) -> None:
    answer = await sim_http.get(
        "transactions/show", {"id": deal["tx"], "include": "provider.profileImage,customer.profileImage"}
    )
    assert answer.status == 200, answer.raw
    body = answer.body
    assert _rel(body["data"], "provider") == {"id": deal["provider"], "type": "user"}
    provider = _included(body, "user", deal["provider"])
    image_ref = _rel(provider, "profileImage")
    assert image_ref["type"] == "image"
    image = _included(body, "image", image_ref["id"])
    default = image["attributes"]["variants"]["default"]
    assert default["url"].startswith("https://") and default["width"] > 0 and default["height"] > 0
    customer = _included(body, "user", deal["customer"])
    assert _rel(customer, "profileImage") is None
    assert sorted(r["type"] for r in body["included"]) == ["image", "user", "user"]


async def test_message_senders_and_their_images(deal: dict[str, str], sim_http: SimHttp) -> None:
    body = (
        await sim_http.get("transactions/show", {"id": deal["tx"], "include": "messages.sender.profileImage"})
    ).body
    messages = _rel(body["data"], "messages")
    assert [m["type"] for m in messages] == ["message", "message"]
    first, second = (_included(body, "message", m["id"]) for m in messages)
    assert first["attributes"]["content"] == "Is it still there?"
    assert _rel(first, "sender") == {"id": deal["customer"], "type": "user"}
    assert _rel(second, "sender") == {"id": deal["provider"], "type": "user"}
    assert _rel(_included(body, "user", deal["provider"]), "profileImage")["type"] == "image"
    limited = (
        await sim_http.get(
            "transactions/show", {"id": deal["tx"], "include": "messages.sender", "limit.messages": "1"}
        )
    ).body
    assert len(_rel(limited["data"], "messages")) == 1
    assert {r["type"] for r in limited["included"]} == {"message", "user"}


async def test_listing_author_and_user_profile_image(deal: dict[str, str], sim_http: SimHttp) -> None:
    listing = (
        await sim_http.get("listings/show", {"id": deal["listing"], "include": "author.profileImage"})
    ).body
    author = _included(listing, "user", deal["provider"])
    _included(listing, "image", _rel(author, "profileImage")["id"])
    user = (await sim_http.get("users/show", {"id": deal["provider"], "include": "profileImage"})).body
    assert _rel(user["data"], "profileImage") == _rel(author, "profileImage")
    plain = (await sim_http.get("users/show", {"id": deal["customer"], "include": "profileImage"})).body
    assert _rel(plain["data"], "profileImage") is None and plain["included"] == []


async def test_most_generated_users_have_a_profile_image(sim_http: SimHttp) -> None:
    ids = [(await sim_http.admin("POST", "users", {})).body["data"]["id"] for _ in range(40)]
    with_image = 0
    for user_id in ids:
        body = (await sim_http.get("users/show", {"id": user_id, "include": "profileImage"})).body
        with_image += _rel(body["data"], "profileImage") is not None
    assert 20 <= with_image < 40
