"""pytest fixtures for flexworker's tests and for plugin authors' tests.

Enable with ``pytest_plugins = ["worker.testing"]`` in a ``conftest.py``.

- ``redis_server``: a private :class:`~worker.redis_server.RedisServer` (persistent,
  so tests can kill and restart it) on a free port, removed afterwards.
- ``redis_url``: its URL.
- ``arq_redis``: an :class:`arq.connections.ArqRedis` pool on it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from arq.connections import ArqRedis, RedisSettings, create_pool

from worker.redis_server import RedisServer

__all__ = ["arq_redis", "redis_server", "redis_url"]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(persist=True) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest_asyncio.fixture
async def arq_redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        yield pool
    finally:
        await pool.aclose()
