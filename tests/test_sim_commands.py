"""Commands over real HTTP: transactions/transition and transactions/update_metadata."""

from __future__ import annotations

import uuid

import pytest

from tests.simkit import API, SimHttp
from worker.api import models, wire
from worker.sim import Simulator
from worker.sim.store import Transaction


@pytest.fixture
def preauthorized(sim: Simulator) -> Transaction:
    s = sim.store
    provider, customer = s.create_user(), s.create_user()
    listing = s.create_listing(provider.id, process_name="default-booking")
    tx = s.initiate_transaction(listing.id, customer.id, "transition/request-payment")
    s.apply_transition(tx.id, "transition/confirm-payment")
    return tx


async def test_operator_transition_returns_a_reference(
    preauthorized: Transaction, sim: Simulator, sim_http: SimHttp
) -> None:
    body = {"id": str(preauthorized.id), "transition": "transition/operator-accept", "params": {}}
    answer = await sim_http.command("transactions/transition", body)
    assert answer.status == 200
    assert answer.body == {"data": {"id": str(preauthorized.id), "type": "transaction"}}
    assert preauthorized.state == "state/accepted"
    event = sim.store.events[-1]
    assert (event.event_type, event.source) == ("transaction/transitioned", "source/integration-api")
    assert event.audit_data["clientId"] == sim.config.client_id
    assert sim.store.transition_log[-1].by == "operator"


async def test_expand_returns_the_full_resource(preauthorized: Transaction, sim_http: SimHttp) -> None:
    answer = await sim_http.command(
        "transactions/transition",
        {"id": str(preauthorized.id), "transition": "transition/operator-decline"},
        params={"expand": "true", "include": "customer"},
    )
    tx = models.parse_document(models.Transaction, answer.body)
    assert tx.attributes.state == "state/declined"
    assert tx.attributes.last_transition == "transition/operator-decline"
    assert tx.customer is not None and tx.customer.id == preauthorized.customer_id


@pytest.mark.parametrize(
    "transition",
    [
        "transition/accept",  # the provider's, not the operator's
        "transition/operator-complete",  # operator's, but not from preauthorized
        "transition/mark-delivered",  # another process
        "transition/no-such-thing",
    ],
)
async def test_refused_transitions_are_409_and_change_nothing(
    preauthorized: Transaction, sim: Simulator, sim_http: SimHttp, transition: str
) -> None:
    events = sim.store.last_sequence_id
    answer = await sim_http.command(
        "transactions/transition", {"id": str(preauthorized.id), "transition": transition}
    )
    assert answer.status == 409
    assert answer.error_codes == ["transaction-invalid-transition"]
    assert preauthorized.state == "state/preauthorized" and sim.store.last_sequence_id == events


async def test_command_validation(preauthorized: Transaction, sim_http: SimHttp) -> None:
    answer = await sim_http.command("transactions/transition", {"transition": "transition/operator-accept"})
    assert answer.status == 400 and answer.error_codes == ["validation-missing-key"]
    assert answer.body["errors"][0]["source"] == {"path": ["id"], "type": "body"}
    answer = await sim_http.command(
        "transactions/transition", {"id": "abc", "transition": "transition/operator-accept"}
    )
    assert answer.status == 400 and answer.error_paths == [["id"]]
    answer = await sim_http.command(
        "transactions/transition", {"id": str(uuid.uuid4()), "transition": "transition/operator-accept"}
    )
    assert answer.status == 404 and answer.error_codes == ["not-found"]
    answer = await sim_http.command(
        "transactions/transition", {"id": str(preauthorized.id), "transition": "transition/operator-accept"},
        params={"expand": "maybe"},
    )  # fmt: skip
    assert answer.status == 400 and answer.error_paths == [["expand"]]
    assert preauthorized.state == "state/preauthorized"  # nothing ran


async def test_update_metadata_merges_and_emits_an_event(
    preauthorized: Transaction, sim: Simulator, sim_http: SimHttp
) -> None:
    tx_id = str(preauthorized.id)
    first = await sim_http.command(
        "transactions/update_metadata", {"id": tx_id, "metadata": {"crm": {"deal": 7}}}
    )
    assert first.status == 200 and first.body == {"data": {"id": tx_id, "type": "transaction"}}
    second = await sim_http.command(
        "transactions/update_metadata",
        {"id": tx_id, "metadata": {"crm": None, "sms": "sent"}},
        params={"expand": "true"},
    )
    assert models.parse_document(models.Transaction, second.body).attributes.metadata == {"sms": "sent"}
    events = (await sim_http.get("events/query", {"eventTypes": "transaction/updated"})).body["data"]
    # Per top-level metadata key: null for a key that was added, the old value for one removed.
    assert [e["attributes"]["previousValues"] for e in events] == [
        {"attributes": {"metadata": {"crm": None}}},
        {"attributes": {"metadata": {"crm": {"deal": 7}, "sms": None}}},
    ]
    assert events[-1]["attributes"]["resource"]["attributes"]["metadata"] == {"sms": "sent"}
    bad = await sim_http.command("transactions/update_metadata", {"id": tx_id, "metadata": [1]})
    assert bad.status == 400 and bad.error_paths == [["metadata"]]
    missing = await sim_http.command("transactions/update_metadata", {"id": tx_id})
    assert missing.status == 400 and missing.error_codes == ["validation-missing-key"]


async def test_transit_command_bodies_and_answers(preauthorized: Transaction, sim_http: SimHttp) -> None:
    # What a Transit SDK sends: keyword keys, a tagged UUID, the transition as a keyword.
    raw = (
        f'["^ ","~:id","~u{preauthorized.id}",'
        '"~:transition","~:transition/operator-accept","~:params",["^ "]]'
    ).encode()
    headers = {
        "Authorization": f"bearer {sim_http.token}",
        "Content-Type": wire.TRANSIT_MIME,
        "Accept": wire.TRANSIT_MIME,
    }
    url = f"{sim_http.base_url}{API}/transactions/transition?expand=true"
    async with sim_http.session.post(url, data=raw, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == wire.TRANSIT_MIME
        body = wire.decode(await resp.read(), wire.TRANSIT_MIME)
    assert models.parse_document(models.Transaction, body).attributes.state == "state/accepted"
    answer = await sim_http.command(
        "transactions/update_metadata",
        {"id": preauthorized.id, "metadata": {"n": 1}},
        content_type=wire.TRANSIT_MIME,
    )
    assert answer.status == 200 and preauthorized.metadata == {"n": 1}


async def test_unsupported_or_broken_bodies(preauthorized: Transaction, sim_http: SimHttp) -> None:
    url = f"{sim_http.base_url}{API}/transactions/transition"
    headers = {"Authorization": f"bearer {sim_http.token}"}
    async with sim_http.session.post(url, data={"id": str(preauthorized.id)}, headers=headers) as resp:
        assert resp.status == 415
    async with sim_http.session.post(
        url, data=b'{"id": ', headers={**headers, "Content-Type": wire.JSON_MIME}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["errors"][0]["code"] == "validation-invalid-value"
