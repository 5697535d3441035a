"""Token manager: grants, caching, renewal, 401 recovery, single flight, secrecy."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.fakes import (
    TOKEN_PATH,
    FakeApi,
    FakeClock,
    error_response,
    json_response,
    raw_response,
    token_error,
    token_ok,
    transaction_doc,
)
from worker.api.auth import Grant, TokenManager
from worker.api.backoff import Backoff
from worker.api.client import IntegrationClient
from worker.errors import AuthError, NotFoundError, ServerError

SECRET = "s3cr3t-do-not-leak"
OK_DOC = {"data": {"id": "0b0e6a55-9c62-4b55-8f7e-1d2a33b8e001", "type": "marketplace", "attributes": {}}}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def manager(api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock) -> TokenManager:
    return TokenManager(
        client_id="cid",
        client_secret=SECRET,
        base_url=api.url,
        session=session,
        backoff=Backoff(base_s=0.1, cap_s=1.0, max_attempts=3, max_total_s=10),
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(0),
    )


def client(api: FakeApi, clock: FakeClock) -> IntegrationClient:
    return IntegrationClient(
        "cid",
        SECRET,
        base_url=api.url,
        backoff=Backoff(base_s=0.1, cap_s=1.0, max_attempts=3, max_total_s=10),
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(0),
    )


def grants(api: FakeApi) -> list[str | None]:
    return [r.grant for r in api.token_requests]


async def test_client_credentials_grant_is_sent_as_documented(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    tokens = manager(api, session, clock)
    assert await tokens.access_token() == "tok-1"
    [req] = api.token_requests
    assert req.method == "POST"
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert req.headers["Accept"] == "application/json"
    assert req.form == {
        "client_id": "cid",
        "client_secret": SECRET,
        "grant_type": "client_credentials",
        "scope": "integ",
    }


async def test_token_is_cached(api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    tokens = manager(api, session, clock)
    assert [await tokens.access_token() for _ in range(5)] == ["tok-1"] * 5
    assert len(api.token_requests) == 1


async def test_fifty_concurrent_first_calls_make_one_token_request(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    tokens = manager(api, session, clock)
    got = await asyncio.gather(*(tokens.access_token() for _ in range(50)))
    assert set(got) == {"tok-1"}
    assert len(api.token_requests) == 1


async def test_fifty_concurrent_client_calls_make_one_token_request(api: FakeApi, clock: FakeClock) -> None:
    api.default("marketplace/show", json_response(OK_DOC))
    async with client(api, clock) as c:
        await asyncio.gather(*(c.marketplace_show() for _ in range(50)))
    assert len(api.token_requests) == 1
    assert len(api.api_requests) == 50
    assert {r.token for r in api.api_requests} == {"tok-1"}


async def test_token_is_renewed_ahead_of_expiry_with_the_refresh_token(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    api.script(
        TOKEN_PATH, token_ok("first", refresh="r1", expires_in=300), token_ok("second", expires_in=300)
    )
    tokens = manager(api, session, clock)
    assert await tokens.access_token() == "first"
    # Lifetime 300 s: the margin is min(30 s, 10%) = 30 s, so renewal happens after 270 s.
    clock.advance(269)
    assert await tokens.access_token() == "first"
    assert len(api.token_requests) == 1
    clock.advance(2)
    # Still valid: handed out while the renewal runs in the background.
    assert await tokens.access_token() == "first"
    await tokens.idle()
    assert await tokens.access_token() == "second"
    assert grants(api) == ["client_credentials", "refresh_token"]
    assert api.token_requests[1].form == {
        "client_id": "cid",
        "grant_type": "refresh_token",
        "refresh_token": "r1",
    }
    assert "client_secret" not in api.token_requests[1].form


async def test_short_lived_tokens_renew_at_ten_percent(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    api.script(TOKEN_PATH, token_ok("first", expires_in=100), token_ok("second", expires_in=100))
    tokens = manager(api, session, clock)
    await tokens.access_token()
    clock.advance(89)
    assert await tokens.access_token() == "first"
    assert len(api.token_requests) == 1
    clock.advance(2)
    assert await tokens.access_token() == "first"
    await tokens.idle()
    assert await tokens.access_token() == "second"
    # No refresh token was given, so renewal used client credentials.
    assert grants(api) == ["client_credentials", "client_credentials"]


async def test_refused_refresh_on_renewal_falls_back_to_client_credentials(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    api.script(
        TOKEN_PATH,
        token_ok("first", refresh="r1", expires_in=60),
        token_error(401, "invalid_grant"),
        token_ok("second", expires_in=60),
    )
    tokens = manager(api, session, clock)
    await tokens.access_token()
    clock.advance(120)
    assert await tokens.access_token() == "second"
    assert grants(api) == ["client_credentials", "refresh_token", "client_credentials"]


async def test_bad_secret_fails_at_once_without_leaking_it(
    api: FakeApi, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api.default(TOKEN_PATH, token_error(401, "invalid_client", f"bad client secret {SECRET}"))
    async with client(api, clock) as c:
        with pytest.raises(AuthError) as info:
            await c.marketplace_show()
    exc = info.value
    assert "client credentials rejected" in str(exc)
    assert exc.status == 401
    assert exc.codes == ("invalid_client",)
    assert exc.attempts == 1
    assert len(api.token_requests) == 1  # no retry loop
    assert api.api_requests == []
    assert clock.sleeps == []
    for text in (str(exc), repr(exc), repr(exc.errors), repr(c), repr(c.tokens), caplog.text):
        assert SECRET not in text


async def test_token_endpoint_outage_is_retried(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    api.script(TOKEN_PATH, error_response(503, "unavailable", "Service unavailable"), token_ok("tok"))
    tokens = manager(api, session, clock)
    assert await tokens.access_token() == "tok"
    assert len(api.token_requests) == 2
    assert len(clock.sleeps) == 1


async def test_token_endpoint_outage_gives_up_after_the_budget(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    api.default(TOKEN_PATH, error_response(503, "unavailable", "Service unavailable"))
    tokens = manager(api, session, clock)
    with pytest.raises(ServerError) as info:
        await tokens.access_token()
    assert info.value.attempts == 3
    assert len(api.token_requests) == 3


async def test_401_then_refresh_then_client_credentials_then_success(api: FakeApi, clock: FakeClock) -> None:
    api.script(
        TOKEN_PATH,
        token_ok("a1", refresh="r1"),
        token_ok("a2", refresh="r2"),
        token_ok("a3"),
    )
    unauthorized = error_response(401, "auth-invalid-access-token", "Invalid access token")
    api.script("marketplace/show", unauthorized, unauthorized, json_response(OK_DOC))
    async with client(api, clock) as c:
        await c.marketplace_show()
    assert grants(api) == ["client_credentials", "refresh_token", "client_credentials"]
    assert api.token_requests[1].form["refresh_token"] == "r1"
    assert [r.token for r in api.api_requests] == ["a1", "a2", "a3"]
    assert clock.sleeps == []  # a 401 is not a transient failure to back off from


async def test_401_then_refused_refresh_then_client_credentials_then_success(
    api: FakeApi, clock: FakeClock
) -> None:
    api.script(
        TOKEN_PATH,
        token_ok("a1", refresh="r1"),
        token_error(400, "invalid_grant", "refresh token expired"),
        token_ok("a2"),
    )
    api.script(
        "marketplace/show",
        error_response(401, "auth-invalid-access-token", "Invalid access token"),
        json_response(OK_DOC),
    )
    async with client(api, clock) as c:
        await c.marketplace_show()
    assert grants(api) == ["client_credentials", "refresh_token", "client_credentials"]
    assert [r.token for r in api.api_requests] == ["a1", "a2"]


async def test_persistent_401_gives_up_after_exactly_one_refresh_and_one_reauthentication(
    api: FakeApi, clock: FakeClock
) -> None:
    api.default("transactions/show", error_response(401, "auth-invalid-access-token", "Invalid access token"))
    async with client(api, clock) as c:
        with pytest.raises(AuthError) as info:
            await c.transactions_show("0b0e6a55-9c62-4b55-8f7e-1d2a33b8e001")
    exc = info.value
    assert grants(api) == ["client_credentials", "refresh_token", "client_credentials"]
    assert len(api.api_requests) == 3
    assert exc.status == 401
    assert exc.attempts == 3
    assert exc.codes == ("auth-invalid-access-token",)
    assert "after refreshing the token and re-authenticating" in str(exc)
    assert exc.request is not None and exc.request.path == "/v1/integration_api/transactions/show"


async def test_refused_refresh_and_persistent_401_stops_after_one_client_credentials_grant(
    api: FakeApi, clock: FakeClock
) -> None:
    api.script(TOKEN_PATH, token_ok("a1", refresh="r1"), token_error(401, "invalid_grant"), token_ok("a2"))
    api.default("marketplace/show", error_response(401, "auth-invalid-access-token", "Invalid access token"))
    async with client(api, clock) as c:
        with pytest.raises(AuthError):
            await c.marketplace_show()
    assert grants(api) == ["client_credentials", "refresh_token", "client_credentials"]
    assert len(api.api_requests) == 2


async def test_403_is_not_recovered_by_reauthenticating(api: FakeApi, clock: FakeClock) -> None:
    api.default("marketplace/show", error_response(403, "forbidden", "Forbidden"))
    async with client(api, clock) as c:
        with pytest.raises(AuthError) as info:
            await c.marketplace_show()
    assert info.value.status == 403
    assert len(api.token_requests) == 1
    assert len(api.api_requests) == 1


async def test_concurrent_401s_share_one_refresh(api: FakeApi, clock: FakeClock) -> None:
    async def only_fresh_tokens(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") == "bearer tok-1":
            return await error_response(401, "auth-invalid-access-token", "Invalid access token")(request)
        return await json_response({"data": transaction_doc()})(request)

    api.default("transactions/show", only_fresh_tokens)
    async with client(api, clock) as c:
        ids = [f"0b0e6a55-9c62-4b55-8f7e-1d2a33b8e{n:03d}" for n in range(10)]
        await asyncio.gather(*(c.transactions_show(i) for i in ids))
    assert grants(api) == ["client_credentials", "refresh_token"]


async def test_recover_returns_none_once_both_grants_were_used(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    tokens = manager(api, session, clock)
    rejected = await tokens.access_token()
    tried: set[Grant] = set()
    second = await tokens.recover(rejected, tried)
    assert second == "tok-2"
    third = await tokens.recover(second, tried)
    assert third == "tok-3"
    assert tried == {"refresh_token", "client_credentials"}
    assert await tokens.recover(third, tried) is None
    assert grants(api) == ["client_credentials", "refresh_token", "client_credentials"]


async def test_secret_never_in_reprs(api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    tokens = manager(api, session, clock)
    await tokens.access_token()
    assert SECRET not in repr(tokens)
    assert "tok-1" not in repr(tokens._token)
    assert "cid" in repr(tokens)


async def test_a_408_from_the_token_endpoint_is_a_blip_not_a_refusal(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    timeout = error_response(408, "request-timeout", "Request timeout")
    api.script(
        TOKEN_PATH,
        timeout,
        token_ok("first", refresh="r1", expires_in=60),
        timeout,
        token_ok("second", refresh="r2", expires_in=60),
    )
    tokens = manager(api, session, clock)
    assert await tokens.access_token() == "first"
    clock.advance(120)
    # The refresh token survived the 408 and was offered again.
    assert await tokens.access_token() == "second"
    assert grants(api) == ["client_credentials", "client_credentials", "refresh_token", "refresh_token"]
    assert api.token_requests[3].form["refresh_token"] == "r1"
    assert len(clock.sleeps) == 2


async def test_a_truncated_token_answer_is_asked_again(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    # No Content-Length and the connection closed: the body simply ends early.
    cut = raw_response(b'{"access_token": "tok-cut", "expires_in": 36')
    api.script(TOKEN_PATH, cut, token_ok("first", refresh="r1", expires_in=60), cut, token_ok("second"))
    tokens = manager(api, session, clock)
    assert await tokens.access_token() == "first"
    clock.advance(120)
    assert await tokens.access_token() == "second"
    assert grants(api) == ["client_credentials", "client_credentials", "refresh_token", "refresh_token"]


async def test_a_token_endpoint_that_is_not_there_is_not_retried(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    api.default(TOKEN_PATH, error_response(404, "not-found", "Not found"))
    tokens = manager(api, session, clock)
    with pytest.raises(NotFoundError):
        await tokens.access_token()
    assert len(api.token_requests) == 1


DOWN = error_response(503, "unavailable", "Service unavailable")


async def test_a_token_endpoint_blip_before_expiry_costs_no_call(api: FakeApi, clock: FakeClock) -> None:
    api.script(TOKEN_PATH, token_ok("first", refresh="r1", expires_in=300))
    api.default(TOKEN_PATH, DOWN)
    api.default("marketplace/show", json_response(OK_DOC))
    async with client(api, clock) as c:
        await c.marketplace_show()
        clock.advance(271)  # past the renewal point (270 s), 29 s before expiry
        results = await asyncio.gather(*(c.marketplace_show() for _ in range(20)), return_exceptions=True)
        assert [r for r in results if isinstance(r, Exception)] == []
        await c.tokens.idle()
        # The failed renewal is not tried again on every call while the token lasts.
        await asyncio.gather(*(c.marketplace_show() for _ in range(20)))
    assert {r.token for r in api.api_requests} == {"first"}
    # One renewal, in the background, with its own retries: not one per call.
    assert grants(api) == ["client_credentials"] + ["refresh_token"] * 3


async def test_callers_of_an_expired_token_share_one_renewal_and_its_outcome(
    api: FakeApi, clock: FakeClock
) -> None:
    api.script(TOKEN_PATH, token_ok("first", expires_in=60), DOWN, DOWN, token_ok("second", expires_in=60))
    api.default("marketplace/show", json_response(OK_DOC))
    async with client(api, clock) as c:
        await c.marketplace_show()
        clock.advance(61)
        await asyncio.gather(*(c.marketplace_show() for _ in range(20)))
        assert len(api.token_requests) == 4  # the first token, then one renewal: two blips and a token
        assert {r.token for r in api.api_requests[1:]} == {"second"}
        api.default(TOKEN_PATH, DOWN)
        clock.advance(61)
        results = await asyncio.gather(*(c.marketplace_show() for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, ServerError) for r in results)
    assert len({id(r) for r in results}) == 1  # the one renewal's failure, handed to every caller
    assert len(api.token_requests) == 4 + 3  # one renewal's three attempts, not twenty renewals
    assert len(api.api_requests) == 21


async def test_a_waiter_stops_at_its_deadline_while_the_renewal_goes_on(
    api: FakeApi, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    api.default(TOKEN_PATH, DOWN)
    tokens = TokenManager(
        client_id="cid",
        client_secret=SECRET,
        base_url=api.url,
        session=session,
        backoff=Backoff(base_s=0.5, cap_s=1.0, max_attempts=6, max_total_s=100),
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(3),
    )
    start_s = clock()
    hurried = asyncio.create_task(tokens.access_token(deadline_s=start_s + 1.5))
    patient = asyncio.create_task(tokens.access_token())
    with pytest.raises(ServerError) as early:
        await hurried
    # Handed the failure of the attempt after which the next wait would pass its deadline.
    waited_s = sum(clock.sleeps[: early.value.attempts - 1])
    assert waited_s <= 1.5 < waited_s + clock.sleeps[early.value.attempts - 1]
    with pytest.raises(ServerError) as late:
        await patient
    assert late.value.attempts == 6 > early.value.attempts
    assert len(api.token_requests) == 6  # one renewal for both
