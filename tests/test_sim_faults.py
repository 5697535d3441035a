"""Rate limiting and injected faults, observed by a raw aiohttp client."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.simkit import API, SimHttp
from worker.api import wire
from worker.api.ratelimit import PRESETS, TokenBucket
from worker.errors import ConfigError
from worker.sim import FaultConfig, SimConfig, Simulator, serve

FAST_DEV = PRESETS["dev"].scaled(0.01)  # same burst sizes, refill 100x faster


async def test_burst_beyond_the_bucket_answers_429_then_recovers(sim: Simulator, sim_http: SimHttp) -> None:
    sim.rate_limits = FAST_DEV
    ok = 0
    first_429 = None
    for _ in range(2000):
        answer = await sim_http.get("marketplace/show")
        if answer.status == 429:
            first_429 = answer
            break
        assert answer.status == 200
        ok += 1
    assert first_429 is not None, "never rate limited"
    assert ok >= FAST_DEV.queries.initial  # the burst allowance was honoured
    assert first_429.error_codes == ["too-many-requests"]
    assert "Retry-After" not in first_429.headers
    assert sim.stats.too_many_requests >= 1
    # Commands have their own bucket.
    tx = sim.traffic.step(1)[0].transaction_id
    answer = await sim_http.command("transactions/update_metadata", {"id": str(tx), "metadata": {"k": 1}})
    assert answer.status == 200
    # The bucket refills: poll until a query passes again.
    deadline = time.monotonic() + 5
    while (await sim_http.get("marketplace/show")).status == 429:
        assert time.monotonic() < deadline
    # Admin routes and auth are never limited.
    assert (await sim_http.admin("GET", "stats")).status == 200


async def test_a_client_pacing_with_the_same_buckets_sees_no_429(sim: Simulator, sim_http: SimHttp) -> None:
    sim.rate_limits = FAST_DEV
    bucket = TokenBucket(FAST_DEV.queries)
    for _ in range(150):
        await bucket.take()
        assert (await sim_http.get("marketplace/show")).status == 200
    assert sim.stats.too_many_requests == 0
    assert sim.stats.answers[200] >= 150


async def test_rate_limits_can_be_set_over_http(sim: Simulator, sim_http: SimHttp) -> None:
    answer = await sim_http.admin("POST", "faults", {"rateLimit": "dev", "rateLimitScale": 0.5})
    assert answer.status == 200
    assert answer.body["rateLimits"]["queries"]["refillIntervalS"] == 0.5
    assert sim.rate_limits == PRESETS["dev"].scaled(0.5)
    await sim_http.admin("POST", "faults", {"rateLimit": "off"})
    assert sim.rate_limits is None
    bad = await sim_http.admin("POST", "faults", {"rateLimit": "fast"})
    assert bad.status == 400


async def _with_faults(sim: Simulator, http: SimHttp, **faults: float) -> None:
    answer = await http.admin("POST", "faults", {"faults": faults})
    assert answer.status == 200, answer.raw
    for key, value in faults.items():
        assert getattr(sim.faults, key) == value


async def test_server_errors_with_and_without_envelope(sim: Simulator, sim_http: SimHttp) -> None:
    await _with_faults(sim, sim_http, error_rate=1.0)
    kinds = set()
    for _ in range(30):
        answer = await sim_http.get("transactions/query")
        assert answer.status in (500, 502, 503)
        kinds.add(answer.content_type)
        if answer.content_type == wire.JSON_MIME:
            assert answer.body["errors"][0]["status"] == answer.status
    assert kinds == {"text/html", wire.JSON_MIME}
    assert sim.stats.faults["error"] == 30
    assert sum(sim.stats.answers[s] for s in (500, 502, 503)) == 30
    # Never on /_sim/, and not on auth unless asked for.
    assert (await sim_http.admin("GET", "transitions")).status == 200
    assert (await sim_http.grant()).status == 200
    await _with_faults(sim, sim_http, error_rate=0.0)
    assert (await sim_http.get("transactions/query")).status == 200


async def test_auth_faults_only_when_enabled(sim: Simulator, sim_http: SimHttp) -> None:
    sim.faults = FaultConfig(error_rate=1.0, include_auth=True)
    assert (await sim_http.grant()).status in (500, 502, 503)


async def test_dropped_connections(sim: Simulator, sim_http: SimHttp) -> None:
    sim.faults = FaultConfig(drop_rate=1.0)
    answered_before = sum(sim.stats.answers.values())
    for _ in range(3):
        with pytest.raises(aiohttp.ClientConnectionError):
            await sim_http.get("transactions/query")
    # aiohttp retries a GET once when a reused connection drops: count what the server saw.
    seen = sim.stats.requests[f"GET {API}/transactions/query"]
    assert seen >= 3 and sim.stats.faults["drop"] == seen
    assert sum(sim.stats.answers.values()) == answered_before  # nothing was answered
    sim.faults = FaultConfig()
    assert (await sim_http.get("transactions/query")).status == 200


async def test_truncated_bodies_after_the_command_ran(sim: Simulator, sim_http: SimHttp) -> None:
    tx_id = sim.traffic.step(1)[0].transaction_id
    sim.faults = FaultConfig(truncated_rate=1.0)
    with pytest.raises(aiohttp.ClientPayloadError):
        await sim_http.get("transactions/query")
    with pytest.raises(aiohttp.ClientPayloadError):
        await sim_http.command("transactions/update_metadata", {"id": str(tx_id), "metadata": {"x": 1}})
    # The change happened even though its answer was lost.
    assert sim.store.transaction(tx_id).metadata == {"x": 1}
    assert sim.stats.faults["truncated"] == 2


async def test_malformed_bodies(sim: Simulator, sim_http: SimHttp) -> None:
    sim.faults = FaultConfig(malformed_rate=1.0)
    for accept in (wire.JSON_MIME, wire.TRANSIT_MIME):
        answer = await sim_http.get("marketplace/show", accept=accept)
        assert answer.status == 200
        with pytest.raises(wire.WireFormatError):
            _ = answer.body
    # Errors are passed through untouched.
    answer = await sim_http.get("transactions/query", {"perPage": "0"})
    assert answer.status == 400 and answer.error_codes == ["validation-invalid-params"]
    assert sim.stats.faults["malformed"] == 2


async def test_added_latency(sim: Simulator, sim_http: SimHttp) -> None:
    sim.faults = FaultConfig(latency_s=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await sim_http.get("marketplace/show")).status == 200
    assert loop.time() - started >= 0.2
    started = loop.time()
    await sim_http.admin("GET", "stats")
    assert loop.time() - started < 0.2


async def test_mixed_rates_follow_the_seed() -> None:
    async def run() -> list[object]:
        faults = FaultConfig(error_rate=0.2, malformed_rate=0.2)
        sim = Simulator(SimConfig(seed=8, rate_limits=None, faults=faults))
        async with serve(sim) as url, aiohttp.ClientSession() as session:
            http = SimHttp(session, url)
            await http.login()
            outcomes: list[object] = []
            for _ in range(40):
                answer = await http.get("marketplace/show")
                try:
                    _ = answer.body
                    outcomes.append(answer.status)
                except wire.WireFormatError:
                    outcomes.append("malformed")
            return outcomes

    first, second = await run(), await run()
    assert first == second
    assert {200, "malformed"} <= set(first) and set(first) & {500, 502, 503}


def test_fault_config_validation() -> None:
    with pytest.raises(ConfigError):
        FaultConfig(error_rate=1.5)
    with pytest.raises(ConfigError):
        FaultConfig(error_rate=0.6, drop_rate=0.6)
    with pytest.raises(ConfigError):
        FaultConfig(latency_s=-1)
    with pytest.raises(ConfigError):
        FaultConfig().updated({"explode_rate": 1})
    assert FaultConfig().updated({"drop_rate": 1}).drop_rate == 1.0


async def test_stats_endpoint(sim: Simulator, sim_http: SimHttp) -> None:
    await sim_http.get("marketplace/show")
    await sim_http.get("transactions/show")
    stats = (await sim_http.admin("GET", "stats")).body
    assert stats["answers"] == {"200": 2, "400": 1}  # the token grant counts too
    assert stats["grants"] == {"client_credentials": 1}
    assert stats["tooManyRequests"] == 0
    assert stats["requests"][f"GET {API}/marketplace/show"] == 1
    await sim_http.admin("POST", "stats/reset")
    assert sim.stats.answers == {} and sim.grants == {}
