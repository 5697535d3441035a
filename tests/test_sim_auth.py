"""Authentication against the served simulator: grants, 401s, expiry, revocation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from tests.simkit import SimHttp
from worker.sim import SimConfig, Simulator, serve


@pytest.fixture
async def http(sim_url: str) -> AsyncIterator[SimHttp]:
    async with aiohttp.ClientSession() as session:
        yield SimHttp(session, sim_url)


async def test_client_credentials_grant_and_use(http: SimHttp, sim: Simulator) -> None:
    answer = await http.grant()
    assert answer.status == 200
    tokens = answer.body
    assert tokens["token_type"] == "bearer"
    assert tokens["expires_in"] == 300
    assert tokens["access_token"] and tokens["refresh_token"]
    http.token = tokens["access_token"]
    assert (await http.get("marketplace/show")).status == 200
    assert sim.grants == {"client_credentials": 1}


async def test_refresh_grant_issues_a_new_working_token(http: SimHttp, sim: Simulator) -> None:
    tokens = await http.login()
    answer = await http.form(
        "/v1/auth/token",
        {
            "client_id": http.client_id,
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
        },
    )
    assert answer.status == 200
    fresh = answer.body["access_token"]
    assert fresh != tokens["access_token"]
    assert (await http.get("marketplace/show", token=fresh)).status == 200
    assert sim.grants == {"client_credentials": 1, "refresh_token": 1}


async def test_bad_secret_and_unknown_refresh_token_are_401(http: SimHttp, sim: Simulator) -> None:
    answer = await http.grant(secret="wrong")
    assert answer.status == 401
    assert answer.error_codes == ["auth-invalid-client"]
    answer = await http.form(
        "/v1/auth/token",
        {"client_id": http.client_id, "grant_type": "refresh_token", "refresh_token": "nope"},
    )
    assert answer.status == 401 and answer.error_codes == ["auth-invalid-refresh-token"]
    assert sim.grants == {}


async def test_bad_grant_requests_are_400(http: SimHttp) -> None:
    answer = await http.form("/v1/auth/token", {"client_id": http.client_id, "grant_type": "password"})
    assert answer.status == 400 and answer.error_paths == [["grant_type"]]
    answer = await http.form(
        "/v1/auth/token",
        {
            "client_id": http.client_id,
            "client_secret": http.client_secret,
            "grant_type": "client_credentials",
            "scope": "user",
        },
    )
    assert answer.status == 400 and answer.error_paths == [["scope"]]


async def test_missing_and_invalid_tokens_are_401(http: SimHttp) -> None:
    answer = await http.get("transactions/query", auth=False)
    assert answer.status == 401 and answer.error_codes == ["auth-missing-access-token"]
    answer = await http.get("transactions/query", token="not-a-token")
    assert answer.status == 401 and answer.error_codes == ["auth-invalid-access-token"]


async def test_expiring_all_tokens_then_refreshing(http: SimHttp, sim: Simulator) -> None:
    tokens = await http.login()
    assert (await http.get("marketplace/show")).status == 200
    expired = await http.admin("POST", "tokens/expire")
    assert expired.body == {"expired": 1}
    answer = await http.get("marketplace/show")
    assert answer.status == 401 and answer.error_codes == ["auth-invalid-access-token"]
    # The refresh token still works after expiry.
    refreshed = await http.form(
        "/v1/auth/token",
        {
            "client_id": http.client_id,
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
        },
    )
    assert (await http.get("marketplace/show", token=refreshed.body["access_token"])).status == 200
    assert sim.expire_tokens() == 1


async def test_tokens_expire_on_the_simulator_clock() -> None:
    now = [datetime(2024, 1, 1, tzinfo=UTC)]
    sim = Simulator(SimConfig(rate_limits=None, token_lifetime_s=60, clock=lambda: now[0]))
    async with serve(sim) as url, aiohttp.ClientSession() as session:
        http = SimHttp(session, url)
        tokens = await http.login()
        assert tokens["expires_in"] == 60
        now[0] += timedelta(seconds=59)
        assert (await http.get("marketplace/show")).status == 200
        now[0] += timedelta(seconds=1)
        answer = await http.get("marketplace/show")
        assert answer.status == 401 and answer.error_codes == ["auth-invalid-access-token"]


async def test_revoke_kills_refresh_token_and_its_access_tokens(http: SimHttp) -> None:
    tokens = await http.login()
    other = (await http.grant()).body  # a second session stays valid
    answer = await http.form("/v1/auth/revoke", {"token": tokens["refresh_token"]})
    assert answer.status == 200
    assert (await http.get("marketplace/show")).status == 401
    refresh = await http.form(
        "/v1/auth/token",
        {
            "client_id": http.client_id,
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
        },
    )
    assert refresh.status == 401
    assert (await http.get("marketplace/show", token=other["access_token"])).status == 200
