"""A harness for end-to-end tests: simulator, private Redis, poller and worker.

The simulator and the pollers run in the test's event loop; each worker runs
``run_worker`` in a process of its own, as it does in production. In the test's
loop the poller (re-polling every 50 ms, parsing every page) would take most of
the CPU, and the worker, which makes a fan-out job and a handler job per event
(with their ordering and idempotency records), would fall behind live traffic.

Delivery is observed through the ``jsonl`` handler's audit file and compared with
the simulator's ground truth (every transition it applied).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from handlers.jsonl import JsonlHandler, read_jsonl
from worker.events import SourceName, event_key
from worker.service import run_poller, run_worker
from worker.settings import Settings
from worker.sim import Simulator


@dataclass
class Harness:
    sim: Simulator
    base_url: str
    redis_url: str
    directory: Path
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def jsonl_path(self) -> Path:
        return self.directory / "events.jsonl"

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "sharetribe_client_id": self.sim.config.client_id,
            "sharetribe_client_secret": self.sim.config.client_secret,
            "sharetribe_api_base_url": self.base_url,
            "redis_url": self.redis_url,
            "namespace": "test",
            "rate_limit": "off",
            "idle_interval_s": 0.05,
            "lookback_s": 1.0,
            "lease_ttl_s": 3.0,
            "api_retry_base_s": 0.01,
            "api_retry_cap_s": 0.1,
            "api_retry_max_attempts": 10,
            "handlers": ["jsonl"],
            "jsonl_path": str(self.jsonl_path),
            "api_page_cap": self.sim.config.page_cap,
        }
        values.update(overrides)
        return Settings(_env_file=None, _secrets_dir=None, **values)

    def expected(self, since: datetime | None = None) -> list[str]:
        """Keys of every transition the simulator applied (at or after ``since``)."""
        return [
            event_key(t.transaction_id, t.transition, t.created_at)
            for t in self.sim.transition_log
            if since is None or t.created_at >= since
        ]

    def delivered(self) -> Counter[str]:
        return Counter(str(record["key"]) for record in read_jsonl(self.jsonl_path))

    def start_poller(
        self,
        stop: asyncio.Event,
        *,
        source: SourceName | None = None,
        since: datetime | None = None,
        **kw: Any,
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(run_poller(self.settings(**kw), stop, source=source, since=since))
        self.tasks.append(task)
        return task

    def start_worker(self, stop: asyncio.Event, **kw: Any) -> asyncio.Task[None]:
        """A worker process with the ``jsonl`` handler; the task ends when it has stopped."""
        task = asyncio.create_task(_run_worker_process(self.settings(**kw), stop))
        self.tasks.append(task)
        return task

    async def wait_delivered(self, since: datetime | None = None, *, timeout_s: float = 30.0) -> Counter[str]:
        """Wait until every expected transition is delivered; fail on a deadline or a crashed task."""
        deadline = time.monotonic() + timeout_s
        while True:
            for task in self.tasks:
                if task.done() and task.exception() is not None:
                    raise AssertionError(f"service task crashed: {task.exception()!r}")
            delivered = self.delivered()
            missing = [k for k in self.expected(since) if k not in delivered]
            if not missing:
                return delivered
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(missing)} transitions not delivered, e.g. {missing[:3]}")
            await asyncio.sleep(0.05)

    def assert_exactly_once(self, since: datetime | None = None) -> None:
        delivered = self.delivered()
        expected = self.expected(since)
        assert len(expected) == len(set(expected)), "ground truth has repeated keys"
        duplicated = [k for k, n in delivered.items() if n > 1]
        assert not duplicated, f"delivered twice: {duplicated[:3]}"
        assert set(delivered) == set(expected)


def _worker_process_main(settings: Settings, stop: Any) -> None:
    """In the worker process: run the worker until the parent sets ``stop``."""

    async def main() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()

        def watch() -> None:
            stop.wait()
            loop.call_soon_threadsafe(stopped.set)

        # A daemon thread: a worker that crashes must not wait for it to exit.
        threading.Thread(target=watch, daemon=True).start()
        await run_worker(settings, stopped, handlers=[JsonlHandler(settings)])

    asyncio.run(main())


async def _run_worker_process(settings: Settings, stop: asyncio.Event) -> None:
    # spawn: the parent runs threads and an event loop, which fork would copy half-made.
    context = multiprocessing.get_context("spawn")
    process_stop = context.Event()
    process = context.Process(target=_worker_process_main, args=(settings, process_stop), daemon=True)
    process.start()
    exited = asyncio.ensure_future(asyncio.to_thread(process.join))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        process_stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout=15)
        except TimeoutError:
            process.kill()
            await exited
    if process.exitcode != 0:
        raise RuntimeError(f"worker process exited with status {process.exitcode}")


@contextlib.asynccontextmanager
async def stopping(*events: asyncio.Event) -> AsyncIterator[None]:
    """Set the stop events on the way out, so service tasks end even when a test fails."""
    try:
        yield
    finally:
        for event in events:
            event.set()
