"""Shared fixtures: the private Redis ones come from flexworker's own pytest plugin."""

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.fakes import FakeApi, FakeClock
from tests.simkit import SimHttp
from worker.sim import SimConfig, Simulator, serve

pytest_plugins = ["worker.testing"]


@pytest.fixture
def sim() -> Simulator:
    """A fresh simulator: seed 1, no rate limits, no faults, no live traffic (call ``sim.traffic.step``)."""
    return Simulator(SimConfig(seed=1, rate_limits=None))


@pytest.fixture
async def sim_url(sim: Simulator) -> AsyncIterator[str]:
    """``sim`` served on a free localhost port; the base URL (``http://127.0.0.1:PORT``)."""
    async with serve(sim) as url:
        yield url


@pytest.fixture
async def sim_http(sim_url: str) -> AsyncIterator[SimHttp]:
    """A raw HTTP helper on ``sim_url``, already holding an access token."""
    async with aiohttp.ClientSession() as session:
        http = SimHttp(session, sim_url)
        await http.login()
        yield http


@pytest.fixture
def clock() -> FakeClock:
    """A fake monotonic clock whose ``sleep`` records delays and advances time."""
    return FakeClock()


@pytest.fixture
async def api(clock: FakeClock) -> AsyncIterator[FakeApi]:
    """A scripted local Integration API that records every request."""
    server = await FakeApi(clock=clock).start()
    yield server
    await server.close()
