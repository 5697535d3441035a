"""The /_sim/ admin routes, ground truth, PaymentIntent data over HTTP, serving and live traffic."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from tests.simkit import SimHttp
from worker.api import wire
from worker.sim import SimConfig, Simulator, run_simulator, serve

PI_PATH = ("stripePaymentIntents", "default", "stripePaymentIntentId")


def _ground_truth_json(sim: Simulator) -> list[dict[str, Any]]:
    return [wire.decode(wire.encode(e.to_json())) for e in sim.store.transition_log]


async def _setup(http: SimHttp, process: str = "default-purchase") -> tuple[str, str, str]:
    provider = (await http.admin("POST", "users", {"firstName": "Pat", "phoneNumber": "+358401234567"})).body
    customer = (await http.admin("POST", "users", {"email": "cus@example.com"})).body
    listing = await http.admin(
        "POST",
        "listings",
        {
            "authorId": provider["data"]["id"],
            "processName": process,
            "price": {"amount": 1999, "currency": "EUR"},
        },
    )
    assert listing.status == 201, listing.raw
    assert listing.body["data"]["relationships"]["author"]["data"]["id"] == provider["data"]["id"]
    return provider["data"]["id"], customer["data"]["id"], listing.body["data"]["id"]


async def test_admin_builds_history_and_ground_truth_matches(sim: Simulator, sim_http: SimHttp) -> None:
    _, customer, listing = await _setup(sim_http)
    past = datetime(2024, 2, 1, 10, 0, tzinfo=UTC)
    created = await sim_http.admin(
        "POST",
        "transactions",
        {"listingId": listing, "customerId": customer, "transition": "transition/request-payment",
         "at": wire.format_time(past), "quantity": 2},
    )  # fmt: skip
    assert created.status == 201, created.raw
    tx = created.body["data"]
    assert tx["attributes"]["createdAt"] == "2024-02-01T10:00:00.000Z"
    assert tx["attributes"]["payinTotal"] == {"amount": 3998, "currency": "EUR"}
    moved = await sim_http.admin(
        "POST",
        f"transactions/{tx['id']}/transitions",
        {"transition": "transition/confirm-payment", "at": "2024-02-01T10:00:00.000Z", "by": "customer"},
    )
    assert moved.status == 200 and moved.body["data"]["attributes"]["state"] == "state/purchased"
    sim.traffic.step(25)
    truth = (await sim_http.admin("GET", "transitions")).body["data"]
    assert truth == _ground_truth_json(sim)
    assert truth[:2] == [
        {"transactionId": tx["id"], "transition": "transition/request-payment",
         "createdAt": "2024-02-01T10:00:00.000Z", "by": "customer"},
        {"transactionId": tx["id"], "transition": "transition/confirm-payment",
         "createdAt": "2024-02-01T10:00:00.000Z", "by": "customer"},
    ]  # fmt: skip
    only = (await sim_http.admin("GET", f"transitions?transactionId={tx['id']}")).body["data"]
    assert only == truth[:2]


async def test_admin_refusals(sim_http: SimHttp) -> None:
    _, customer, listing = await _setup(sim_http)
    body = {"listingId": listing, "customerId": customer, "transition": "transition/inquire"}
    tx = (await sim_http.admin("POST", "transactions", body)).body["data"]
    illegal = await sim_http.admin(
        "POST", f"transactions/{tx['id']}/transitions", {"transition": "transition/cancel"}
    )
    assert illegal.status == 409 and illegal.error_codes == ["transaction-invalid-transition"]
    wrong_actor = await sim_http.admin(
        "POST",
        f"transactions/{tx['id']}/transitions",
        {"transition": "transition/request-payment-after-inquiry", "by": "provider"},
    )
    assert wrong_actor.status == 409
    too_early = await sim_http.admin(
        "POST",
        f"transactions/{tx['id']}/transitions",
        {"transition": "transition/request-payment-after-inquiry", "at": "2001-01-01T00:00:00Z"},
    )
    assert too_early.status == 400 and too_early.error_codes == ["validation-invalid-value"]
    bad_time = await sim_http.admin("POST", "transactions", {**body, "at": "soon"})
    assert bad_time.status == 400 and bad_time.error_paths == [["at"]]
    unknown = await sim_http.admin(
        "POST",
        "transactions/0f8fad5b-d9cb-469f-a165-70867728950e/transitions",
        {"transition": "transition/x"},
    )
    assert unknown.status == 404
    missing = await sim_http.admin("POST", "transactions", {"customerId": customer})
    assert missing.status == 400 and missing.error_paths == [["listingId"]]


async def test_payment_intent_over_http(sim_http: SimHttp) -> None:
    _, customer, listing = await _setup(sim_http, "default-booking")
    created = await sim_http.admin(
        "POST",
        "transactions",
        {"listingId": listing, "customerId": customer, "transition": "transition/inquire",
         "bookingStart": "2030-01-01T00:00:00Z", "bookingEnd": "2030-01-03T00:00:00Z"},
    )  # fmt: skip
    tx_id = created.body["data"]["id"]
    assert created.body["data"]["attributes"]["protectedData"] == {}
    await sim_http.admin(
        "POST",
        f"transactions/{tx_id}/transitions",
        {"transition": "transition/request-payment-after-inquiry"},
    )
    shown = (await sim_http.get("transactions/show", {"id": tx_id, "include": "booking"})).body
    pi = shown["data"]["attributes"]["protectedData"]["stripePaymentIntents"]["default"][
        "stripePaymentIntentId"
    ]
    assert re.fullmatch(r"pi_[A-Za-z0-9]{24}", pi)
    assert shown["included"][0]["attributes"]["start"] == "2030-01-01T00:00:00.000Z"
    await sim_http.admin(
        "POST", f"transactions/{tx_id}/transitions", {"transition": "transition/confirm-payment"}
    )
    after = (await sim_http.get("transactions/show", {"id": tx_id})).body
    assert "stripePaymentIntents" not in after["data"]["attributes"]["protectedData"]
    events = (await sim_http.get("events/query", {"resourceId": tx_id})).body["data"]
    confirm = next(
        e
        for e in events
        if e["attributes"]["resource"]["attributes"]["lastTransition"] == "transition/confirm-payment"
    )
    previous = confirm["attributes"]["previousValues"]["attributes"]["protectedData"]
    assert previous["stripePaymentIntents"]["default"]["stripePaymentIntentId"] == pi
    assert confirm["attributes"]["previousValues"]["attributes"]["state"] == "state/pending-payment"
    assert "previousValues" in events[0]["attributes"] and events[0]["attributes"]["previousValues"] == {}


async def test_messages_and_traffic_step_endpoints(sim: Simulator, sim_http: SimHttp) -> None:
    stepped = await sim_http.admin("POST", "traffic/step", {"n": 5})
    assert len(stepped.body["data"]) == 5
    tx_id = stepped.body["data"][0]["transactionId"]
    msg = await sim_http.admin("POST", f"transactions/{tx_id}/messages", {"content": "hi"})
    assert msg.status == 201 and msg.body["data"]["type"] == "message"
    found = (await sim_http.get("transactions/query", {"hasMessage": "true", "include": "messages"})).body
    assert [t["id"] for t in found["data"]] == [tx_id]
    assert found["included"][0]["attributes"]["content"] == "hi"


async def test_serve_with_live_traffic() -> None:
    sim = Simulator(SimConfig(seed=5, rate_limits=None, traffic_rate=100))
    async with serve(sim) as url, aiohttp.ClientSession() as session:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        http = SimHttp(session, url)
        await http.login()
        deadline = time.monotonic() + 5
        while len(sim.store.transition_log) < 30:
            assert time.monotonic() < deadline, "no live traffic"
            await asyncio.sleep(0.02)
        truth = (await http.admin("GET", "transitions")).body["data"]
        assert truth == _ground_truth_json(sim)[: len(truth)]
        first = (await http.get("events/query")).body["data"]
        assert first
    assert not sim.traffic.running
    made = len(sim.store.transition_log)
    await asyncio.sleep(0.05)
    assert len(sim.store.transition_log) == made


async def test_run_simulator_prints_url_and_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    config = SimConfig(seed=2, rate_limits=None, client_secret="s3cret")
    task = asyncio.create_task(run_simulator(config, "127.0.0.1", 0))
    try:
        deadline = time.monotonic() + 5
        out = ""
        while "http://" not in out:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.02)
            out += capsys.readouterr().out
        assert "client_id=sim-client-id" in out and "client_secret=s3cret" in out
        url = re.search(r"http://127\.0\.0\.1:\d+", out)
        assert url is not None
        async with aiohttp.ClientSession() as session:
            http = SimHttp(session, url.group(0))
            http.client_secret = "s3cret"
            await http.login()
            assert (await http.get("marketplace/show")).status == 200
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
