"""End to end: a worker SIGKILLed inside ``ctx.step`` and restarted does the side effect once.

A real worker process (``python -m tests.kill_plugin``) runs the ``kill-test`` handler
on one queued event. Its step POSTs ``/effect`` to a recording server in this test
and then hangs, so the test kills the process after the side effect happened but
before the step recorded its result. A second worker process then delivers the
event again: the step is uncertain, ``if_uncertain`` asks the server, finds the
effect, and records it without calling ``fn`` again. Without ``if_uncertain`` the
uncertain step is dead-lettered instead.

Fast-forward: a killed worker leaves arq's in-progress key for its job, which expires
after the job timeout plus arq's 10 s (minutes with the defaults). The test checks the
key is there with a finite TTL and expires it itself instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from arq.constants import in_progress_key_prefix

from tests.kill_plugin import HANDLER_NAME, STEP, TIMEOUT_S, worker_settings
from worker.deliver.dlq import DeadLetters, dead_letter_id
from worker.deliver.idempotency import LEASE_MARGIN_S, DeliveryRecord, DeliveryRecords
from worker.deliver.runner import IN_PROGRESS_S
from worker.events import TransitionEvent
from worker.ops.redis_server import RedisServer
from worker.queue.enqueue import EventQueue
from worker.queue.keys import Keys
from worker.queue.ordering import event_job_id
from worker.service import open_redis
from worker.testing import make_event

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "killtest"


@dataclass
class Recorder:
    """What the handler did, as seen from outside the worker."""

    effects: Counter[str] = field(default_factory=Counter)
    checks: list[str] = field(default_factory=list)
    entered: list[int] = field(default_factory=list)

    async def post_effect(self, request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        self.effects[key] += 1
        return web.json_response({"effect": key})

    async def get_effect(self, request: web.Request) -> web.Response:
        key = request.query["key"]
        self.checks.append(key)
        done = self.effects[key] > 0
        return web.json_response({"done": done, "result": {"effect": key} if done else None})

    async def post_entered(self, request: web.Request) -> web.Response:
        self.entered.append(int((await request.json())["attempt"]))
        return web.json_response({})


@contextlib.asynccontextmanager
async def recording_server(recorder: Recorder) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/effect", recorder.post_effect)
    app.router.add_get("/effect", recorder.get_effect)
    app.router.add_post("/entered", recorder.post_entered)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def wait_for(what: str, ready: Callable[[], Awaitable[bool]], *, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def start_worker(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.kill_plugin", cwd=ROOT, env={**os.environ, **env}
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("with_check", [True, False], ids=["if_uncertain", "no_if_uncertain"])
async def test_sigkill_inside_step_then_restart_does_the_side_effect_once(
    redis_server: RedisServer, with_check: bool
) -> None:
    settings = worker_settings(redis_server.url, NAMESPACE)
    recorder = Recorder()
    event: TransitionEvent = make_event("transition/confirm-payment")
    processes: list[asyncio.subprocess.Process] = []

    async with recording_server(recorder) as url, open_redis(settings) as redis:
        records = DeliveryRecords(redis, Keys(settings.redis_prefix), retention_s=3600)

        async def record() -> DeliveryRecord:
            return await records.read(HANDLER_NAME, event.key)

        queue = EventQueue(
            redis, prefix=settings.redis_prefix, queue_name=settings.queue_name, seen_retention_s=3600
        )
        assert await queue.enqueue([event]) == 1

        env = {
            "KILL_PLUGIN_URL": url,
            "KILL_PLUGIN_REDIS_URL": redis_server.url,
            "KILL_PLUGIN_NAMESPACE": NAMESPACE,
            "KILL_PLUGIN_NO_CHECK": "0" if with_check else "1",
        }
        try:
            # Worker 1: does the side effect, then hangs inside fn; killed there.
            first = await start_worker({**env, "KILL_PLUGIN_HANG": "1"})
            processes.append(first)

            async def effect_done() -> bool:
                return sum(recorder.effects.values()) > 0

            await wait_for("the first worker's side effect", effect_done)
            first.kill()
            assert await asyncio.wait_for(first.wait(), 10) == -9  # SIGKILL

            assert recorder.entered == [1]
            lost = await record()
            assert lost.status is None
            assert lost.attempts == 1
            assert lost.steps[STEP]["state"] == "started"  # uncertain: fn ran, no result recorded

            # arq's in-progress key of the dead worker's job lapses on its own within seconds
            # (the worker's heartbeat kept it short); the dead attempt's claim holds the delivery
            # until the handler's timeout plus the lease margin.
            killed_at = time.monotonic()
            in_progress = in_progress_key_prefix + event_job_id(settings.redis_prefix, event.key)
            ttl_ms = await redis.pttl(in_progress)
            assert 0 < ttl_ms <= IN_PROGRESS_S * 1000, f"in-progress key {in_progress}: TTL {ttl_ms}"

            # Worker 2: the same handler, no hang.
            second = await start_worker(env)
            processes.append(second)

            async def settled() -> bool:
                return (await record()).status is not None

            bound_s = TIMEOUT_S + LEASE_MARGIN_S + 5
            await wait_for("the restarted worker to settle the delivery", settled, timeout_s=bound_s)
            # Within the handler's timeout plus a few seconds of the kill, not arq's ~310 s.
            assert time.monotonic() - killed_at < bound_s
            final = await record()
            key = next(iter(recorder.effects))

            # The side effect reached the server exactly once, whatever happened next.
            assert recorder.effects == Counter({key: 1})
            assert recorder.entered == [1, 2]
            assert final.attempts == 2
            if with_check:
                assert recorder.checks == [key]  # the lost attempt's step was looked up, once
                assert final.status == "done"
                assert final.steps[STEP] == {"state": "done", "attempt": 2, "result": {"effect": key}}
                assert final.errors == []
            else:
                assert recorder.checks == []
                assert final.status == "dead"
                assert final.steps[STEP]["state"] == "started"
                letter = await DeadLetters(redis, settings).show(dead_letter_id(HANDLER_NAME, event.key))
                assert letter is not None
                assert letter.reason == "permanent"
                assert letter.last_error is not None
                assert letter.last_error.type == "StepUncertainError"

            second.terminate()
            assert await asyncio.wait_for(second.wait(), 15) == 0  # a clean stop
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
