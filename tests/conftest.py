"""Shared fixtures; Redis, the simulator and the factories come from flexworker's pytest plugin."""

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.fakes import FakeApi, FakeClock
from tests.simkit import SimHttp

pytest_plugins = ["worker.testing"]


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
