"""The real :class:`IntegrationClient` against the real simulator over localhost HTTP.

``test_client.py`` and ``test_auth.py`` drive the client against scripted fakes, and
``test_sim_*.py`` drive the simulator with raw HTTP; here the two meet. Expected
results come from the simulator's ground truth (``sim.store``) filtered and sorted in
plain Python, following the semantics ``worker.sim.query`` documents. Nothing sleeps
to wait for a condition: loops poll with a deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from worker.api import wire
from worker.api.backoff import Backoff
from worker.api.client import IntegrationClient, TransactionFilters
from worker.api.models import ResourceRef
from worker.api.models import Transaction as TxModel
from worker.api.ratelimit import PRESETS
from worker.errors import (
    AuthError,
    BadRequestError,
    DecodeError,
    NotFoundError,
    PagingLimitError,
    RateLimitedError,
    ServerError,
)
from worker.sim import FaultConfig, SimConfig, Simulator, Store, serve
from worker.sim.store import Transaction

FAST = Backoff(base_s=0.001, cap_s=0.01, max_attempts=8, max_total_s=10)
FAST_DEV = PRESETS["dev"].scaled(0.01)  # the dev buckets, refilling 100x faster
QUERY = "GET /v1/integration_api/transactions/query"
TOKEN = "POST /v1/auth/token"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def make_client(sim: Simulator, url: str, **overrides: Any) -> IntegrationClient:
    kwargs: dict[str, Any] = {"base_url": url, "backoff": FAST, "rng": random.Random(0)}
    kwargs.update(overrides)
    return IntegrationClient(sim.config.client_id, sim.config.client_secret, **kwargs)


@pytest.fixture
async def client(sim: Simulator, sim_url: str) -> AsyncIterator[IntegrationClient]:
    async with make_client(sim, sim_url) as c:
        yield c


@asynccontextmanager
async def served(config: SimConfig) -> AsyncIterator[tuple[Simulator, str]]:
    sim = Simulator(config)
    async with serve(sim) as url:
        yield sim, url


def ms(at: datetime) -> int:
    """Exact integer milliseconds (the store's precision), for sort keys in either direction."""
    return (at - EPOCH) // timedelta(milliseconds=1)


def default_order(txs: Iterable[Transaction]) -> list[uuid.UUID]:
    """``createdAt`` newest first, ties by id ascending (the simulator's documented tie-break)."""
    return [t.id for t in sorted(txs, key=lambda t: (-ms(t.created_at), t.id.int))]


async def walk(client: IntegrationClient, **filters: Any) -> list[uuid.UUID]:
    return [tx.id async for tx in client.iter_transactions(per_page=100, **filters)]


# -- auth ------------------------------------------------------------------------------------


async def test_first_call_gets_a_client_credentials_token(sim: Simulator, client: IntegrationClient) -> None:
    market = await client.marketplace_show()
    assert market.id == sim.store.marketplace.id
    assert market.attributes.name == sim.config.marketplace_name
    assert sim.grants == {"client_credentials": 1}
    await client.marketplace_show()
    assert sim.grants == {"client_credentials": 1}  # the token is cached
    assert client.tokens.requests_sent == 1


async def test_expired_token_is_renewed_with_the_refresh_token(
    sim: Simulator, client: IntegrationClient
) -> None:
    await client.marketplace_show()
    assert sim.expire_tokens() == 1
    await client.marketplace_show()
    assert sim.grants == {"client_credentials": 1, "refresh_token": 1}
    assert sim.stats.answers[401] == 1  # the one rejected API call, then the refresh grant


def spy_refresh_tokens(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the refresh token of every client-credentials grant the simulator makes."""
    issued: list[str] = []
    grant = sim.auth.client_credentials

    def spy(client_id: str, client_secret: str) -> dict[str, Any]:
        tokens = grant(client_id, client_secret)
        issued.append(tokens["refresh_token"])
        return tokens

    monkeypatch.setattr(sim.auth, "client_credentials", spy)
    return issued


async def test_revoked_refresh_token_falls_back_to_client_credentials(
    sim: Simulator, client: IntegrationClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = spy_refresh_tokens(sim, monkeypatch)
    await client.marketplace_show()
    assert sim.auth.revoke(issued[0])  # also ends the access tokens issued with it
    await client.marketplace_show()
    # API 401 -> refresh grant refused (401) -> client-credentials grant -> success.
    assert sim.grants == {"client_credentials": 2}
    assert sim.stats.answers[401] == 2
    assert sim.stats.requests[TOKEN] == 3
    # The new refresh token is the one used from now on.
    sim.expire_tokens()
    await client.marketplace_show()
    assert sim.grants == {"client_credentials": 2, "refresh_token": 1}


async def test_unknown_refresh_token_at_renewal_falls_back_to_client_credentials(
    sim: Simulator, sim_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = spy_refresh_tokens(sim, monkeypatch)
    now = [1000.0]
    async with make_client(sim, sim_url, clock=lambda: now[0]) as client:
        await client.marketplace_show()
        sim.auth.revoke(issued[0])
        now[0] += sim.config.token_lifetime_s  # the client's token is due for renewal
        await client.marketplace_show()
    # Renewed before any API call: the refresh grant is refused, client credentials succeed,
    # and the API itself never answered 401.
    assert sim.grants == {"client_credentials": 2}
    assert sim.stats.answers == {200: 4, 401: 1}
    assert sim.stats.requests[TOKEN] == 3


async def test_short_lived_tokens_are_renewed_before_they_expire() -> None:
    config = SimConfig(seed=1, rate_limits=None, token_lifetime_s=1.0)
    async with served(config) as (sim, url), make_client(sim, url) as client:
        deadline = time.monotonic() + 6
        while sim.grants.get("refresh_token", 0) < 2:
            assert time.monotonic() < deadline, sim.grants
            await client.marketplace_show()
            await asyncio.sleep(0.02)
    assert sim.grants["client_credentials"] == 1
    assert sim.stats.answers[401] == 0  # renewed proactively, never rejected


async def test_wrong_secret_raises_auth_error_without_the_secret(sim: Simulator, sim_url: str) -> None:
    secret = "wrong-secret-f00ba7"
    async with IntegrationClient(sim.config.client_id, secret, base_url=sim_url, backoff=FAST) as client:
        with pytest.raises(AuthError) as caught:
            await client.transactions_query()
        assert secret not in repr(client)
    err = caught.value
    assert err.status == 401
    assert err.codes == ("auth-invalid-client",)
    for text in (str(err), repr(err), err.message, *map(str, err.args)):
        assert secret not in text
    assert sim.grants == {}
    assert sim.stats.requests[TOKEN] == 1  # refused credentials are not retried
    assert sim.stats.requests[QUERY] == 0


# -- transactions/query ------------------------------------------------------------------------


@dataclass
class Market:
    sim: Simulator
    txs: list[Transaction]

    @property
    def store(self) -> Store:
        return self.sim.store

    def where(self, pred: Callable[[Transaction], bool]) -> list[uuid.UUID]:
        return default_order(t for t in self.txs if pred(t))


@pytest.fixture
def market(sim: Simulator) -> Market:
    """300 transactions over 20 days, every 7th with a message (some sharing a millisecond)."""
    now = sim.store.now()
    sim.traffic.build_history(300, start=now - 20 * DAY, end=now)
    txs = list(sim.store.transactions.values())
    for i, tx in enumerate(sorted(txs, key=lambda t: t.id.int)[::7]):
        sim.store.add_message(tx.id, f"hello {i}", at=now + timedelta(minutes=i // 2))
    return Market(sim, txs)


def _median_created(m: Market) -> datetime:
    return sorted(t.created_at for t in m.txs)[len(m.txs) // 2]


def _busiest(m: Market, attr: str) -> uuid.UUID:
    counts: dict[uuid.UUID, int] = {}
    for t in m.txs:
        counts[getattr(t, attr)] = counts.get(getattr(t, attr), 0) + 1
    return max(sorted(counts), key=lambda k: counts[k])


def _booking_window(m: Market) -> tuple[datetime, datetime]:
    starts = sorted(t.booking.start for t in m.txs if t.booking is not None)
    return starts[len(starts) // 3], starts[2 * len(starts) // 3]


def _overlaps(t: Transaction, lo: datetime | None, hi: datetime | None) -> bool:
    b = t.booking
    return b is not None and (hi is None or b.start < hi) and (lo is None or b.end > lo)


Case = Callable[[Market], tuple[TransactionFilters, Callable[[Transaction], bool]]]

FILTER_CASES: dict[str, Case] = {
    # createdAtStart is inclusive, createdAtEnd exclusive: the median itself is on the start side.
    "createdAtStart": lambda m: (
        {"created_at_start": (at := _median_created(m))},
        lambda t: t.created_at >= at,
    ),
    "createdAtEnd": lambda m: (
        {"created_at_end": (at := _median_created(m))},
        lambda t: t.created_at < at,
    ),
    "createdAt window": lambda m: (
        {"created_at_start": (lo := _median_created(m) - 2 * DAY), "created_at_end": (hi := lo + 3 * DAY)},
        lambda t: lo <= t.created_at < hi,
    ),
    "customerId": lambda m: (
        {"customer_id": (u := _busiest(m, "customer_id"))},
        lambda t: t.customer_id == u,
    ),
    "providerId": lambda m: (
        {"provider_id": str(u := _busiest(m, "provider_id"))},  # a string id works too
        lambda t: t.provider_id == u,
    ),
    "listingId": lambda m: (
        {"listing_id": (i := _busiest(m, "listing_id"))},
        lambda t: t.listing_id == i,
    ),
    "lastTransitions": lambda m: (
        {"last_transitions": ["transition/confirm-payment", "transition/inquire"]},
        lambda t: t.last_transition in ("transition/confirm-payment", "transition/inquire"),
    ),
    "processNames": lambda m: (
        {"process_names": ["default-purchase"]},
        lambda t: t.process.name == "default-purchase",
    ),
    "processNames alias": lambda m: (
        {"process_names": "default-booking/release-1"},
        lambda t: t.process.name == "default-booking",
    ),
    "states": lambda m: (
        {"states": ("state/preauthorized", "state/delivered", "state/purchased")},
        lambda t: t.state in ("state/preauthorized", "state/delivered", "state/purchased"),
    ),
    "bookingStart/End": lambda m: (
        {"booking_start": (w := _booking_window(m))[0], "booking_end": w[1]},
        lambda t: _overlaps(t, w[0], w[1]),
    ),
    "bookingStart": lambda m: (
        {"booking_start": (lo := _booking_window(m)[1])},
        lambda t: _overlaps(t, lo, None),
    ),
    "bookingEnd": lambda m: (
        {"booking_end": (hi := _booking_window(m)[0])},
        lambda t: _overlaps(t, None, hi),
    ),
    "hasBooking": lambda m: ({"has_booking": True}, lambda t: t.booking is not None),
    "hasBooking false": lambda m: ({"has_booking": False}, lambda t: t.booking is None),
    "hasPayin": lambda m: ({"has_payin": True}, lambda t: t.payin_total is not None),
    "hasPayin false": lambda m: ({"has_payin": False}, lambda t: t.payin_total is None),
    "hasMessage": lambda m: ({"has_message": True}, lambda t: bool(t.messages)),
    "hasMessage false": lambda m: ({"has_message": False}, lambda t: not t.messages),
    "combined": lambda m: (
        {
            "process_names": ["default-booking"],
            "has_payin": True,
            "created_at_start": (at := _median_created(m)),
        },
        lambda t: t.process.name == "default-booking" and t.payin_total is not None and t.created_at >= at,
    ),
}


@pytest.mark.parametrize("case", FILTER_CASES, ids=list(FILTER_CASES))
async def test_every_filter_matches_the_store(case: str, market: Market, client: IntegrationClient) -> None:
    filters, pred = FILTER_CASES[case](market)
    expected = market.where(pred)
    assert 0 < len(expected) < len(market.txs), "the case must discriminate"
    assert await walk(client, **filters) == expected
    first = await client.transactions_query(per_page=10, **filters)
    assert first.meta.total_items == len(expected)


SORT_CASES: dict[str, tuple[Any, Callable[[Transaction], tuple[Any, ...]]]] = {
    # Sharetribe's convention: a bare key is newest first, "-" oldest first.
    "lastTransitionedAt": ("lastTransitionedAt", lambda t: (-ms(t.last_transitioned_at), t.id.int)),
    "-lastTransitionedAt": ("-lastTransitionedAt", lambda t: (ms(t.last_transitioned_at), t.id.int)),
    "-createdAt": ("-createdAt", lambda t: (ms(t.created_at), t.id.int)),
    # Transactions without messages come after those with, in either direction.
    "lastMessageAt,-createdAt": (
        ["lastMessageAt", "-createdAt"],
        lambda t: (
            t.last_message_at is None,
            -ms(t.last_message_at) if t.last_message_at else 0,
            ms(t.created_at),
            t.id.int,
        ),
    ),
    # Transactions started in the same millisecond are ordered by the second key.
    "createdAt,-lastTransitionedAt": (
        ("createdAt", "-lastTransitionedAt"),
        lambda t: (-ms(t.created_at), ms(t.last_transitioned_at), t.id.int),
    ),
}


@pytest.mark.parametrize("case", SORT_CASES, ids=list(SORT_CASES))
async def test_sort(case: str, market: Market, client: IntegrationClient) -> None:
    sort, key = SORT_CASES[case]
    expected = [t.id for t in sorted(market.txs, key=key)]
    assert await walk(client, sort=sort) == expected


async def test_sorting_really_is_newest_first(market: Market, client: IntegrationClient) -> None:
    newest = (await client.transactions_query(per_page=1, sort="lastTransitionedAt")).data[0]
    oldest = (await client.transactions_query(per_page=1, sort="-lastTransitionedAt")).data[0]
    latest = max(t.last_transitioned_at for t in market.txs)
    earliest = min(t.last_transitioned_at for t in market.txs)
    assert newest.attributes.last_transitioned_at == latest
    assert oldest.attributes.last_transitioned_at == earliest
    assert latest > earliest


async def test_paging_meta_and_pages(sim: Simulator, market: Market, client: IntegrationClient) -> None:
    expected = market.where(lambda t: True)
    page = await client.transactions_query(page=2, per_page=7)
    assert [t.id for t in page.data] == expected[7:14]
    assert page.meta.total_items == len(expected) == 300
    assert page.meta.total_pages == 43  # ceil(300 / 7)
    assert (page.meta.page, page.meta.per_page) == (2, 7)
    last = await client.transactions_query(page=43, per_page=7)
    assert [t.id for t in last.data] == expected[294:]
    # iter_transactions walks every page once, in order, and stops at the last.
    sim.stats.reset()
    ids = [t.id async for t in client.iter_transactions(per_page=7)]
    assert ids == expected
    assert sim.stats.requests[QUERY] == 43


def oldest_first(txs: Iterable[Transaction]) -> list[uuid.UUID]:
    """``-createdAt``: oldest first, ties by id ascending."""
    return [t.id for t in sorted(txs, key=lambda t: (ms(t.created_at), t.id.int))]


def created_at(sim: Simulator, times: Iterable[datetime]) -> None:
    """One transaction created at each of ``times``."""
    store = sim.store
    provider, customer = store.create_user(), store.create_user()
    listing = store.create_listing(provider.id, process_name="default-booking")
    for at in times:
        store.initiate_transaction(listing.id, customer.id, "transition/inquire", at=at)


async def test_page_cap() -> None:
    async with served(SimConfig(seed=3, rate_limits=None, page_cap=25)) as (sim, url):
        now = sim.store.now()
        sim.traffic.build_history(40, start=now - DAY, end=now)
        txs = list(sim.store.transactions.values())
        async with make_client(sim, url) as client:
            first = await client.transactions_query(per_page=10)
            assert first.meta.total_items == 40  # every match is counted...
            assert first.meta.total_pages == 3  # ...but only pages under the cap are reachable
            # The walk runs into the cap after 25 and goes on by createdAt: all 40, once, in order.
            sim.stats.reset()
            ids = [t.id async for t in client.iter_transactions(per_page=10)]
            assert ids == default_order(txs)
            assert sim.stats.requests[QUERY] == 5  # 10 + 10 + 5 (cut at the cap), then 10 + 6
            oldest = [t.id async for t in client.iter_transactions(per_page=10, sort="-createdAt")]
            assert oldest == oldest_first(txs)
            with pytest.raises(BadRequestError) as caught:
                await client.transactions_query(page=4, per_page=10)
    err = caught.value
    assert err.status == 400
    assert err.codes == ("validation-invalid-params",)
    assert err.errors[0].source_path == ("page",)
    assert err.attempts == 1  # a refusal is not retried


async def test_a_walk_that_cannot_go_past_the_cap_raises() -> None:
    async with served(SimConfig(seed=3, rate_limits=None, page_cap=25)) as (sim, url):
        now = sim.store.now()
        sim.traffic.build_history(40, start=now - DAY, end=now)
        async with make_client(sim, url) as client:
            # Sorted by lastTransitionedAt, createdAt windows cannot keep the order: no silent stop.
            seen: list[uuid.UUID] = []

            async def walk_by_transition() -> None:
                async for tx in client.iter_transactions(per_page=10, sort="lastTransitionedAt"):
                    seen.append(tx.id)

            with pytest.raises(PagingLimitError, match="matches 40 transactions"):
                await walk_by_transition()
            assert len(seen) == 25  # the server's cap is found only when it cuts the walk
        seen.clear()
        async with make_client(sim, url, page_cap=25) as client:
            with pytest.raises(PagingLimitError, match="paging reaches only 25"):
                await walk_by_transition()
            assert seen == []  # a cap known from the start fails the walk before it yields


async def test_the_walk_past_the_cap_keeps_ties_at_the_window_edge() -> None:
    async with served(SimConfig(seed=4, rate_limits=None, page_cap=5)) as (sim, url):
        t0 = sim.store.now() - DAY
        # Ten transactions in three milliseconds: the cap (5) cuts through the middle one.
        created_at(
            sim, [t0] * 3 + [t0 + timedelta(milliseconds=1)] * 4 + [t0 + timedelta(milliseconds=2)] * 3
        )
        txs = list(sim.store.transactions.values())
        async with make_client(sim, url) as client:
            assert [t.id async for t in client.iter_transactions(per_page=2)] == default_order(txs)
            oldest = [
                t.id
                async for t in client.iter_transactions(per_page=2, sort=["-createdAt", "lastTransitionedAt"])
            ]
            assert oldest == oldest_first(txs)
        # A client that knows a lower cap than the server's stops paging there by itself.
        sim.stats.reset()
        async with make_client(sim, url, page_cap=4) as client:
            assert [t.id async for t in client.iter_transactions(per_page=2)] == default_order(txs)
        assert sim.stats.answers[400] == 0


async def test_a_transaction_created_during_the_walk_does_not_repeat_one(
    sim: Simulator, client: IntegrationClient
) -> None:
    t0 = sim.store.now() - DAY
    created_at(sim, [t0 + timedelta(minutes=i) for i in range(6)])
    expected = default_order(sim.store.transactions.values())
    ids: list[uuid.UUID] = []
    async for tx in client.iter_transactions(per_page=2):
        ids.append(tx.id)
        if len(ids) == 2:
            # Newest first: the new one goes to the head and pushes every page back by one.
            created_at(sim, [sim.store.now()])
    assert ids == expected


async def test_more_transactions_in_one_millisecond_than_paging_reaches_raises() -> None:
    async with served(SimConfig(seed=4, rate_limits=None, page_cap=5)) as (sim, url):
        created_at(sim, [sim.store.now() - DAY] * 7)
        async with make_client(sim, url) as client:
            with pytest.raises(PagingLimitError, match=r"created at \S+ than paging reaches"):
                _ = [t async for t in client.iter_transactions(per_page=2)]


async def test_include_resolves_parties_and_listing(market: Market, client: IntegrationClient) -> None:
    store = market.store
    page = await client.transactions_query(per_page=30, include=["customer", "provider", "listing"])
    assert len(page.data) == 30
    for tx in page.data:
        truth = store.transactions[tx.id]
        customer, provider = store.users[truth.customer_id], store.users[truth.provider_id]
        listing = store.listings[truth.listing_id]
        assert tx.customer is not None and tx.provider is not None and tx.listing is not None
        assert tx.customer.id == customer.id and tx.customer.attributes.email == customer.email
        assert tx.customer.attributes.profile.first_name == customer.first_name
        assert tx.provider.id == provider.id and tx.provider.attributes.email == provider.email
        assert tx.listing.id == listing.id and tx.listing.attributes.title == listing.title
        assert tx.listing.attributes.price is not None
        assert tx.listing.attributes.price.amount == listing.price.amount
    plain = await client.transactions_query(per_page=5)
    assert all(t.customer is None and t.provider is None and t.listing is None for t in plain.data)
    # The show endpoints resolve includes the same way.
    one = await client.transactions_show(page.data[0].id, include=("customer", "listing"))
    assert one.customer == page.data[0].customer and one.listing == page.data[0].listing
    assert one.provider is None


async def test_show_endpoints_and_unknown_ids(market: Market, client: IntegrationClient) -> None:
    store = market.store
    tx = market.txs[0]
    shown = await client.transactions_show(tx.id)
    assert shown.id == tx.id and shown.attributes.state == tx.state
    user = await client.users_show(tx.customer_id)
    assert user.attributes.email == store.users[tx.customer_id].email
    listing = await client.listings_show(tx.listing_id, include=["author"])
    assert listing.author is not None and listing.author.id == tx.provider_id
    with pytest.raises(NotFoundError) as caught:
        await client.transactions_show(uuid.UUID(int=1))
    assert caught.value.codes == ("not-found",) and caught.value.attempts == 1


REQUIRED_TX_FIELDS = [
    "createdAt",
    "processName",
    "processVersion",
    "lastTransition",
    "lastTransitionedAt",
    "transitions",
]


async def test_sparse_fields(sim: Simulator, market: Market, client: IntegrationClient) -> None:
    tx = market.txs[0]
    sim.store.update_metadata(tx.id, {"crm": "c-1"})
    shown = await client.transactions_show(
        tx.id,
        include=["customer"],
        fields={"transaction": [*REQUIRED_TX_FIELDS, "metadata"], "user": ["createdAt", "email"]},
    )
    assert shown.attributes.metadata == {"crm": "c-1"}
    assert shown.attributes.state is None and shown.attributes.line_items == []  # left out
    assert shown.attributes.last_transition == tx.last_transition
    assert shown.customer is not None
    assert shown.customer.attributes.email == sim.store.users[tx.customer_id].email
    assert shown.customer.attributes.profile.first_name is None  # left out
    page = await client.transactions_query(per_page=20, fields={"transaction": REQUIRED_TX_FIELDS})
    assert [t.id for t in page.data] == market.where(lambda t: True)[:20]
    assert all(t.attributes.state is None and t.attributes.payin_total is None for t in page.data)
    # Leaving out a field the models require sets every item aside, without retrying.
    sim.stats.reset()
    bare = await client.transactions_query(per_page=5, fields={"transaction": ["state"]})
    assert bare.data == [] and bare.received == 5
    assert all("createdAt" in item.reason for item in bare.rejected)
    assert sim.stats.requests[QUERY] == 1


# -- events/query -------------------------------------------------------------------------------


async def test_events_query_filters(sim: Simulator, market: Market, client: IntegrationClient) -> None:
    events = sim.store.events
    assert len(events) > 300
    tx = market.txs[0]
    user = _busiest(market, "customer_id")
    middle = events[len(events) // 2].created_at
    cases: list[tuple[dict[str, Any], Callable[[Any], bool]]] = [
        ({}, lambda e: True),
        ({"start_after_sequence_id": 250}, lambda e: e.sequence_id > 250),
        ({"created_at_start": middle}, lambda e: e.created_at >= middle),
        (
            {"event_types": ["transaction/transitioned", "message/created"]},
            lambda e: e.event_type in ("transaction/transitioned", "message/created"),
        ),
        ({"resource_id": tx.id}, lambda e: e.resource_id == tx.id),
        ({"related_resource_id": user}, lambda e: user in e.related_ids),
        ({"per_page": 7, "event_types": "user/created"}, lambda e: e.event_type == "user/created"),
        (
            {"start_after_sequence_id": 40, "event_types": "transaction/initiated", "per_page": 30},
            lambda e: e.sequence_id > 40 and e.event_type == "transaction/initiated",
        ),
    ]
    for filters, pred in cases:
        per_page = filters.get("per_page", 100)
        expected = [e.sequence_id for e in events if pred(e)][:per_page]
        page = await client.events_query(**filters)
        got = [e.attributes.sequence_id for e in page.data]
        assert got == expected, filters
        assert got and (len(got) < len(events) or not filters)
    # A transaction event carries the transaction as it was after the change.
    page = await client.events_query(resource_id=tx.id, event_types="transaction/initiated")
    (initiated,) = page.data
    assert initiated.attributes.resource_id == tx.id
    snapshot = initiated.transaction()
    assert snapshot is not None and snapshot.id == tx.id
    assert snapshot.attributes.last_transition == tx.transitions[0].transition


# -- commands ----------------------------------------------------------------------------------


def preauthorized_booking(sim: Simulator) -> Transaction:
    store = sim.store
    sim.traffic.setup()
    listing = next(li for li in sim.traffic.listings if li.process_name == "default-booking")
    customer = next(u for u in sim.traffic.users if u.id != listing.author_id)
    tx = store.initiate_transaction(listing.id, customer.id, "transition/request-payment")
    store.apply_transition(tx.id, "transition/confirm-payment")
    assert tx.state == "state/preauthorized"
    return tx


async def test_transactions_transition(sim: Simulator, client: IntegrationClient) -> None:
    tx = preauthorized_booking(sim)
    result = await client.transactions_transition(tx.id, "transition/operator-accept")
    assert isinstance(result, TxModel)
    assert result.id == tx.id
    assert result.attributes.state == "state/accepted" == tx.state
    assert result.attributes.last_transition == "transition/operator-accept"
    logged = sim.transition_log[-1]
    assert logged.transaction_id == tx.id and logged.transition == "transition/operator-accept"
    assert logged.by == "operator"
    assert sim.store.events[-1].source == "source/integration-api"
    # Not expanded: only the reference comes back, and the change still happened.
    other = preauthorized_booking(sim)
    ref = await client.transactions_transition(str(other.id), "transition/operator-decline", expand=False)
    assert ref == ResourceRef(id=other.id, type="transaction")
    assert other.state == "state/declined"
    # A repeated or illegal transition is a 409, raised at once (commands are not retried).
    before = len(sim.transition_log)
    with pytest.raises(BadRequestError) as caught:
        await client.transactions_transition(tx.id, "transition/operator-accept")
    assert caught.value.status == 409 and caught.value.codes == ("transaction-invalid-transition",)
    assert caught.value.attempts == 1
    with pytest.raises(BadRequestError):
        await client.transactions_transition(tx.id, "transition/complete")  # a system transition
    assert len(sim.transition_log) == before


async def test_transactions_update_metadata(sim: Simulator, client: IntegrationClient) -> None:
    tx = preauthorized_booking(sim)
    events = len(sim.store.events)
    result = await client.transactions_update_metadata(tx.id, {"crm": {"id": "c-7", "tags": [1, 2]}, "n": 3})
    assert isinstance(result, TxModel)
    assert result.attributes.metadata == {"crm": {"id": "c-7", "tags": [1, 2]}, "n": 3}
    assert tx.metadata == result.attributes.metadata
    assert sim.store.events[-1].event_type == "transaction/updated"
    ref = await client.transactions_update_metadata(tx.id, {"n": None, "ok": True}, expand=False)
    assert ref == ResourceRef(id=tx.id, type="transaction")
    assert tx.metadata == {"crm": {"id": "c-7", "tags": [1, 2]}, "ok": True}
    assert len(sim.store.events) == events + 2
    with pytest.raises(NotFoundError):
        await client.transactions_update_metadata(uuid.UUID(int=5), {"x": 1})


# -- rate limits ----------------------------------------------------------------------------------


async def test_a_burst_paced_by_the_same_buckets_never_sees_429() -> None:
    async with served(SimConfig(seed=1, rate_limits=FAST_DEV)) as (sim, url):
        sim.traffic.step(20)
        async with make_client(sim, url, rate_limits=FAST_DEV) as client:
            started = time.monotonic()
            pages = await asyncio.gather(*(client.transactions_query(per_page=1) for _ in range(500)))
            elapsed = time.monotonic() - started
    assert len(pages) == 500 and all(len(p.data) == 1 for p in pages)
    assert sim.stats.too_many_requests == 0, sim.stats.to_json()
    assert sim.stats.requests[QUERY] == 500  # nothing was retried
    # 500 queries against a 200-token bucket refilling 100/s cannot finish much sooner.
    assert elapsed >= (500 - FAST_DEV.queries.capacity) / 100 * 0.9


async def test_without_client_limits_the_sim_answers_429_and_the_client_retries() -> None:
    patient = Backoff(base_s=0.005, cap_s=0.1, max_attempts=1000, max_total_s=30)
    async with served(SimConfig(seed=1, rate_limits=FAST_DEV)) as (sim, url):
        sim.traffic.step(20)
        async with make_client(sim, url, rate_limits=None, backoff=patient) as client:
            pages = await asyncio.gather(*(client.transactions_query(per_page=1) for _ in range(250)))
    assert len(pages) == 250 and all(len(p.data) == 1 for p in pages)
    assert sim.stats.too_many_requests > 0
    assert sim.stats.answers[200] == 250 + 1  # every query, plus the token grant
    assert sim.stats.requests[QUERY] == 250 + sim.stats.too_many_requests


async def test_429_beyond_the_retry_budget_raises_rate_limited() -> None:
    impatient = Backoff(base_s=0.001, cap_s=0.002, max_attempts=3, max_total_s=5)
    async with (
        served(SimConfig(seed=1, rate_limits=PRESETS["dev"])) as (sim, url),
        make_client(sim, url, rate_limits=None, backoff=impatient) as client,
    ):
        calls = (client.marketplace_show() for _ in range(130))
        results = await asyncio.gather(*calls, return_exceptions=True)
    limited = [r for r in results if isinstance(r, RateLimitedError)]
    assert limited and len(limited) + sum(1 for r in results if not isinstance(r, Exception)) == 130
    assert all(e.status == 429 and e.codes == ("too-many-requests",) and e.attempts == 3 for e in limited)


# -- faults --------------------------------------------------------------------------------------


async def test_queries_complete_through_every_kind_of_fault(
    sim: Simulator, market: Market, client: IntegrationClient
) -> None:
    sim.faults = FaultConfig(error_rate=0.1, drop_rate=0.1, truncated_rate=0.1, malformed_rate=0.1)
    client.backoff = Backoff(base_s=0.001, cap_s=0.01, max_attempts=30, max_total_s=20)
    # Sequential paging...
    ids = [t.id async for t in client.iter_transactions(per_page=10)]
    assert ids == market.where(lambda t: True)
    # ...and concurrent calls sharing the pool while connections break under them.
    some = market.txs[:60]
    shown = await asyncio.gather(*(client.transactions_show(t.id) for t in some))
    assert [s.id for s in shown] == [t.id for t in some]
    events = await client.events_query(per_page=50)
    assert [e.attributes.sequence_id for e in events.data] == list(range(1, 51))
    faults = sim.stats.faults
    assert all(faults[kind] > 0 for kind in ("error", "drop", "truncated", "malformed")), faults
    assert sim.stats.faults_injected >= 20


async def test_persistent_server_errors_raise_after_the_configured_attempts(
    sim: Simulator, client: IntegrationClient
) -> None:
    await client.marketplace_show()  # token first: auth is never faulted anyway
    sim.faults = FaultConfig(error_rate=1.0)
    client.backoff = Backoff(base_s=0.001, cap_s=0.01, max_attempts=3, max_total_s=10)
    with pytest.raises(ServerError) as caught:
        await client.transactions_query()
    assert caught.value.status in (500, 502, 503)
    assert caught.value.attempts == 3
    assert sim.stats.faults["error"] == 3
    assert sim.stats.requests[QUERY] == 3


async def test_persistent_malformed_bodies_raise_a_decode_error(
    sim: Simulator, client: IntegrationClient
) -> None:
    sim.traffic.step(5)
    sim.faults = FaultConfig(malformed_rate=1.0)
    client.backoff = Backoff(base_s=0.001, cap_s=0.01, max_attempts=2, max_total_s=10)
    with pytest.raises(DecodeError) as caught:
        await client.transactions_query()
    err = caught.value
    assert "not valid application/json" in str(err)
    assert isinstance(err.__cause__, wire.WireFormatError)
    assert err.attempts == 2
    assert sim.stats.faults["malformed"] == 2


# -- Transit -------------------------------------------------------------------------------------


@dataclass
class Exchange:
    request: str
    content_type: str | None
    body: bytes = b""
    answer_type: str | None = None


class Wiretap:
    """Records what a client's session sends and what comes back (an aiohttp trace)."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_start.append(self._start)
        self.trace.on_request_chunk_sent.append(self._chunk)
        self.trace.on_request_end.append(self._end)

    async def _start(self, _: Any, __: SimpleNamespace, params: aiohttp.TraceRequestStartParams) -> None:
        request = f"{params.method} {params.url.path}"
        self.exchanges.append(Exchange(request, params.headers.get("Content-Type")))

    async def _chunk(self, _: Any, __: SimpleNamespace, params: aiohttp.TraceRequestChunkSentParams) -> None:
        self.exchanges[-1].body += params.chunk

    async def _end(self, _: Any, __: SimpleNamespace, params: aiohttp.TraceRequestEndParams) -> None:
        self.exchanges[-1].answer_type = params.response.headers.get("Content-Type")

    def api(self) -> list[Exchange]:
        return [e for e in self.exchanges if "/integration_api/" in e.request]


async def test_transit_client_reads_the_same_transactions(
    sim: Simulator, sim_url: str, market: Market, client: IntegrationClient
) -> None:
    include = ["customer", "provider", "listing"]
    tap = Wiretap()
    async with aiohttp.ClientSession(trace_configs=[tap.trace]) as session:
        transit = make_client(sim, sim_url, accept=wire.TRANSIT_MIME, session=session)
        t_page = await transit.transactions_query(per_page=50, include=include, sort="-lastTransitionedAt")
        t_events = await transit.events_query(per_page=50, start_after_sequence_id=100)
        t_show = await transit.transactions_show(market.txs[3].id, include=include)
    j_page = await client.transactions_query(per_page=50, include=include, sort="-lastTransitionedAt")
    j_events = await client.events_query(per_page=50, start_after_sequence_id=100)
    j_show = await client.transactions_show(market.txs[3].id, include=include)
    answers = tap.api()
    assert len(answers) == 3
    assert all((e.answer_type or "").startswith(wire.TRANSIT_MIME) for e in answers), answers
    assert len(t_page.data) == 50
    # Everything but the server's clock, which may tick between the two answers.
    assert t_page.model_copy(update={"served_at": None}) == j_page.model_copy(update={"served_at": None})
    for t, j in zip(t_page.data, j_page.data, strict=True):
        assert (t.customer, t.provider, t.listing) == (j.customer, j.provider, j.listing)
        assert t.customer is not None
    assert t_events.model_copy(update={"served_at": None}) == j_events.model_copy(update={"served_at": None})
    assert t_show == j_show and t_show.listing == j_show.listing


async def test_transit_command_body_is_applied(sim: Simulator, sim_url: str) -> None:
    tx = preauthorized_booking(sim)
    metadata = {"crm": {"id": "c-9", "tags": ["a", "b"]}, "score": 4, "ok": False}
    tap = Wiretap()
    async with aiohttp.ClientSession(trace_configs=[tap.trace]) as session:
        client = make_client(sim, sim_url, accept=wire.TRANSIT_MIME, session=session)
        result = await client.transactions_update_metadata(tx.id, metadata)
    assert tx.metadata == metadata
    assert result.attributes.metadata == metadata
    (command,) = tap.api()
    assert command.request.endswith("/transactions/update_metadata")
    assert command.content_type == wire.TRANSIT_MIME
    # A Transit map, with the id tagged as a UUID as Flex expects.
    assert command.body.startswith(b'["^ "') and b"~u" + str(tx.id).encode() in command.body
    assert (command.answer_type or "").startswith(wire.TRANSIT_MIME)


# -- the acceptance check ------------------------------------------------------------------


async def test_walk_5000_transactions_on_the_dev_preset() -> None:
    dev = PRESETS["dev"]
    async with served(SimConfig(seed=1, rate_limits=dev)) as (sim, url):
        now = sim.store.now()
        sim.traffic.build_history(5000, start=now - 90 * DAY, end=now)
        assert len(sim.store.transactions) == 5000
        async with make_client(sim, url, rate_limits=dev) as client:
            ids = await walk(client)
    assert len(ids) == len(set(ids)) == 5000
    assert set(ids) == set(sim.store.transactions)
    assert ids == default_order(sim.store.transactions.values())
    assert sim.stats.too_many_requests == 0
    assert sim.stats.requests[QUERY] == 50
