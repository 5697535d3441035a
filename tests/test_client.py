"""Integration API client: requests, parameters, retries, errors, decoding, paging, pacing."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from tests.fakes import (
    TOKEN_PATH,
    FakeApi,
    FakeClock,
    Responder,
    drop_connection,
    error_response,
    event_doc,
    json_response,
    page_doc,
    raw_response,
    transaction_doc,
    truncated_response,
)
from worker.api import wire
from worker.api.auth import TokenManager
from worker.api.backoff import Backoff
from worker.api.client import IntegrationClient, encode_params
from worker.api.models import RejectedItem, ResourceRef, Transaction
from worker.api.ratelimit import BucketSpec, RateLimits
from worker.errors import (
    ApiConnectError,
    ApiTimeoutError,
    BadRequestError,
    CallBudgetError,
    CommandOutcomeUnknownError,
    ConfigError,
    DecodeError,
    NotFoundError,
    RateLimitedError,
    ResourceError,
    ServerError,
)

TX_ID = uuid.UUID("ef98e897-5b81-49a5-aca6-01d9759df075")
USER_ID = uuid.UUID("3c073fae-6172-4e75-8b92-f560d58cd47c")
BACKOFF = Backoff(base_s=0.5, cap_s=4.0, max_attempts=4, max_total_s=60)


def make_client(api: FakeApi, clock: FakeClock, **overrides: Any) -> IntegrationClient:
    kwargs: dict[str, Any] = {
        "base_url": api.url,
        "backoff": BACKOFF,
        "clock": clock,
        "sleep": clock.sleep,
        "rng": random.Random(0),
    }
    kwargs.update(overrides)
    return IntegrationClient("cid", "secret", **kwargs)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def client(api: FakeApi, clock: FakeClock) -> AsyncIterator[IntegrationClient]:
    async with make_client(api, clock) as c:
        yield c


def tx_answer(**attributes: Any) -> Responder:
    return json_response({"data": transaction_doc(TX_ID, **attributes)})


# -- requests and parameters ------------------------------------------------------------


def test_encode_params() -> None:
    at = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert encode_params(
        {
            "states": ["state/accepted", "state/preauthorized"],
            "processNames": ("default-booking",),
            "createdAtStart": at,
            "customerId": USER_ID,
            "hasBooking": True,
            "hasPayin": False,
            "perPage": 50,
            "sort": "-createdAt",
            "eventTypes": {"transaction/updated", "transaction/initiated"},
            "listingId": None,
            "include": [],
        }
    ) == {
        "states": "state/accepted,state/preauthorized",
        "processNames": "default-booking",
        "createdAtStart": "2024-05-01T10:00:00.123Z",
        "customerId": str(USER_ID),
        "hasBooking": "true",
        "hasPayin": "false",
        "perPage": "50",
        "sort": "-createdAt",
        "eventTypes": "transaction/initiated,transaction/updated",
    }


def test_encode_params_refuses_unknown_types() -> None:
    with pytest.raises(TypeError):
        encode_params({"x": object()})


async def test_query_sends_path_headers_and_filters(api: FakeApi, client: IntegrationClient) -> None:
    api.default("transactions/query", json_response(page_doc([], page=1, per_page=10, total_items=0)))
    start = datetime(2024, 5, 1, tzinfo=UTC)
    await client.transactions_query(
        created_at_start=start,
        created_at_end=start + timedelta(days=1),
        customer_id=USER_ID,
        provider_id=str(USER_ID),
        listing_id=TX_ID,
        last_transitions=["transition/accept", "transition/decline"],
        process_names=["default-booking", "default-purchase"],
        states=["state/accepted"],
        booking_start=start,
        booking_end=start + timedelta(hours=2),
        has_booking=True,
        has_payin=False,
        has_message=True,
        sort=["lastTransitionedAt", "-createdAt"],
        include=["customer", "provider"],
        fields={"transaction": ["lastTransition", "state"], "user": ["email"]},
        page=2,
        per_page=10,
    )
    [req] = api.api_requests
    assert req.method == "GET"
    assert req.path == "/v1/integration_api/transactions/query"
    assert req.headers["Accept"] == "application/json"
    assert req.headers["Authorization"] == "bearer tok-1"
    assert req.query == {
        "createdAtStart": "2024-05-01T00:00:00.000Z",
        "createdAtEnd": "2024-05-02T00:00:00.000Z",
        "customerId": str(USER_ID),
        "providerId": str(USER_ID),
        "listingId": str(TX_ID),
        "lastTransitions": "transition/accept,transition/decline",
        "processNames": "default-booking,default-purchase",
        "states": "state/accepted",
        "bookingStart": "2024-05-01T00:00:00.000Z",
        "bookingEnd": "2024-05-01T02:00:00.000Z",
        "hasBooking": "true",
        "hasPayin": "false",
        "hasMessage": "true",
        "sort": "lastTransitionedAt,-createdAt",
        "include": "customer,provider",
        "fields.transaction": "lastTransition,state",
        "fields.user": "email",
        "page": "2",
        "perPage": "10",
    }


async def test_show_resolves_included_resources(api: FakeApi, client: IntegrationClient) -> None:
    customer = {
        "id": str(USER_ID),
        "type": "user",
        "attributes": {"createdAt": "2024-01-01T00:00:00.000Z", "email": "c@example.com"},
    }
    doc = transaction_doc(TX_ID)
    doc["relationships"] = {"customer": {"data": {"id": str(USER_ID), "type": "user"}}}
    api.default("transactions/show", json_response({"data": doc, "included": [customer]}))
    tx = await client.transactions_show(TX_ID, include=["customer"])
    assert tx.id == TX_ID
    assert tx.attributes.last_transition == "transition/confirm-payment"
    assert tx.customer is not None and tx.customer.attributes.email == "c@example.com"
    assert api.api_requests[0].query == {"id": str(TX_ID), "include": "customer"}


async def test_show_leaves_gone_related_resources_absent(api: FakeApi, client: IntegrationClient) -> None:
    deleted = {
        "id": str(USER_ID),
        "type": "user",
        "attributes": {"deleted": True, "banned": False, "createdAt": None, "profile": None},
    }
    doc = transaction_doc(TX_ID)
    doc["relationships"] = {
        "customer": {"data": {"id": str(USER_ID), "type": "user"}},
        "provider": {"data": {"id": str(uuid.uuid4()), "type": "user"}},  # not in included: gone
        "listing": {"data": None},
    }
    api.default("transactions/show", json_response({"data": doc, "included": [deleted]}))
    tx = await client.transactions_show(TX_ID, include=["customer", "provider", "listing"])
    assert tx.customer is not None and tx.customer.attributes.deleted
    assert tx.provider is None and tx.listing is None


async def test_events_query_parameters(api: FakeApi, client: IntegrationClient) -> None:
    api.default("events/query", json_response({"data": [event_doc(8), event_doc(9)]}))
    page = await client.events_query(
        start_after_sequence_id=7,
        created_at_start=datetime(2024, 5, 1, tzinfo=UTC),
        event_types=["transaction/transitioned", "transaction/updated"],
        resource_id=TX_ID,
        per_page=100,
    )
    assert [e.attributes.sequence_id for e in page.data] == [8, 9]
    assert api.api_requests[0].query == {
        "startAfterSequenceId": "7",
        "createdAtStart": "2024-05-01T00:00:00.000Z",
        "eventTypes": "transaction/transitioned,transaction/updated",
        "resourceId": str(TX_ID),
        "perPage": "100",
    }


@pytest.mark.parametrize(
    ("date", "served_at"),
    [
        ("Wed, 01 Jan 2031 12:34:56 GMT", datetime(2031, 1, 1, 12, 34, 56, tzinfo=UTC)),
        ("Wed, 01 Jan 2031 14:34:56 +0200", datetime(2031, 1, 1, 12, 34, 56, tzinfo=UTC)),
        ("the day after tomorrow", None),
    ],
)
async def test_pages_carry_the_servers_time(
    api: FakeApi, client: IntegrationClient, date: str, served_at: datetime | None
) -> None:
    page_body = page_doc([transaction_doc(TX_ID)], page=1, per_page=10, total_items=1)
    api.default("transactions/query", json_response(page_body, headers={"Date": date}))
    api.default("events/query", json_response({"data": [event_doc(1)]}, headers={"Date": date}))
    for page in (await client.transactions_query(), await client.events_query()):
        assert page.served_at == served_at
        if served_at is not None:
            assert page.served_at is not None and page.served_at.utcoffset() == timedelta(0)


async def test_an_unreadable_item_is_set_aside_and_the_page_returned(
    api: FakeApi, client: IntegrationClient, caplog: pytest.LogCaptureFixture
) -> None:
    broken = event_doc(8)
    del broken["attributes"]["eventType"]
    api.default("events/query", json_response({"data": [event_doc(7), broken, event_doc(9)]}))
    page = await client.events_query(start_after_sequence_id=6)
    assert [e.attributes.sequence_id for e in page.data] == [7, 9]
    (rejected,) = page.rejected
    assert (rejected.index, rejected.id, rejected.sequence_id) == (1, broken["id"], 8)
    assert "attributes.eventType" in rejected.reason
    assert page.received == 3
    assert "item 1 set aside" in caplog.text


async def test_transition_command_sends_json_body(api: FakeApi, client: IntegrationClient) -> None:
    api.default("transactions/transition", tx_answer(lastTransition="transition/operator-accept"))
    tx = await client.transactions_transition(TX_ID, "transition/operator-accept", {"note": "ok"})
    assert isinstance(tx, Transaction)
    assert tx.attributes.last_transition == "transition/operator-accept"
    [req] = api.api_requests
    assert req.method == "POST"
    assert req.query == {"expand": "true"}
    assert req.headers["Content-Type"] == "application/json"
    assert json.loads(req.body) == {
        "id": str(TX_ID),
        "transition": "transition/operator-accept",
        "params": {"note": "ok"},
    }


async def test_unexpanded_command_returns_a_reference(api: FakeApi, client: IntegrationClient) -> None:
    api.default(
        "transactions/update_metadata", json_response({"data": {"id": str(TX_ID), "type": "transaction"}})
    )
    ref = await client.transactions_update_metadata(TX_ID, {"crm": {"synced": True}}, expand=False)
    assert ref == ResourceRef(id=TX_ID, type="transaction")
    [req] = api.api_requests
    assert req.query == {"expand": "false"}
    assert json.loads(req.body) == {"id": str(TX_ID), "metadata": {"crm": {"synced": True}}}


async def test_low_level_get_and_post(api: FakeApi, client: IntegrationClient) -> None:
    api.default("stock/compare_and_set", json_response({"data": {"ok": True}}))
    api.default("listings/query", json_response({"data": [], "meta": {"totalItems": 0}}))
    assert await client.get("listings/query", {"pub_color": ["red", "blue"]}) == {
        "data": [],
        "meta": {"totalItems": 0},
    }
    assert await client.post("/stock/compare_and_set", {"x": 1}, {"expand": True}) == {"data": {"ok": True}}
    get, post = api.api_requests
    assert get.query == {"pub_color": "red,blue"}
    assert (post.path, post.query, json.loads(post.body)) == (
        "/v1/integration_api/stock/compare_and_set",
        {"expand": "true"},
        {"x": 1},
    )


# -- retries ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_transient_statuses_are_retried_then_succeed(
    api: FakeApi, client: IntegrationClient, clock: FakeClock, status: int
) -> None:
    failure = error_response(status, "too-many-requests" if status == 429 else "unavailable", "Try later")
    api.script("transactions/show", failure, failure, tx_answer())
    tx = await client.transactions_show(TX_ID)
    assert tx.id == TX_ID
    assert len(api.api_requests) == 3
    assert len(clock.sleeps) == 2
    # Full jitter under the exponential ceilings 0.5 s, 1 s.
    assert 0 <= clock.sleeps[0] <= 0.5
    assert 0 <= clock.sleeps[1] <= 1.0


@pytest.mark.parametrize("status", [408, 429, 503])
async def test_commands_are_retried_on_statuses_that_mean_not_done(
    api: FakeApi, client: IntegrationClient, status: int
) -> None:
    api.script("transactions/transition", error_response(status, "x", "Try later"), tx_answer())
    await client.transactions_transition(TX_ID, "transition/operator-accept")
    assert len(api.api_requests) == 2


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_commands_are_not_sent_again_when_they_may_have_taken_effect(
    api: FakeApi, client: IntegrationClient, clock: FakeClock, status: int
) -> None:
    # A gateway's 504 after the upstream applied the transition: sending it again would get a 409.
    api.script(
        "transactions/transition",
        raw_response(b"<html>gateway timeout</html>", status, "text/html"),
        error_response(409, "transaction-invalid-transition", "Invalid transition"),
    )
    with pytest.raises(CommandOutcomeUnknownError) as info:
        await client.transactions_transition(TX_ID, "transition/operator-accept")
    exc = info.value
    assert (exc.status, exc.attempts) == (status, 1)
    assert f"answered {status}" in str(exc) and "not sent again" in str(exc)
    assert isinstance(exc.__cause__, ServerError)
    assert len(api.api_requests) == 1
    assert clock.sleeps == []


async def test_retry_after_seconds_is_honoured(
    api: FakeApi, client: IntegrationClient, clock: FakeClock
) -> None:
    api.script(
        "transactions/show",
        error_response(429, "too-many-requests", "Too many requests", headers={"Retry-After": "7"}),
        tx_answer(),
    )
    await client.transactions_show(TX_ID)
    assert clock.sleeps == [7.0]


async def test_retry_after_http_date_is_read_against_the_server_date(
    api: FakeApi, client: IntegrationClient, clock: FakeClock
) -> None:
    # The server's clock is a year off ours: only the difference between its two dates matters.
    server_now = datetime(2023, 1, 1, 12, 0, 0, tzinfo=UTC)
    headers = {
        "Date": format_datetime(server_now, usegmt=True),
        "Retry-After": format_datetime(server_now + timedelta(seconds=12), usegmt=True),
    }
    api.script("transactions/show", error_response(503, "unavailable", "Down", headers=headers), tx_answer())
    await client.transactions_show(TX_ID)
    assert clock.sleeps == [pytest.approx(12.0)]


async def test_retry_after_beyond_the_time_budget_gives_up_at_once(api: FakeApi, clock: FakeClock) -> None:
    api.default(
        "marketplace/show",
        error_response(429, "too-many-requests", "Slow down", headers={"Retry-After": "600"}),
    )
    async with make_client(api, clock) as c:
        with pytest.raises(RateLimitedError) as info:
            await c.marketplace_show()
    assert info.value.attempts == 1
    assert clock.sleeps == []


async def test_exhausted_retries_raise_server_error_with_attempts_and_codes(
    api: FakeApi, client: IntegrationClient, clock: FakeClock
) -> None:
    api.default("transactions/show", error_response(503, "service-unavailable", "Service unavailable"))
    with pytest.raises(ServerError) as info:
        await client.transactions_show(TX_ID)
    exc = info.value
    assert exc.status == 503
    assert exc.attempts == BACKOFF.max_attempts == len(api.api_requests)
    assert exc.codes == ("service-unavailable",)
    assert exc.titles == ("Service unavailable",)
    assert exc.request is not None and exc.request.params == {"id": str(TX_ID)}
    assert f"after {BACKOFF.max_attempts} attempts" in str(exc)
    assert "tok-1" not in str(exc)
    assert len(clock.sleeps) == BACKOFF.max_attempts - 1


async def test_exhausted_rate_limit_raises_rate_limited_error(
    api: FakeApi, client: IntegrationClient
) -> None:
    api.default("events/query", error_response(429, "too-many-requests", "Too many requests"))
    with pytest.raises(RateLimitedError) as info:
        await client.events_query()
    assert info.value.attempts == BACKOFF.max_attempts
    assert info.value.codes == ("too-many-requests",)


async def test_500_is_retried_for_queries(api: FakeApi, client: IntegrationClient) -> None:
    api.script("transactions/show", raw_response(b"<html>oops</html>", 500, "text/html"), tx_answer())
    await client.transactions_show(TX_ID)
    assert len(api.api_requests) == 2


async def test_dropped_connection_is_retried_for_queries(api: FakeApi, client: IntegrationClient) -> None:
    api.script("transactions/show", drop_connection(), tx_answer())
    tx = await client.transactions_show(TX_ID)
    assert tx.id == TX_ID
    assert len(api.api_requests) == 2


@pytest.mark.parametrize(
    "failure",
    [drop_connection(), truncated_response({"data": transaction_doc(TX_ID)})],
    ids=["dropped", "truncated"],
)
async def test_a_lost_answer_to_a_command_is_an_unknown_outcome(
    api: FakeApi, client: IntegrationClient, failure: Responder
) -> None:
    api.script("transactions/transition", failure, tx_answer())
    with pytest.raises(CommandOutcomeUnknownError) as info:
        await client.transactions_transition(TX_ID, "transition/operator-accept")
    assert info.value.attempts == 1 and info.value.status is None
    assert isinstance(info.value.__cause__, aiohttp.ClientError)
    assert len(api.api_requests) == 1


async def test_truncated_body_is_retried_for_queries(api: FakeApi, client: IntegrationClient) -> None:
    api.script("transactions/show", truncated_response({"data": transaction_doc(TX_ID)}), tx_answer())
    tx = await client.transactions_show(TX_ID)
    assert tx.id == TX_ID
    assert len(api.api_requests) == 2


async def test_persistent_truncation_raises_connect_error(api: FakeApi, client: IntegrationClient) -> None:
    api.default("transactions/show", truncated_response({"data": transaction_doc(TX_ID)}))
    with pytest.raises(ApiConnectError, match="cut short") as info:
        await client.transactions_show(TX_ID)
    assert info.value.attempts == BACKOFF.max_attempts
    assert isinstance(info.value.__cause__, aiohttp.ClientPayloadError)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_refused_connection_is_retried_even_for_commands(api: FakeApi, clock: FakeClock) -> None:
    async with (
        aiohttp.ClientSession() as token_session,
        make_client(api, clock, base_url=f"http://127.0.0.1:{_closed_port()}") as c,
    ):
        # Tokens come from the fake server; only the API call meets the refused port.
        c.tokens = TokenManager(
            client_id="cid", client_secret="secret", base_url=api.url, session=token_session
        )
        with pytest.raises(ApiConnectError, match="cannot connect") as info:
            await c.transactions_transition(TX_ID, "transition/operator-accept")
    # Nothing was sent, so even a command is retried until the budget runs out.
    assert info.value.attempts == BACKOFF.max_attempts
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)
    assert len(api.token_requests) == 1


async def test_timeouts_are_retried_for_queries_only(api: FakeApi, clock: FakeClock) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response()

    api.default("transactions/show", hang)
    api.default("transactions/transition", hang)
    async with make_client(api, clock, timeout_s=0.05, backoff=Backoff(max_attempts=2)) as c:
        with pytest.raises(ApiTimeoutError) as query_info:
            await c.transactions_show(TX_ID)
        with pytest.raises(CommandOutcomeUnknownError) as command_info:
            await c.transactions_transition(TX_ID, "transition/operator-accept")
    release.set()
    assert query_info.value.attempts == 2
    assert command_info.value.attempts == 1
    assert isinstance(command_info.value.__cause__, TimeoutError)
    assert [r.path.rsplit("/", 1)[1] for r in api.api_requests] == ["show", "show", "transition"]


# -- errors that are not retried --------------------------------------------------------


async def test_400_raises_at_once_with_codes_titles_and_source(
    api: FakeApi, client: IntegrationClient, clock: FakeClock
) -> None:
    api.default(
        "transactions/query",
        error_response(
            400,
            "validation-invalid-value",
            "Invalid value",
            details="perPage must be between 1 and 100",
            source_path=["perPage"],
        ),
    )
    with pytest.raises(BadRequestError) as info:
        await client.transactions_query(per_page=500)
    exc = info.value
    assert exc.status == 400
    assert exc.attempts == 1
    assert exc.codes == ("validation-invalid-value",)
    assert exc.titles == ("Invalid value",)
    assert exc.errors[0].source_path == ("perPage",)
    assert exc.errors[0].details == "perPage must be between 1 and 100"
    assert exc.request is not None
    assert (exc.request.method, exc.request.path) == ("GET", "/v1/integration_api/transactions/query")
    assert exc.request.params == {"perPage": "500"}
    assert "validation-invalid-value" in str(exc)
    assert clock.sleeps == []
    assert len(api.api_requests) == 1


async def test_404_raises_not_found(api: FakeApi, client: IntegrationClient) -> None:
    api.default("transactions/show", error_response(404, "not-found", "Not found"))
    with pytest.raises(NotFoundError):
        await client.transactions_show(TX_ID)
    assert len(api.api_requests) == 1


async def test_409_on_a_command_raises_at_once(api: FakeApi, client: IntegrationClient) -> None:
    api.default(
        "transactions/transition",
        error_response(409, "transaction-invalid-transition", "Invalid transition"),
    )
    with pytest.raises(BadRequestError) as info:
        await client.transactions_transition(TX_ID, "transition/operator-accept")
    assert info.value.codes == ("transaction-invalid-transition",)
    assert len(api.api_requests) == 1


# -- decoding ---------------------------------------------------------------------------


async def test_malformed_json_on_200_is_a_decode_error(api: FakeApi, client: IntegrationClient) -> None:
    api.default("transactions/show", raw_response(b'{"data": {"id": ', 200))
    with pytest.raises(DecodeError) as info:
        await client.transactions_show(TX_ID)
    exc = info.value
    assert not isinstance(exc, ResourceError)
    assert "answered 200 with a body that is not valid application/json" in str(exc)
    assert "'application/json'" in str(exc)
    # Queries retry it (a cut body without framing looks just like this), then give up.
    assert exc.attempts == BACKOFF.max_attempts
    assert isinstance(exc.__cause__, wire.WireFormatError)


async def test_an_unreadable_2xx_to_a_command_is_not_sent_again(
    api: FakeApi, client: IntegrationClient
) -> None:
    unreadable = transaction_doc(TX_ID)
    del unreadable["attributes"]["transitions"]
    api.script(
        "transactions/transition",
        raw_response(b"<html>proxy</html>", 200, "text/html"),
        json_response({"data": unreadable}),
        json_response({"data": {"id": "not-a-uuid"}}),
    )
    with pytest.raises(CommandOutcomeUnknownError, match="text/html") as info:
        await client.transactions_transition(TX_ID, "transition/operator-accept")
    assert info.value.attempts == 1 and info.value.status == 200
    assert "took effect" in str(info.value)
    with pytest.raises(CommandOutcomeUnknownError, match=r"attributes\.transitions") as parsed:
        await client.transactions_transition(TX_ID, "transition/operator-accept")
    assert isinstance(parsed.value.__cause__, ResourceError)
    with pytest.raises(CommandOutcomeUnknownError, match="not a resource reference"):
        await client.transactions_transition(TX_ID, "transition/operator-accept", expand=False)
    assert len(api.api_requests) == 3


async def test_missing_required_field_names_type_id_and_field(
    api: FakeApi, client: IntegrationClient
) -> None:
    doc = transaction_doc(TX_ID)
    del doc["attributes"]["lastTransition"]
    api.default("transactions/show", json_response({"data": doc}))
    with pytest.raises(ResourceError) as info:
        await client.transactions_show(TX_ID)
    message = str(info.value)
    assert f"transaction {TX_ID}" in message
    assert "lastTransition" in message
    assert info.value.request is not None and info.value.request.path.endswith("transactions/show")
    assert len(api.api_requests) == 1  # the same data would come back: not retried


async def test_transit_answers_are_decoded(api: FakeApi, clock: FakeClock) -> None:
    created = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    doc = {
        "data": {
            "id": TX_ID,
            "type": "transaction",
            "attributes": {
                "createdAt": created,
                "processName": "default-booking",
                "processVersion": 3,
                "lastTransition": "transition/accept",
                "lastTransitionedAt": created,
                "transitions": [{"transition": "transition/accept", "createdAt": created, "by": "provider"}],
                "payinTotal": wire.Money(1590, "USD"),
            },
        }
    }
    api.default("transactions/show", json_response(doc, mime=wire.TRANSIT_MIME))
    api.default("transactions/update_metadata", json_response(doc, mime=wire.TRANSIT_MIME))
    async with make_client(api, clock, accept=wire.TRANSIT_MIME) as c:
        tx = await c.transactions_show(TX_ID)
        updated = await c.transactions_update_metadata(str(TX_ID), {"synced": True})
    assert tx.id == TX_ID
    assert tx.attributes.created_at == created
    assert tx.attributes.payin_total is not None and tx.attributes.payin_total.amount == 1590
    assert updated.attributes.last_transition == "transition/accept"
    show, command = api.api_requests
    assert show.headers["Accept"] == wire.TRANSIT_MIME
    assert command.headers["Content-Type"] == wire.TRANSIT_MIME
    # The id travels as a tagged Transit UUID, keys as keywords.
    assert wire.decode(command.body, wire.TRANSIT_MIME) == {"id": str(TX_ID), "metadata": {"synced": True}}
    assert b"~u" + str(TX_ID).encode() in command.body


async def test_metadata_is_sent_as_the_user_wrote_it(api: FakeApi, clock: FakeClock) -> None:
    metadata = {"type": "vip", "score": Decimal("12345678901234567.891"), "tiers": [{"type": "gold"}]}
    api.default(
        "transactions/update_metadata", json_response({"data": {"id": str(TX_ID), "type": "transaction"}})
    )
    for accept in (wire.TRANSIT_MIME, wire.JSON_MIME):
        async with make_client(api, clock, accept=accept) as c:
            await c.transactions_update_metadata(TX_ID, metadata, expand=False)
    transit, plain = api.api_requests
    assert wire.decode(transit.body, wire.TRANSIT_MIME)["metadata"] == metadata
    assert b"~:vip" not in transit.body and b"~:gold" not in transit.body
    assert b'"score":12345678901234567.891' in plain.body


# -- paging -----------------------------------------------------------------------------


def paged(items: list[dict[str, Any]]) -> Responder:
    async def respond(request: web.Request) -> web.StreamResponse:
        page = int(request.query.get("page", "1"))
        per_page = int(request.query.get("perPage", "100"))
        chunk = items[(page - 1) * per_page : page * per_page]
        return await json_response(page_doc(chunk, page=page, per_page=per_page, total_items=len(items)))(
            request
        )

    return respond


async def test_iter_transactions_walks_every_page(api: FakeApi, client: IntegrationClient) -> None:
    items = [transaction_doc() for _ in range(5)]
    api.default("transactions/query", paged(items))
    got = [tx.id async for tx in client.iter_transactions(per_page=2, states=["state/accepted"])]
    assert [str(i) for i in got] == [item["id"] for item in items]
    assert [r.query["page"] for r in api.api_requests] == ["1", "2", "3"]
    assert {r.query["states"] for r in api.api_requests} == {"state/accepted"}


async def test_iter_transactions_stops_at_total_pages_on_a_full_last_page(
    api: FakeApi, client: IntegrationClient
) -> None:
    api.default("transactions/query", paged([transaction_doc() for _ in range(4)]))
    got = [tx async for tx in client.iter_transactions(per_page=2)]
    assert len(got) == 4
    assert len(api.api_requests) == 2  # no third request for an empty page


async def test_iter_transactions_follows_a_server_capped_page_size(
    api: FakeApi, client: IntegrationClient
) -> None:
    items = [transaction_doc() for _ in range(5)]

    async def capped(request: web.Request) -> web.StreamResponse:
        page = int(request.query["page"])
        chunk = items[(page - 1) * 2 : page * 2]
        return await json_response(page_doc(chunk, page=page, per_page=2, total_items=len(items)))(request)

    api.default("transactions/query", capped)
    got = [tx async for tx in client.iter_transactions(per_page=100)]
    assert len(got) == 5
    assert [r.query["page"] for r in api.api_requests] == ["1", "2", "3"]


async def test_iter_transactions_of_nothing_makes_one_request(
    api: FakeApi, client: IntegrationClient
) -> None:
    api.default("transactions/query", paged([]))
    assert [tx async for tx in client.iter_transactions()] == []
    assert len(api.api_requests) == 1


async def test_iter_transactions_hands_unreadable_items_to_on_rejected(
    api: FakeApi, client: IntegrationClient
) -> None:
    items = [transaction_doc() for _ in range(5)]
    del items[2]["attributes"]["processName"]
    api.default("transactions/query", paged(items))
    rejected: list[RejectedItem] = []
    got = [tx.id async for tx in client.iter_transactions(per_page=2, on_rejected=rejected.append)]
    assert [str(i) for i in got] == [item["id"] for i, item in enumerate(items) if i != 2]
    assert [(r.id, r.index) for r in rejected] == [(items[2]["id"], 0)]
    # The rejected item still counts toward the page: page 2 was full, so page 3 was asked for.
    assert [r.query["page"] for r in api.api_requests] == ["1", "2", "3"]


# -- client-side rate limiting ----------------------------------------------------------


async def test_client_paces_queries_and_commands_with_separate_buckets(
    api: FakeApi, clock: FakeClock
) -> None:
    limits = RateLimits(
        queries=BucketSpec(initial=2, refill_amount=1, refill_interval_s=1.0, capacity=2),
        commands=BucketSpec(initial=1, refill_amount=1, refill_interval_s=2.0, capacity=1),
    )
    api.default("transactions/show", tx_answer())
    api.default("transactions/update_metadata", tx_answer())
    start_s = clock()
    async with make_client(api, clock, rate_limits=limits) as c:
        for _ in range(5):
            await c.transactions_show(TX_ID)
        for _ in range(3):
            await c.transactions_update_metadata(TX_ID, {"n": 1})
    shows = [r.at_s - start_s for r in api.api_requests if r.path.endswith("show") and r.at_s is not None]
    updates = [
        r.at_s - start_s for r in api.api_requests if r.path.endswith("metadata") and r.at_s is not None
    ]
    assert shows == pytest.approx([0, 0, 1, 2, 3])
    # The commands bucket is untouched by the queries: one token at once, then one per 2 s.
    assert updates == pytest.approx([3, 5, 7])


async def test_every_retry_takes_a_bucket_token(api: FakeApi, clock: FakeClock) -> None:
    limits = RateLimits(
        queries=BucketSpec(initial=1, refill_amount=1, refill_interval_s=10.0, capacity=1),
        commands=BucketSpec(initial=1, refill_amount=1, refill_interval_s=10.0, capacity=1),
    )
    api.script("transactions/show", error_response(503, "unavailable", "Down"), tx_answer())
    start_s = clock()
    async with make_client(api, clock, rate_limits=limits) as c:
        await c.transactions_show(TX_ID)
    first, second = (r.at_s for r in api.api_requests)
    assert first == start_s
    # The backoff wait (<= 0.5 s) is far shorter than the bucket's 10 s refill: the bucket sets the pace.
    assert second == pytest.approx(start_s + 10.0)


# -- the call's time budget -------------------------------------------------------------

HALF_SECOND = Backoff(base_s=0.5, cap_s=4.0, max_attempts=4, max_total_s=0.5)


async def test_a_bucket_wait_beyond_the_budget_is_not_begun(api: FakeApi, clock: FakeClock) -> None:
    limits = RateLimits(
        queries=BucketSpec(initial=1, refill_amount=1, refill_interval_s=3.0, capacity=1),
        commands=BucketSpec(initial=1, refill_amount=1, refill_interval_s=3.0, capacity=1),
    )
    api.default("transactions/update_metadata", tx_answer())
    async with make_client(api, clock, rate_limits=limits, backoff=HALF_SECOND) as c:
        await c.transactions_update_metadata(TX_ID, {"n": 1})
        start_s = clock()
        with pytest.raises(CallBudgetError, match="client-side rate limit") as info:
            await c.transactions_update_metadata(TX_ID, {"n": 2})
        assert clock() - start_s == 0  # the 3 s wait for the bucket was never begun
        # The token it did not use is still there for the next caller, after its 3 s.
        clock.advance(3.0)
        await c.transactions_update_metadata(TX_ID, {"n": 3})
    assert info.value.attempts == 0
    assert [json.loads(r.body)["metadata"] for r in api.api_requests] == [{"n": 1}, {"n": 3}]


async def test_retries_stop_where_the_bucket_would_wait_past_the_budget(
    api: FakeApi, clock: FakeClock
) -> None:
    limits = RateLimits(
        queries=BucketSpec(initial=1, refill_amount=1, refill_interval_s=3.0, capacity=1),
        commands=BucketSpec(initial=1, refill_amount=1, refill_interval_s=3.0, capacity=1),
    )
    api.script("transactions/show", error_response(503, "unavailable", "Down"), tx_answer())
    start_s = clock()
    async with make_client(api, clock, rate_limits=limits, backoff=HALF_SECOND) as c:
        with pytest.raises(ServerError) as info:
            await c.transactions_show(TX_ID)
    assert info.value.attempts == 1  # the retry would have waited ~3 s for the bucket
    assert clock() - start_s <= HALF_SECOND.max_total_s
    assert len(api.api_requests) == 1


async def test_a_token_wait_is_cut_at_the_budget(
    api: FakeApi, clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    api.default(TOKEN_PATH, error_response(503, "unavailable", "Down"))
    async with make_client(
        api, clock, backoff=Backoff(base_s=0.2, cap_s=0.2, max_attempts=4, max_total_s=0.5)
    ) as c:
        # The token manager would try for longer than the call may wait.
        c.tokens = TokenManager(
            client_id="cid",
            client_secret="secret",
            base_url=api.url,
            session=session,
            backoff=Backoff(base_s=0.2, cap_s=0.2, max_attempts=50, max_total_s=100),
            clock=clock,
            sleep=clock.sleep,
            rng=random.Random(1),
        )
        with pytest.raises(ServerError) as info:
            await c.transactions_show(TX_ID)
        await c.tokens.aclose()
    assert info.value.attempts < 50  # let go long before the token manager gave up
    waited_s = sum(clock.sleeps[: info.value.attempts - 1])
    assert waited_s <= 0.5 < waited_s + clock.sleeps[info.value.attempts - 1]
    assert api.api_requests == []


# -- construction and lifecycle ---------------------------------------------------------


def test_max_connections_is_capped_at_ten() -> None:
    with pytest.raises(ConfigError, match="max_connections"):
        IntegrationClient("cid", "secret", max_connections=11)
    with pytest.raises(ConfigError):
        IntegrationClient("cid", "secret", max_connections=0)


def test_unknown_accept_is_refused() -> None:
    with pytest.raises(ConfigError, match="accept"):
        IntegrationClient("cid", "secret", accept="text/xml")


async def test_from_settings_reads_every_setting(api: FakeApi, clock: FakeClock) -> None:
    settings = SimpleNamespace(
        sharetribe_client_id="from-settings",
        sharetribe_client_secret=SecretStr("hidden"),
        sharetribe_api_base_url=api.url,
        rate_limit="dev",
        http_timeout_s=12.0,
        http_connect_timeout_s=3.0,
        http_max_connections=4,
        api_retry_max_attempts=7,
        api_retry_base_s=0.2,
        api_retry_cap_s=9.0,
        api_retry_max_total_s=99.0,
        api_format="transit",
        api_page_cap=77,
    )
    c = IntegrationClient.from_settings(settings, clock=clock, sleep=clock.sleep)
    try:
        assert c.base_url == api.url
        assert c.accept == wire.TRANSIT_MIME
        assert c.backoff == Backoff(base_s=0.2, cap_s=9.0, max_attempts=7, max_total_s=99.0)
        assert c._timeout.total == 12.0 and c._timeout.sock_connect == 3.0
        assert c._queries is not None and c._queries.spec.initial == 100
        assert c.tokens.client_id == "from-settings"
        assert c.page_cap == 77
        assert "hidden" not in repr(c)
        session = c._get_session()
        assert session.connector is not None and session.connector.limit == 4
    finally:
        await c.aclose()
    off = IntegrationClient.from_settings(SimpleNamespace(**{**vars(settings), "rate_limit": "off"}))
    assert off._queries is None and off._commands is None


async def test_a_given_session_is_used_and_left_open(api: FakeApi, clock: FakeClock) -> None:
    api.default("transactions/show", tx_answer())
    async with aiohttp.ClientSession() as session:
        async with make_client(api, clock, session=session) as c:
            await c.transactions_show(TX_ID)
        assert not session.closed
    owned = make_client(api, clock)
    async with owned:
        own_session = owned._get_session()
    assert own_session.closed
    with pytest.raises(RuntimeError, match="closed"):
        await owned.transactions_show(TX_ID)
