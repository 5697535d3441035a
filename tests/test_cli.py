"""The ``flexworker`` command as a user runs it: real processes, real servers."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from worker.api.wire import format_time
from worker.ops.redis_server import RedisServer, free_port
from worker.sim import SimConfig, Simulator, serve

CLEARED = ("SHARETRIBE_", "FLEXWORKER_", "REDIS_URL")


def cli_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED)}
    env["FLEXWORKER_SECRETS_DIR"] = "/nonexistent"
    env.update(values)
    return env


async def flexworker(
    *args: str, env: dict[str, str], cwd: Path, timeout_s: float = 60
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def served_sim() -> AsyncIterator[tuple[Simulator, str]]:
    sim = Simulator(SimConfig(seed=4, rate_limits=None))
    async with serve(sim) as url:
        yield sim, url


def env_for(sim: Simulator, url: str, redis_url: str, **extra: str) -> dict[str, str]:
    return cli_env(
        SHARETRIBE_CLIENT_ID=sim.config.client_id,
        SHARETRIBE_CLIENT_SECRET=sim.config.client_secret,
        SHARETRIBE_API_BASE_URL=url,
        REDIS_URL=redis_url,
        FLEXWORKER_NAMESPACE="cli",
        **extra,
    )


async def test_poll_once_enqueues_and_moves_the_cursor(
    served_sim: tuple[Simulator, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    sim, url = served_sim
    since = sim.store.now() - timedelta(seconds=1)
    sim.traffic.step(40)
    env = env_for(sim, url, redis_server.url)
    code, _, err = await flexworker("poll", "--once", "--since", format_time(since), env=env, cwd=tmp_path)
    assert code == 0, err
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.zcard("flexworker:cli:queue") == 40
        watermark = await client.get("flexworker:cli:cursor:transactions")
        assert watermark is not None
        assert int(watermark) >= int(since.timestamp() * 1000)
        # A second --once finds nothing new: no more jobs.
        code, _, err = await flexworker("poll", "--once", env=env, cwd=tmp_path)
        assert code == 0, err
        assert await client.zcard("flexworker:cli:queue") == 40
        code, out, err = await flexworker("status", env=env, cwd=tmp_path)
        assert code == 0, err
        assert "queued jobs:         40" in out
        assert "poller lease:        free" in out
    finally:
        await client.aclose()


async def test_poll_once_failure_is_one_line_and_keeps_the_cursor(
    served_sim: tuple[Simulator, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    sim, _ = served_sim
    dead_url = f"http://127.0.0.1:{free_port()}"
    env = env_for(
        sim,
        dead_url,
        redis_server.url,
        FLEXWORKER_API_RETRY_MAX_ATTEMPTS="2",
        FLEXWORKER_API_RETRY_BASE_S="0.01",
    )
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    code, out, err = await flexworker(
        "cursor", "set", "--source", "transactions", "--at", format_time(at), env=env, cwd=tmp_path
    )
    assert code == 0, err
    assert "transactions: 2026-01-02T03:04:05+00:00" in out
    code, _, err = await flexworker("poll", "--once", env=env, cwd=tmp_path)
    assert code == 1
    # Retries are logged as they happen; the failure itself is the last line, and no traceback.
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flexworker: error: token endpoint unreachable"), err
    code, out, _ = await flexworker("cursor", "show", env=env, cwd=tmp_path)
    assert "transactions: 2026-01-02T03:04:05+00:00" in out


async def test_unreachable_redis_is_one_line(served_sim: tuple[Simulator, str], tmp_path: Path) -> None:
    sim, url = served_sim
    env = env_for(sim, url, f"redis://127.0.0.1:{free_port()}/0")
    code, _, err = await flexworker("status", env=env, cwd=tmp_path)
    assert code == 1
    assert err.strip().startswith("flexworker: error: cannot connect to Redis at REDIS_URL")
    assert len(err.strip().splitlines()) == 1


async def test_bad_handler_stops_start_up_with_one_line(
    served_sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    sim, url = served_sim
    env = env_for(sim, url, "redis://127.0.0.1:1/0", FLEXWORKER_HANDLERS="jsonl,nope")
    code, _, err = await flexworker("work", env=env, cwd=tmp_path)
    assert code == 2
    line = err.strip()
    assert line.startswith("flexworker: error: handler 'nope' is not installed (installed: ")
    assert "jsonl" in line
    assert "\n" not in line


async def test_demo_without_redis_says_how_to_get_one(tmp_path: Path) -> None:
    env = cli_env(PATH=str(Path(sys.executable).parent))
    code, _, err = await flexworker("demo", "--duration", "1", env=env, cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "redis-server not found on PATH" in lines[0]
    assert "REDIS_URL" in lines[0]


async def test_sim_command_serves_a_changing_marketplace(tmp_path: Path) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "sim",
        "--port",
        str(port),
        "--seed",
        "1",
        "--rate",
        "20",
        env=cli_env(),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        banner = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
        assert f"http://127.0.0.1:{port}" in banner
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            counts = []
            deadline = asyncio.get_running_loop().time() + 20
            while len(set(counts)) < 3:
                assert asyncio.get_running_loop().time() < deadline, counts
                async with session.get(f"{base}/_sim/transitions") as resp:
                    counts.append(len((await resp.json())["data"]))
                await asyncio.sleep(0.2)
            assert counts == sorted(counts)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=10)


@pytest.mark.parametrize("option", ["--since", "--at"])
async def test_a_time_without_a_utc_offset_is_refused_in_one_line(option: str, tmp_path: Path) -> None:
    # Read as UTC it could be hours off what the operator meant: transitions lost or replayed.
    args = ("poll", "--once") if option == "--since" else ("cursor", "set", "--source", "transactions")
    code, _, err = await flexworker(*args, option, "2026-05-01T09:00:00", env=cli_env(), cwd=tmp_path)
    assert code == 2
    [line] = err.strip().splitlines()
    assert "has no UTC offset" in line
    assert "2026-05-01T09:00:00Z" in line
