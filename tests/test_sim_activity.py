"""Traffic's side activity: messages, deletions and bans, seeded, met by a client over HTTP."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import aiohttp
import pytest

from tests.simkit import SimHttp
from worker.cli import build_parser, sim_config
from worker.errors import ConfigError
from worker.processes import INITIAL_STATE
from worker.sim import LIVELY, Activity, SimConfig, Simulator, serve
from worker.sim.store import Store, Transaction

BUSY = Activity(
    message_share=0.1,
    user_deletion_share=0.01,
    user_ban_share=0.01,
    listing_deletion_share=0.01,
    transaction_deletion_share=0.01,
)
REMOVALS = ("user/deleted", "user/updated", "listing/deleted", "listing/updated", "transaction/deleted")


def _tx(store: Store, tx_id: uuid.UUID) -> Transaction:
    return store.transactions.get(tx_id) or store.removed_transactions[tx_id]


def _replay_is_legal(store: Store) -> None:
    states: dict[uuid.UUID, str] = {}
    for entry in store.transition_log:
        process = _tx(store, entry.transaction_id).process
        states[entry.transaction_id] = process.target(
            states.get(entry.transaction_id, INITIAL_STATE), entry.transition
        )
    for tx_id, state in states.items():
        assert _tx(store, tx_id).state == state


def _signature(sim: Simulator) -> list[tuple[str, str]]:
    return [(e.event_type, str(e.resource_id)) for e in sim.store.events]


def test_activity_off_is_the_default_and_changes_nothing() -> None:
    plain = Simulator(SimConfig(seed=3, rate_limits=None))
    explicit = Simulator(SimConfig(seed=3, rate_limits=None, activity=Activity()))
    for sim in (plain, explicit):
        sim.traffic.step(300)
    assert _signature(plain) == _signature(explicit)
    types = {e.event_type for e in plain.store.events}
    assert types == {"user/created", "listing/created", "transaction/initiated", "transaction/transitioned"}


def test_same_seed_same_activity() -> None:
    runs = []
    for seed in (8, 8, 9):
        sim = Simulator(SimConfig(seed=seed, rate_limits=None, reviews=True, activity=BUSY))
        sim.traffic.step(400)
        runs.append(_signature(sim))
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_shares_are_checked() -> None:
    with pytest.raises(ConfigError, match="message_share"):
        Activity(message_share=1.5)
    with pytest.raises(ConfigError, match="user_ban_share"):
        Activity(user_ban_share=-0.1)
    assert all(0 < getattr(LIVELY, name) < 0.1 for name in vars(LIVELY))


async def _all_events(http: SimHttp) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        body = (await http.get("events/query", {"startAfterSequenceId": str(after)})).body
        out.extend(body["data"])
        if len(body["data"]) < body["meta"]["perPage"]:
            return out
        after = body["data"][-1]["attributes"]["sequenceId"]


async def _all_pages(http: SimHttp, params: dict[str, str]) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    while True:
        body = (await http.get("transactions/query", {**params, "page": str(len(pages) + 1)})).body
        pages.append(body)
        if len(pages) >= body["meta"]["totalPages"]:
            return pages


async def test_busy_traffic_meets_every_kind_over_http() -> None:
    sim = Simulator(SimConfig(seed=7, rate_limits=None, reviews=True, activity=BUSY))
    sim.traffic.step(800)
    _replay_is_legal(sim.store)
    async with serve(sim) as url, aiohttp.ClientSession() as session:
        http = SimHttp(session, url)
        await http.login()
        events = await _all_events(http)
        counts = Counter(e["attributes"]["eventType"] for e in events)
        for kind in (*REMOVALS, "message/created", "review/created", "review/updated"):
            assert counts[kind] > 0, (kind, counts)
        assert counts["transaction/transitioned"] > 10 * counts["transaction/deleted"]

        deleted_user = next(e for e in events if e["attributes"]["eventType"] == "user/deleted")
        user = (await http.get("users/show", {"id": deleted_user["attributes"]["resourceId"]})).body
        assert user["data"]["attributes"]["deleted"] is True

        deleted_tx = next(e for e in events if e["attributes"]["eventType"] == "transaction/deleted")
        tx_id = deleted_tx["attributes"]["resourceId"]
        assert (await http.get("transactions/show", {"id": tx_id})).status == 404
        truth = (await http.admin("GET", f"transitions?transactionId={tx_id}")).body["data"]
        assert truth and all("transactionDeletedAt" in t for t in truth)
        # Only finished transactions are deleted by traffic.
        gone = sim.store.removed_transactions[uuid.UUID(tx_id)]
        assert gone.process.is_final(gone.state)

        pages = await _all_pages(http, {"include": "customer,provider,listing"})
        included = [r for page in pages for r in page["included"]]
        users = [r["attributes"] for r in included if r["type"] == "user"]
        listings = [r["attributes"] for r in included if r["type"] == "listing"]
        assert any(u["deleted"] for u in users) and any(u["banned"] for u in users)
        assert any(listing["deleted"] for listing in listings)
        assert any(listing["state"] == "closed" for listing in listings)
        messaged = await http.get("transactions/query", {"hasMessage": "true", "include": "messages"})
        assert messaged.body["meta"]["totalItems"] > 0


def test_traffic_copes_with_removals_it_did_not_make() -> None:
    sim = Simulator(SimConfig(seed=5, rate_limits=None))
    sim.traffic.step(120)
    store = sim.store
    frozen = next(t for t in store.transactions.values() if not t.process.is_final(t.state))
    frozen_steps = len(frozen.transitions)
    store.delete_user(frozen.customer_id)
    parties = (frozen.customer_id, frozen.provider_id)
    store.ban_user(next(u for u in sim.traffic.users if not u.gone and u.id not in parties).id)
    store.delete_listing(next(item for item in sim.traffic.listings if not item.deleted).id)
    store.delete_transaction(next(t for t in store.transactions.values() if t.process.is_final(t.state)).id)
    made = len(store.transition_log)
    sim.traffic.step(200)
    assert len(store.transition_log) == made + 200
    _replay_is_legal(store)
    assert all(not u.gone for u in sim.traffic.users)
    assert all(not item.deleted and item.state == "published" for item in sim.traffic.listings)
    # The transaction of the deleted customer never moved again.
    assert len(store.transaction(frozen.id).transitions) == frozen_steps


def test_flexworker_sim_is_lively_unless_told_otherwise() -> None:
    parser = build_parser()
    lively = sim_config(parser.parse_args(["sim"]))
    assert lively.activity == LIVELY and lively.reviews
    quiet = sim_config(
        parser.parse_args(["sim", "--no-reviews", "--message-share", "0", "--user-ban-share", "0.5"])
    )
    assert not quiet.reviews
    assert quiet.activity.message_share == 0 and quiet.activity.user_ban_share == 0.5
    assert quiet.activity.user_deletion_share == LIVELY.user_deletion_share
    # The library default stays quiet: tests pinning a seed's traffic are unaffected.
    assert SimConfig().activity == Activity() and not SimConfig().reviews
