"""Reviews over HTTP: written by review transitions, pending until published, their events and includes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.simkit import SimHttp
from worker.sim import SimConfig, Simulator, serve

REVIEW_INCLUDE = "reviews,reviews.author,reviews.subject.profileImage"


@pytest.fixture
async def reviewing() -> AsyncIterator[tuple[Simulator, SimHttp]]:
    sim = Simulator(SimConfig(seed=4, rate_limits=None, reviews=True))
    async with serve(sim) as url, aiohttp.ClientSession() as session:
        http = SimHttp(session, url)
        await http.login()
        yield sim, http


async def _completed_booking(http: SimHttp) -> dict[str, str]:
    provider = (await http.admin("POST", "users", {"profileImage": True})).body["data"]["id"]
    customer = (await http.admin("POST", "users", {})).body["data"]["id"]
    listing = await http.admin("POST", "listings", {"authorId": provider, "processName": "default-booking"})
    tx = await http.admin(
        "POST", "transactions", {"listingId": listing.body["data"]["id"], "customerId": customer}
    )
    tx_id = tx.body["data"]["id"]
    for name in ("transition/confirm-payment", "transition/accept", "transition/complete"):
        await _move(http, tx_id, name)
    return {"provider": provider, "customer": customer, "listing": listing.body["data"]["id"], "tx": tx_id}


async def _move(http: SimHttp, tx_id: str, transition: str) -> int:
    moved = await http.admin("POST", f"transactions/{tx_id}/transitions", {"transition": transition})
    assert moved.status == 200, moved.raw
    sequence_id: int = moved.body["meta"]["sequenceId"]
    return sequence_id


async def _reviews(http: SimHttp, tx_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    body = (await http.get("transactions/show", {"id": tx_id, "include": REVIEW_INCLUDE})).body
    refs = body["data"]["relationships"]["reviews"]["data"]
    by_key = {(r["type"], r["id"]): r for r in body["included"]}
    return [by_key[("review", r["id"])] for r in refs], by_key


async def _events_since(http: SimHttp, after: int) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = (await http.get("events/query", {"startAfterSequenceId": str(after)})).body[
        "data"
    ]
    return data


async def test_first_review_is_pending_then_both_are_published(reviewing: tuple[Simulator, SimHttp]) -> None:
    _, http = reviewing
    deal = await _completed_booking(http)
    before = (await http.admin("GET", "stats")).body["lastSequenceId"]
    await _move(http, deal["tx"], "transition/review-1-by-customer")
    (review,), included = await _reviews(http, deal["tx"])
    assert review["attributes"]["type"] == "ofProvider"
    assert review["attributes"]["state"] == "pending"
    assert review["attributes"]["rating"] is None and review["attributes"]["content"] is None
    assert review["relationships"]["author"]["data"]["id"] == deal["customer"]
    assert review["relationships"]["subject"]["data"]["id"] == deal["provider"]
    provider = included[("user", deal["provider"])]
    assert ("image", provider["relationships"]["profileImage"]["data"]["id"]) in included
    created, transitioned = await _events_since(http, before)
    assert created["attributes"]["eventType"] == "review/created"
    assert created["attributes"]["resourceId"] == review["id"]
    assert created["attributes"]["resource"]["relationships"]["listing"]["data"]["id"] == deal["listing"]
    assert transitioned["attributes"]["eventType"] == "transaction/transitioned"

    middle = (await http.admin("GET", "stats")).body["lastSequenceId"]
    await _move(http, deal["tx"], "transition/review-2-by-provider")
    reviews, _ = await _reviews(http, deal["tx"])
    assert [r["attributes"]["type"] for r in reviews] == ["ofProvider", "ofCustomer"]
    for r in reviews:
        assert r["attributes"]["state"] == "public"
        assert r["attributes"]["rating"] in range(1, 6) and r["attributes"]["content"]
    second = reviews[1]
    assert second["relationships"]["author"]["data"]["id"] == deal["provider"]
    assert second["relationships"]["subject"]["data"]["id"] == deal["customer"]
    events = await _events_since(http, middle)
    assert [e["attributes"]["eventType"] for e in events] == [
        "review/created",
        "review/updated",
        "review/updated",
        "transaction/transitioned",
    ]
    for updated in events[1:3]:
        assert updated["attributes"]["previousValues"] == {
            "attributes": {"state": "pending", "rating": None, "content": None}
        }
        assert updated["attributes"]["resource"]["attributes"]["state"] == "public"
    assert events[0]["attributes"]["resource"]["relationships"]["listing"]["data"] is None  # ofCustomer


async def test_an_expired_review_period_publishes_the_pending_review(
    reviewing: tuple[Simulator, SimHttp],
) -> None:
    _, http = reviewing
    deal = await _completed_booking(http)
    await _move(http, deal["tx"], "transition/review-1-by-provider")
    await _move(http, deal["tx"], "transition/expire-customer-review-period")
    (review,), _ = await _reviews(http, deal["tx"])
    assert review["attributes"]["type"] == "ofCustomer" and review["attributes"]["state"] == "public"


async def test_no_review_when_the_period_expires_unused(reviewing: tuple[Simulator, SimHttp]) -> None:
    _, http = reviewing
    deal = await _completed_booking(http)
    await _move(http, deal["tx"], "transition/expire-review-period")
    reviews, _ = await _reviews(http, deal["tx"])
    assert reviews == []


async def test_reviews_are_off_unless_configured(sim: Simulator, sim_http: SimHttp) -> None:
    deal = await _completed_booking(sim_http)
    await _move(sim_http, deal["tx"], "transition/review-1-by-customer")
    reviews, _ = await _reviews(sim_http, deal["tx"])
    assert reviews == [] and not sim.store.reviews


async def test_traffic_writes_reviews(reviewing: tuple[Simulator, SimHttp]) -> None:
    sim, http = reviewing
    sim.traffic.step(600)
    reviewed = [t for t in sim.store.transactions.values() if t.state == "state/reviewed" and t.reviews]
    assert reviewed
    reviews, _ = await _reviews(http, str(reviewed[0].id))
    assert reviews and {r["attributes"]["state"] for r in reviews} == {"public"}
    kinds = {r.review_type for t in sim.store.transactions.values() for r in t.reviews}
    assert kinds == {"ofProvider", "ofCustomer"}
