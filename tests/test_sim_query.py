"""transactions/query and the show endpoints over HTTP: filters, sort, paging, include, fields, errors."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from tests.simkit import SimHttp
from worker.api import models, wire
from worker.api.wire import Money
from worker.sim import SimConfig, Simulator, serve
from worker.sim.store import Transaction

BASE = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
H = timedelta(hours=1)


@dataclass
class World:
    p1: uuid.UUID
    p2: uuid.UUID
    c1: uuid.UUID
    c2: uuid.UUID
    lb: uuid.UUID
    lp: uuid.UUID
    tx: dict[str, Transaction]

    def ids(self, *names: str) -> set[str]:
        return {str(self.tx[n].id) for n in names}


@pytest.fixture
def world(sim: Simulator) -> World:
    """Five transactions with known times, parties, states, bookings and messages."""
    s = sim.store
    p1, p2, c1, c2 = (s.create_user().id for _ in range(4))
    lb = s.create_listing(p1, process_name="default-booking", price=Money(1000, "USD")).id
    lp = s.create_listing(p2, process_name="default-purchase", price=Money(2500, "USD")).id
    a = s.initiate_transaction(lb, c1, "transition/inquire", at=BASE)
    b = s.initiate_transaction(
        lb,
        c2,
        "transition/request-payment",
        at=BASE + H,
        booking_start=datetime(2024, 6, 1, tzinfo=UTC),
        booking_end=datetime(2024, 6, 4, tzinfo=UTC),
    )
    s.apply_transition(b.id, "transition/confirm-payment", at=BASE + H + timedelta(minutes=1))
    s.apply_transition(b.id, "transition/accept", at=BASE + 5 * H)
    c = s.initiate_transaction(lp, c1, "transition/request-payment", at=BASE + 2 * H, quantity=1)
    s.apply_transition(c.id, "transition/confirm-payment", at=BASE + 2 * H + timedelta(seconds=30))
    e = s.initiate_transaction(lp, c2, "transition/inquire", at=BASE + 2 * H)  # same ms as c
    d = s.initiate_transaction(
        lb,
        c2,
        "transition/request-payment",
        at=BASE + 3 * H,
        booking_start=datetime(2024, 7, 10, tzinfo=UTC),
        booking_end=datetime(2024, 7, 12, tzinfo=UTC),
    )
    s.apply_transition(d.id, "transition/expire-payment", at=BASE + 3 * H + timedelta(minutes=15))
    s.add_message(a.id, "is it free?", at=BASE + 6 * H)
    s.add_message(c.id, "thanks", at=BASE + 7 * H)
    return World(p1, p2, c1, c2, lb, lp, {"a": a, "b": b, "c": c, "d": d, "e": e})


async def _ids(http: SimHttp, **params: str) -> list[str]:
    answer = await http.get("transactions/query", params)
    assert answer.status == 200, answer.raw
    return [item["id"] for item in answer.body["data"]]


def _t(at: datetime) -> str:
    return wire.format_time(at)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, "abcde"),
        ({"createdAtStart": _t(BASE + H)}, "bcde"),
        ({"createdAtEnd": _t(BASE + 2 * H)}, "ab"),
        ({"createdAtStart": _t(BASE + H), "createdAtEnd": _t(BASE + 3 * H)}, "bce"),
        ({"lastTransitions": "transition/accept,transition/expire-payment"}, "bd"),
        ({"processNames": "default-purchase"}, "ce"),
        ({"processNames": "default-booking/release-1"}, "abd"),
        ({"states": "state/inquiry"}, "ae"),
        ({"states": "state/accepted,state/purchased"}, "bc"),
        ({"bookingStart": "2024-06-03T00:00:00Z", "bookingEnd": "2024-07-11T00:00:00Z"}, "bd"),
        ({"bookingStart": "2024-06-04T00:00:00.000Z"}, "d"),  # bookings end exclusively
        ({"bookingEnd": "2024-06-01T00:00:00.000Z"}, ""),
        ({"hasBooking": "true"}, "bd"),
        ({"hasBooking": "false"}, "ace"),
        ({"hasPayin": "true"}, "bcd"),
        ({"hasPayin": "false"}, "ae"),
        ({"hasMessage": "true"}, "ac"),
        ({"hasMessage": "false", "hasPayin": "true"}, "bd"),
    ],
)
async def test_filters(world: World, sim_http: SimHttp, params: dict[str, str], expected: str) -> None:
    assert set(await _ids(sim_http, **params)) == world.ids(*expected)


async def test_party_and_listing_filters(world: World, sim_http: SimHttp) -> None:
    assert set(await _ids(sim_http, customerId=str(world.c1))) == world.ids("a", "c")
    assert set(await _ids(sim_http, providerId=str(world.p2))) == world.ids("c", "e")
    assert set(await _ids(sim_http, listingId=str(world.lb))) == world.ids("a", "b", "d")
    assert await _ids(sim_http, customerId=str(world.p1)) == []


def _ordered(world: World, names: str) -> list[str]:
    return [str(world.tx[n].id) for n in names]


async def test_sort_directions_ties_and_multiple_keys(world: World, sim_http: SimHttp) -> None:
    c_e = "ce" if world.tx["c"].id.int < world.tx["e"].id.int else "ec"  # ties break by id, ascending
    assert await _ids(sim_http) == _ordered(world, "d" + c_e + "ba")  # default: newest first
    assert await _ids(sim_http, sort="createdAt") == _ordered(world, "d" + c_e + "ba")
    assert await _ids(sim_http, sort="-createdAt") == _ordered(world, "ab" + c_e + "d")
    assert await _ids(sim_http, sort="lastTransitionedAt") == _ordered(world, "bdcea")
    assert await _ids(sim_http, sort="-lastTransitionedAt") == _ordered(world, "aecdb")
    # c and e were created in the same millisecond: the second key decides, both ways.
    assert await _ids(sim_http, sort="createdAt,lastTransitionedAt") == _ordered(world, "dceba")
    assert await _ids(sim_http, sort="createdAt,-lastTransitionedAt") == _ordered(world, "decba")
    # Transactions without messages come last in either direction; later keys order them.
    assert await _ids(sim_http, sort="lastMessageAt,-createdAt") == _ordered(world, "cabed")
    assert await _ids(sim_http, sort="-lastMessageAt,createdAt,-lastTransitionedAt") == _ordered(
        world, "acdeb"
    )


async def test_paging_meta(world: World, sim_http: SimHttp) -> None:
    seen = []
    for page in (1, 2, 3):
        answer = await sim_http.get(
            "transactions/query", {"perPage": "2", "page": str(page), "sort": "-createdAt"}
        )
        assert answer.body["meta"] == {"totalItems": 5, "totalPages": 3, "page": page, "perPage": 2}
        seen += [item["id"] for item in answer.body["data"]]
    assert seen == (await _ids(sim_http, sort="-createdAt"))
    beyond = await sim_http.get("transactions/query", {"perPage": "2", "page": "9"})
    assert beyond.status == 200 and beyond.body["data"] == []
    default = await sim_http.get("transactions/query")
    assert default.body["meta"] == {"totalItems": 5, "totalPages": 1, "page": 1, "perPage": 100}


async def test_page_cap_makes_deep_items_unreachable() -> None:
    sim = Simulator(SimConfig(seed=4, rate_limits=None, page_cap=25))
    sim.traffic.build_history(60, start=sim.store.now() - timedelta(days=1))
    async with serve(sim) as url, aiohttp.ClientSession() as session:
        http = SimHttp(session, url)
        await http.login()
        last = await http.get("transactions/query", {"perPage": "10", "page": "3"})
        assert last.body["meta"] == {"totalItems": 60, "totalPages": 3, "page": 3, "perPage": 10}
        assert len(last.body["data"]) == 5  # cut at item 25
        past = await http.get("transactions/query", {"perPage": "10", "page": "4"})
        assert past.status == 400
        assert past.error_codes == ["validation-invalid-params"] and past.error_paths == [["page"]]
        whole = await http.get("transactions/query", {"perPage": "100"})
        assert len(whole.body["data"]) == 25


async def test_queries_see_current_state_between_pages(
    world: World, sim: Simulator, sim_http: SimHttp
) -> None:
    first = await _ids(sim_http, sort="lastTransitionedAt", perPage="2")
    assert first == _ordered(world, "bd")
    sim.store.apply_transition(world.tx["c"].id, "transition/mark-delivered", at=BASE + 9 * H)
    second = await _ids(sim_http, sort="lastTransitionedAt", perPage="2", page="2")
    # c jumped to the front, so page 2 now repeats d: no snapshot between requests.
    assert second == _ordered(world, "de")
    assert (await _ids(sim_http, sort="lastTransitionedAt", perPage="1")) == _ordered(world, "c")


async def test_include_resolves_with_client_models(world: World, sim_http: SimHttp) -> None:
    answer = await sim_http.get(
        "transactions/query",
        {"include": "customer,provider,listing,listing.author,booking,marketplace", "sort": "-createdAt"},
    )
    body = answer.body
    keys = [(r["type"], r["id"]) for r in body["included"]]
    assert len(keys) == len(set(keys))
    # 4 users + 2 listings + 2 bookings + 1 marketplace
    assert sorted(t for t, _ in keys) == ["booking"] * 2 + ["listing"] * 2 + ["marketplace"] + ["user"] * 4
    page = models.parse_page(models.Transaction, body)
    a, b = page.data[0], page.data[1]
    assert a.customer is not None and a.customer.id == world.c1
    assert a.provider is not None and a.provider.id == world.p1
    assert a.listing is not None and a.listing.author is not None and a.listing.author.id == world.p1
    assert a.relationships["booking"].data is None
    assert b.related_id("booking") is not None
    assert a.customer.attributes.email and a.customer.attributes.profile.protected_data["phoneNumber"]


async def test_no_include_means_no_relationships(world: World, sim_http: SimHttp) -> None:
    body = (await sim_http.get("transactions/show", {"id": str(world.tx["b"].id)})).body
    assert "included" not in body and "relationships" not in body["data"]
    empty = await sim_http.get("transactions/show", {"id": str(world.tx["b"].id), "include": ""})
    assert empty.status == 200 and empty.body == body
    tx = models.parse_document(models.Transaction, body)
    assert tx.attributes.payin_total is not None and tx.attributes.payin_total.amount == 3000
    assert tx.attributes.payout_total is not None and tx.attributes.payout_total.amount == 2700
    assert tx.attributes.line_items[1].percentage == -10


async def test_sparse_fields_with_nested_paths(world: World, sim_http: SimHttp) -> None:
    answer = await sim_http.get(
        "transactions/show",
        {
            "id": str(world.tx["b"].id),
            "include": "customer",
            "fields.transaction": "state,lineItems,metadata.nothing",
            "fields.user": "profile.displayName,email",
        },
    )
    body = answer.body
    assert body["data"]["attributes"].keys() == {"state", "lineItems", "metadata"}
    assert body["data"]["attributes"]["metadata"] == {"nothing": None}
    (user,) = body["included"]
    assert user["attributes"].keys() == {"profile", "email"}
    assert user["attributes"]["profile"].keys() == {"displayName"}


async def test_show_endpoints(world: World, sim: Simulator, sim_http: SimHttp) -> None:
    user = models.parse_document(models.User, (await sim_http.get("users/show", {"id": str(world.c1)})).body)
    assert user.attributes.profile.first_name
    listing_body = (await sim_http.get("listings/show", {"id": str(world.lb), "include": "author"})).body
    listing = models.parse_document(models.Listing, listing_body)
    assert listing.author is not None and listing.author.id == world.p1
    assert listing.attributes.price is not None and listing.attributes.price.amount == 1000
    market = models.parse_document(models.Marketplace, (await sim_http.get("marketplace/show")).body)
    assert market.id == sim.store.marketplace.id and market.attributes.name == "Sim Market"


@pytest.mark.parametrize("path", ["transactions/show", "users/show", "listings/show"])
async def test_unknown_id_is_404(sim_http: SimHttp, path: str) -> None:
    answer = await sim_http.get(path, {"id": str(uuid.uuid4())})
    assert answer.status == 404 and answer.error_codes == ["not-found"]


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"perPage": "500"}, "perPage", "validation-invalid-params"),
        ({"perPage": "0"}, "perPage", "validation-invalid-params"),
        ({"perPage": "ten"}, "perPage", "validation-invalid-params"),
        ({"page": "0"}, "page", "validation-invalid-params"),
        ({"customerId": "1234"}, "customerId", "validation-invalid-params"),
        ({"listingId": "0f8fad5b-d9cb-469f-a165-70867728950"}, "listingId", "validation-invalid-params"),
        ({"sort": "updatedAt"}, "sort", "validation-invalid-params"),
        (
            {"sort": "createdAt,-createdAt,lastMessageAt,lastTransitionedAt"},
            "sort",
            "validation-invalid-params",
        ),
        ({"createdAtStart": "yesterday"}, "createdAtStart", "validation-invalid-params"),
        ({"bookingEnd": "2024-13-01T00:00:00Z"}, "bookingEnd", "validation-invalid-params"),
        ({"hasBooking": "yes"}, "hasBooking", "validation-invalid-params"),
        ({"states": ""}, "states", "validation-invalid-params"),
        ({"include": "reviews.listing"}, "include", "validation-invalid-params"),
        # Nested paths the reference does not list are refused.
        ({"include": "customer.marketplace"}, "include", "validation-invalid-params"),
        ({"per_page": "10"}, "per_page", "validation-disallowed-key"),
    ],
)
async def test_bad_query_params_are_400(
    sim_http: SimHttp, params: dict[str, str], param: str, code: str
) -> None:
    answer = await sim_http.get("transactions/query", params)
    assert answer.status == 400
    (error,) = answer.body["errors"]
    assert error["code"] == code
    assert error["source"] == {"path": [param], "type": "query"}
    assert error["title"] and uuid.UUID(error["id"])


async def test_show_without_or_with_bad_id_is_400(sim_http: SimHttp) -> None:
    missing = await sim_http.get("transactions/show")
    assert missing.status == 400 and missing.error_codes == ["validation-missing-key"]
    assert missing.error_paths == [["id"]]
    bad = await sim_http.get("users/show", {"id": "nope"})
    assert bad.status == 400 and bad.error_codes == ["validation-invalid-params"]


async def test_unknown_endpoint_and_method_use_the_envelope(sim_http: SimHttp) -> None:
    answer = await sim_http.get("reviews/query")
    assert answer.status == 404 and answer.error_codes == ["not-found"]
    answer = await sim_http.get("transactions/transition")
    assert answer.status == 405 and answer.body["errors"][0]["status"] == 405


async def test_transit_answers_decode_to_the_json_tree(world: World, sim_http: SimHttp) -> None:
    params = {"include": "customer,listing,listing.author,booking", "sort": "-createdAt"}
    as_json = await sim_http.get("transactions/query", params)
    as_transit = await sim_http.get("transactions/query", params, accept=wire.TRANSIT_MIME)
    assert as_transit.content_type == wire.TRANSIT_MIME
    assert as_transit.raw != as_json.raw
    assert b'"~#mn"' in as_transit.raw and b'"~u' in as_transit.raw and b'"~m' in as_transit.raw
    assert as_transit.body == as_json.body
    assert models.parse_page(models.Transaction, as_transit.body).data[1].customer is not None
    error = await sim_http.get("transactions/query", {"perPage": "0"}, accept=wire.TRANSIT_MIME)
    assert error.status == 400 and error.content_type == wire.TRANSIT_MIME
    assert error.error_codes == ["validation-invalid-params"]
