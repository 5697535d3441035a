"""Catch-up that always finishes: a backlog walked by ``poll --once --max-duration`` runs.

The acceptance run of the poll path, as a CronJob walks it: real ``flexworker poll``
processes against the served simulator (page cap 500, so the walk needs ``createdAt``
windows; a little latency on every answer, so runs end at their deadline), a 2 s
lease, and one run SIGKILLed mid-walk. Then a worker delivers what was queued, and
every transition must arrive exactly once.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.e2e import Harness, stopping
from tests.test_cli import env_for
from worker.api.wire import format_time
from worker.ops.redis_server import RedisServer
from worker.sim import FaultConfig, SimConfig, Simulator, serve

BACKLOG = 6_000
STATE_KEY = "flexworker:test:cursor:transactions:state"


@pytest.fixture
async def harness(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Harness]:
    sim = Simulator(SimConfig(seed=21, rate_limits=None, page_cap=500))
    async with serve(sim) as base_url:
        yield Harness(sim, base_url, redis_server.url, tmp_path)


async def poll_run(
    env: dict[str, str], cwd: Path, *args: str, kill_at_checkpoint: str | None = None
) -> tuple[int, str, str]:
    """One ``flexworker poll --once`` run with ``--max-duration 1``.

    With ``kill_at_checkpoint`` (a Redis URL) it runs without a deadline and is
    SIGKILLed as soon as it has written a checkpoint of its own: mid-walk, with the
    pages after it lost.
    """
    deadline = () if kill_at_checkpoint else ("--max-duration", "1")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "poll",
        "--once",
        *deadline,
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    if kill_at_checkpoint is not None:
        client = aioredis.Redis.from_url(kill_at_checkpoint)
        try:
            before = await client.hget(STATE_KEY, "resume")
            until = asyncio.get_running_loop().time() + 60
            while await client.hget(STATE_KEY, "resume") == before and process.returncode is None:
                assert asyncio.get_running_loop().time() < until, "no checkpoint written"
                await asyncio.sleep(0.01)
        finally:
            await client.aclose()
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_backlog_completes_through_deadline_runs_and_a_sigkill(harness: Harness) -> None:
    since = harness.sim.store.now() - timedelta(seconds=1)
    harness.sim.traffic.step(BACKLOG)
    harness.sim.faults = FaultConfig(latency_s=0.1)
    env = env_for(
        harness.sim,
        harness.base_url,
        harness.redis_url,
        FLEXWORKER_API_PAGE_CAP="500",
        FLEXWORKER_LEASE_TTL_S="2",
        FLEXWORKER_RATE_LIMIT="off",
        FLEXWORKER_LOOKBACK_S="1",
    ) | {"FLEXWORKER_NAMESPACE": "test"}
    summaries: list[str] = []
    killed = 0
    for run in range(60):
        if run == 1:
            code, _, err = await poll_run(env, harness.directory, kill_at_checkpoint=harness.redis_url)
            killed = code
            continue
        extra = ("--since", format_time(since)) if run == 0 else ()
        code, out, err = await poll_run(env, harness.directory, *extra)
        assert code == 0, err
        summaries.append(out.strip().splitlines()[-1])
        if "cycle complete" in summaries[-1]:
            break
    assert killed == -signal.SIGKILL, "the run to kill ended by itself"
    assert sum("stopped at a checkpoint" in line for line in summaries) >= 2, summaries
    assert "cycle complete" in summaries[-1], summaries
    stop = asyncio.Event()
    async with stopping(stop):
        harness.start_worker(stop)
        await harness.wait_delivered(timeout_s=120)
    harness.assert_exactly_once()
    assert len(harness.expected()) == BACKLOG
