"""events/query over real HTTP: order, the 100 cap, each filter, parsing, Transit."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest

from tests.simkit import SimHttp
from worker.api import models, wire
from worker.sim import Simulator


@pytest.fixture
def busy(sim: Simulator) -> Simulator:
    sim.traffic.step(250)
    return sim


async def _events(http: SimHttp, **params: str) -> list[dict[str, Any]]:
    answer = await http.get("events/query", params)
    assert answer.status == 200, answer.raw
    data: list[dict[str, Any]] = answer.body["data"]
    return data


def _seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["attributes"]["sequenceId"] for e in events]


async def test_ascending_and_at_most_100_then_ask_again(busy: Simulator, sim_http: SimHttp) -> None:
    total = busy.store.last_sequence_id
    assert total > 200
    first = await _events(sim_http)
    assert _seqs(first) == list(range(1, 101))
    second = await _events(sim_http, startAfterSequenceId="100")
    assert _seqs(second) == list(range(101, 201))
    rest = await _events(sim_http, startAfterSequenceId=str(total - 3))
    assert _seqs(rest) == [total - 2, total - 1, total]
    assert await _events(sim_http, startAfterSequenceId=str(total)) == []
    assert _seqs(await _events(sim_http, perPage="7", startAfterSequenceId="50")) == list(range(51, 58))


async def test_events_parse_with_client_models(busy: Simulator, sim_http: SimHttp) -> None:
    body = (
        await sim_http.get("events/query", {"eventTypes": "transaction/transitioned", "perPage": "20"})
    ).body
    page = models.parse_page(models.Event, body)
    assert len(page.data) == 20
    for event in page.data:
        assert event.type == "event"
        assert event.attributes.source in (
            "source/marketplace-api",
            "source/transaction",
            "source/integration-api",
        )
        tx = event.transaction()
        assert tx is not None and tx.id == event.attributes.resource_id
        assert event.attributes.previous_values is not None
        assert "lastTransition" in event.attributes.previous_values["attributes"]
        assert event.attributes.audit_data is not None and "requestId" in event.attributes.audit_data


async def test_event_type_filter(busy: Simulator, sim_http: SimHttp) -> None:
    wanted = {"transaction/initiated", "listing/created"}
    got = await _events(sim_http, eventTypes=",".join(sorted(wanted)))
    assert got and {e["attributes"]["eventType"] for e in got} == wanted
    expected = [e.sequence_id for e in busy.store.events if e.event_type in wanted][:100]
    assert _seqs(got) == expected


async def test_resource_and_related_resource_filters(busy: Simulator, sim_http: SimHttp) -> None:
    tx = next(t for t in busy.store.transactions.values() if len(t.transitions) >= 3)
    got = await _events(sim_http, resourceId=str(tx.id))
    assert got[0]["attributes"]["eventType"] == "transaction/initiated"
    assert len([e for e in got if e["attributes"]["resourceType"] == "transaction"]) == len(tx.transitions)
    assert {e["attributes"]["resourceId"] for e in got} == {str(tx.id)}

    user = busy.traffic.users[0]
    related = await _events(sim_http, relatedResourceId=str(user.id), eventTypes="transaction/transitioned")
    parties = {t.id: (t.customer_id, t.provider_id) for t in busy.store.transactions.values()}
    expected = [
        e.sequence_id
        for e in busy.store.events
        if e.event_type == "transaction/transitioned" and user.id in parties[e.resource_id]
    ][:100]
    assert expected and _seqs(related) == expected
    listing = busy.traffic.listings[0]
    by_listing = await _events(
        sim_http, relatedResourceId=str(listing.id), eventTypes="transaction/initiated"
    )
    assert by_listing
    for event in by_listing:
        assert busy.store.transaction(uuid.UUID(event["attributes"]["resourceId"])).listing_id == listing.id


async def test_created_at_start(sim: Simulator, sim_http: SimHttp) -> None:
    start = sim.store.now() - timedelta(days=3)
    sim.traffic.build_history(40, start=start)
    middle = start + timedelta(days=1, hours=12)
    got = await _events(
        sim_http, createdAtStart=wire.format_time(middle), eventTypes="transaction/transitioned"
    )
    expected = [
        e.sequence_id
        for e in sim.store.events
        if e.event_type == "transaction/transitioned" and e.created_at >= middle
    ]
    assert expected and _seqs(got) == expected[:100]
    assert len(expected) < len([e for e in sim.store.events if e.event_type == "transaction/transitioned"])


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"perPage": "101"}, "perPage"),
        ({"perPage": "0"}, "perPage"),
        ({"startAfterSequenceId": "-1"}, "startAfterSequenceId"),
        ({"startAfterSequenceId": "abc"}, "startAfterSequenceId"),
        ({"createdAtStart": "2024-02-30T00:00:00Z"}, "createdAtStart"),
        ({"resourceId": "x"}, "resourceId"),
        ({"relatedResourceId": str(uuid.uuid4())[:-1]}, "relatedResourceId"),
        ({"include": "resource"}, "include"),
    ],
)
async def test_bad_event_params(sim_http: SimHttp, params: dict[str, str], param: str) -> None:
    answer = await sim_http.get("events/query", params)
    assert answer.status == 400
    assert answer.error_codes == ["validation-invalid-params"]
    assert answer.error_paths == [[param]]


async def test_events_in_transit_match_json(busy: Simulator, sim_http: SimHttp) -> None:
    params = {"startAfterSequenceId": "20", "perPage": "50"}
    as_json = await sim_http.get("events/query", params)
    as_transit = await sim_http.get("events/query", params, accept=wire.TRANSIT_MIME)
    assert as_transit.content_type == wire.TRANSIT_MIME
    assert as_transit.body == as_json.body


async def test_meta_carries_the_page_size(busy: Simulator, sim_http: SimHttp) -> None:
    full = (await sim_http.get("events/query")).body
    assert full["meta"] == {"perPage": 100} and len(full["data"]) == full["meta"]["perPage"]
    small = (await sim_http.get("events/query", {"perPage": "7"})).body
    assert small["meta"] == {"perPage": 7} and len(small["data"]) == 7
    last = str(busy.store.last_sequence_id - 2)
    short = (await sim_http.get("events/query", {"startAfterSequenceId": last, "perPage": "7"})).body
    assert short["meta"] == {"perPage": 7} and len(short["data"]) == 2  # shorter than perPage: caught up
    none = (
        await sim_http.get("events/query", {"startAfterSequenceId": str(busy.store.last_sequence_id)})
    ).body
    assert none == {"data": [], "meta": {"perPage": 100}}


async def test_every_event_names_its_marketplace(busy: Simulator, sim_http: SimHttp) -> None:
    market = (await sim_http.get("marketplace/show")).body["data"]["id"]
    events = await _events(sim_http, perPage="100", startAfterSequenceId="0")
    types = {e["attributes"]["eventType"] for e in events}
    assert {"user/created", "listing/created", "transaction/initiated"} <= types
    assert {e["attributes"]["marketplaceId"] for e in events} == {market}
    transit = (await sim_http.get("events/query", {"perPage": "3"}, accept=wire.TRANSIT_MIME)).body
    assert [e["attributes"]["marketplaceId"] for e in transit["data"]] == [market] * 3
