"""previousValues over HTTP: only what changed, extended data key by key, the PaymentIntent trail."""

from __future__ import annotations

import uuid
from typing import Any

from tests.simkit import SimHttp
from worker.sim import Simulator


async def _all_events(http: SimHttp, **params: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = (await http.get("events/query", {**params, "startAfterSequenceId": str(after)})).body
        out.extend(page["data"])
        if len(page["data"]) < page["meta"]["perPage"]:
            return out
        after = page["data"][-1]["attributes"]["sequenceId"]


async def _inquiry(http: SimHttp, protected: dict[str, Any]) -> str:
    provider = (await http.admin("POST", "users", {})).body["data"]["id"]
    customer = (await http.admin("POST", "users", {})).body["data"]["id"]
    listing = await http.admin("POST", "listings", {"authorId": provider, "processName": "default-purchase"})
    created = await http.admin(
        "POST",
        "transactions",
        {
            "listingId": listing.body["data"]["id"],
            "customerId": customer,
            "transition": "transition/inquire",
            "protectedData": protected,
        },
    )
    assert created.status == 201, created.raw
    tx_id: str = created.body["data"]["id"]
    return tx_id


async def test_payment_intent_id_added_then_removed(sim_http: SimHttp) -> None:
    tx_id = await _inquiry(sim_http, {"note": "ring twice"})
    for name in ("transition/request-payment-after-inquiry", "transition/confirm-payment"):
        moved = await sim_http.admin("POST", f"transactions/{tx_id}/transitions", {"transition": name})
        assert moved.status == 200, moved.raw
    initiated, requested, confirmed = await _all_events(sim_http, resourceId=tx_id)
    assert initiated["attributes"]["previousValues"] == {}

    # A key that did not exist is given as null; the untouched "note" is left out.
    assert requested["attributes"]["previousValues"]["attributes"]["protectedData"] == {
        "stripePaymentIntents": None
    }
    now = requested["attributes"]["resource"]["attributes"]["protectedData"]
    pi = now["stripePaymentIntents"]["default"]["stripePaymentIntentId"]
    assert now["note"] == "ring twice" and pi.startswith("pi_")

    # A key that was removed is given with its entire previous value.
    assert confirmed["attributes"]["previousValues"]["attributes"]["protectedData"] == {
        "stripePaymentIntents": {"default": {"stripePaymentIntentId": pi}}
    }
    assert confirmed["attributes"]["resource"]["attributes"]["protectedData"] == {"note": "ring twice"}
    previous = confirmed["attributes"]["previousValues"]["attributes"]
    assert previous["state"] == "state/pending-payment"
    assert "createdAt" not in previous and "processName" not in previous


async def test_metadata_keys_compare_one_by_one(sim_http: SimHttp) -> None:
    tx_id = await _inquiry(sim_http, {})
    for metadata in (
        {"crm": {"deal": 7, "stage": "new"}, "sms": "sent"},
        {"crm": {"deal": 7, "stage": "won"}},
        {"crm": None, "sms": "sent"},
    ):
        answer = await sim_http.command("transactions/update_metadata", {"id": tx_id, "metadata": metadata})
        assert answer.status == 200, answer.raw
    updated = await _all_events(sim_http, resourceId=tx_id, eventTypes="transaction/updated")
    assert [e["attributes"]["previousValues"] for e in updated] == [
        {"attributes": {"metadata": {"crm": None, "sms": None}}},
        # A changed key comes whole, not just its changed leaf; "sms" did not change.
        {"attributes": {"metadata": {"crm": {"deal": 7, "stage": "new"}}}},
        {"attributes": {"metadata": {"crm": {"deal": 7, "stage": "won"}}}},
    ]


async def test_traffic_leaves_the_payment_intent_id_only_in_confirm_payment_events(
    sim: Simulator, sim_http: SimHttp
) -> None:
    sim.traffic.step(300)
    events = await _all_events(sim_http, eventTypes="transaction/transitioned")
    confirms = [
        e
        for e in events
        if e["attributes"]["resource"]["attributes"]["lastTransition"] == "transition/confirm-payment"
    ]
    assert len(confirms) >= 10
    for event in confirms:
        tx = sim.store.transaction(uuid.UUID(event["attributes"]["resourceId"]))
        previous = event["attributes"]["previousValues"]["attributes"]["protectedData"]
        assert previous["stripePaymentIntents"]["default"]["stripePaymentIntentId"] == tx.payment_intent_id
        assert "stripePaymentIntents" not in event["attributes"]["resource"]["attributes"]["protectedData"]
    # Nowhere else: earlier events never had it before them, later ones never saw it change.
    remembered = {t.payment_intent_id for t in sim.store.transactions.values() if t.payment_intent_id}
    for event in events:
        if event not in confirms:
            text = repr(event["attributes"]["previousValues"])
            assert not any(pi in text for pi in remembered)
