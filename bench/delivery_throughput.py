"""Benchmark: the job path against plain arq, in one run, on one private redis-server.

- Baseline: ``--events`` no-op arq jobs, enqueued with ``ArqRedis.enqueue_job``, run by a
  plain arq ``Worker(max_jobs=100, poll_delay=0.05, burst=True)``: jobs per second.
- flexworker: the simulator makes ``--events`` transitions, one ``poll --once`` cycle
  queues them as the poller does, and a burst worker built as ``flexworker work`` builds
  it (``FLEXWORKER_WORKER_MAX_JOBS=100``) delivers them to one no-op plugin handler, then,
  on a fresh namespace, to three: deliveries ((event, handler) pairs) per second.

Also printed, not as a baseline: plain arq jobs that carry an event-sized argument (what
arq itself pays to store, read and unpickle a payload like ours).

Printed: each rate, its ratio to the baseline, and Redis commands per delivery from
``INFO commandstats`` (calls inside Lua scripts included; ``eval``/``evalsha`` counted
apart, one round trip each). Not part of the test run.

Usage: ``.venv/bin/python bench/delivery_throughput.py [--events 5000] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import aiohttp
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, func

from worker.api.client import IntegrationClient
from worker.deliver.delivery import Delivery
from worker.deliver.runner import build_worker
from worker.ops.redis_server import RedisServer
from worker.plugin import HandlerContext, handler
from worker.registry import activate
from worker.service import build_poller
from worker.settings import Settings
from worker.sim import SimConfig, Simulator, serve
from worker.testing import make_event

MAX_JOBS = 100


async def noop(ctx: dict[str, Any], n: Any) -> None:
    return None


def noop_handler(name: str) -> Any:
    @handler(name)
    async def handle(ctx: HandlerContext) -> None:
        return None

    return handle


async def commandstats(pool: ArqRedis) -> Counter[str]:
    info = await pool.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()})


async def plain_arq(redis_url: str, events: int, payload: Any = None) -> tuple[float, Counter[str]]:
    """Plain arq no-op jobs per second; each job's argument is its number, or ``payload``."""
    queue = "bench:plain" if payload is None else "bench:plain-payload"
    pool = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=queue)
    try:
        for start in range(0, events, 500):
            await asyncio.gather(
                *(
                    pool.enqueue_job("noop", n if payload is None else payload)
                    for n in range(start, min(events, start + 500))
                )
            )
        worker = Worker(
            functions=[func(noop, name="noop")],
            queue_name=queue,
            redis_pool=pool,
            burst=True,
            handle_signals=False,
            max_jobs=MAX_JOBS,
            poll_delay=0.05,
            keep_result=0,
        )
        before = await commandstats(pool)
        started = time.perf_counter()
        await worker.async_run()
        elapsed = time.perf_counter() - started
        after = await commandstats(pool)
        assert worker.jobs_complete == events, worker.jobs_complete
        await worker.close()
        return events / elapsed, after - before
    finally:
        await pool.aclose()


async def flexworker(
    redis_url: str, events: int, handlers: int, namespace: str, seed: int
) -> tuple[float, Counter[str]]:
    sim = Simulator(SimConfig(seed=seed, rate_limits=None))
    since = sim.store.now() - timedelta(seconds=1)
    sim.traffic.step(events)
    async with serve(sim) as base_url:
        settings = Settings(
            _env_file=None,
            _secrets_dir=None,
            sharetribe_client_id=sim.config.client_id,
            sharetribe_client_secret=sim.config.client_secret,
            sharetribe_api_base_url=base_url,
            redis_url=redis_url,
            namespace=namespace,
            rate_limit="off",
            worker_max_jobs=MAX_JOBS,
            handlers=[],
        )
        pool = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=settings.queue_name)
        try:
            async with IntegrationClient.from_settings(settings) as client, aiohttp.ClientSession() as http:
                report = await build_poller(settings, client, pool, since=since).run_once()
                assert report.events == events, report
                loaded = [activate(noop_handler(f"noop{n}"), settings) for n in range(handlers)]
                delivery = Delivery(pool, settings, loaded, client=client, http=http)
                worker = build_worker(settings, pool, delivery, burst=True)
                before = await commandstats(pool)
                started = time.perf_counter()
                await worker.async_run()
                elapsed = time.perf_counter() - started
                after = await commandstats(pool)
                await worker.close()
            done = 0
            for loaded_handler in loaded:
                done += int(await pool.hget(delivery.keys.stats(loaded_handler.name), "done") or 0)
            assert done == events * handlers, (done, events * handlers)
            return done / elapsed, after - before
        finally:
            await pool.aclose()


def sample_payload() -> dict[str, Any]:
    """One event as the poller queues it (a booking's confirm-payment, with its transaction)."""
    return make_event("transition/confirm-payment").model_dump(mode="json")


def per_delivery(stats: Counter[str], deliveries: int) -> str:
    scripts = stats["eval"] + stats["evalsha"]
    total = sum(stats.values())
    top = ", ".join(f"{name} {calls / deliveries:.1f}" for name, calls in stats.most_common(6))
    return f"{total / deliveries:.1f} commands ({scripts / deliveries:.1f} scripts) per delivery: {top}"


async def main(events: int, repeat: int, seed: int) -> None:
    with RedisServer() as redis:
        for run in range(1, repeat + 1):
            base_rate, base_stats = await plain_arq(redis.url, events)
            print(f"run {run}: plain arq: {base_rate:.0f} jobs/s; {per_delivery(base_stats, events)}")
            # Not the baseline, only to show what arq itself pays for an event-sized argument.
            sized_rate, _ = await plain_arq(redis.url, events, payload=sample_payload())
            print(
                f"run {run}: plain arq, jobs carrying an event as argument: {sized_rate:.0f} jobs/s, "
                f"ratio {sized_rate / base_rate:.2f}"
            )
            for handlers in (1, 3):
                rate, stats = await flexworker(redis.url, events, handlers, f"bench-{run}-{handlers}", seed)
                print(
                    f"run {run}: flexworker, {handlers} handler{'s' if handlers > 1 else ''}: "
                    f"{rate:.0f} deliveries/s, ratio {rate / base_rate:.2f}; "
                    f"{per_delivery(stats, events * handlers)}"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.repeat, args.seed))
