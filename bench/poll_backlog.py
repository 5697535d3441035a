"""Benchmark: one ``poll --once`` catch-up of a deep backlog, against its own floor.

The simulated marketplace is seeded with ``--transitions`` transitions (60,000 make
about 15,700 transactions), all after the poller's start, and the client and the
simulator both run the dev marketplace's rate limits. One cycle walks them with the
default page cap (10,000), so it must walk ``createdAt`` windows. Printed against
baselines computed in the same run:

- queries: the minimal number of pages (one per 100 transactions newer than the
  threshold), and the ratio of queries made to it;
- wall time: the rate-limit bound (how long the dev buckets take to allow that
  minimal number of queries: 100 at once, then one a second), and the ratio to it;
- memory: the process's peak RSS before and after the walk, so a key set that grows
  with the cycle shows up as growth.

Usage: ``.venv/bin/python bench/poll_backlog.py [--transitions 60000] [--seed 1]``.
Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import resource
import time
from datetime import timedelta

from worker.api.client import IntegrationClient
from worker.api.ratelimit import PRESETS
from worker.ops.redis_server import RedisServer
from worker.service import build_poller, open_redis
from worker.settings import Settings
from worker.sim import SimConfig, Simulator, serve

PER_PAGE = 100


def rate_limit_bound_s(queries: int) -> float:
    """Seconds the dev query bucket needs to allow ``queries`` requests from full."""
    spec = PRESETS["dev"].queries
    beyond = max(0, queries - spec.initial)
    return beyond * spec.refill_interval_s / spec.refill_amount


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main(transitions: int, seed: int) -> None:
    sim = Simulator(SimConfig(seed=seed))  # dev rate limits, page cap 10,000
    since = sim.store.now() - timedelta(seconds=1)
    made_s = time.perf_counter()
    sim.traffic.step(transitions)
    made_s = time.perf_counter() - made_s
    transactions = len(sim.store.transactions)
    minimal_pages = math.ceil(transactions / PER_PAGE)
    print(f"backlog: {transitions} transitions on {transactions} transactions (made in {made_s:.1f} s)")
    with RedisServer() as redis:
        async with serve(sim) as base_url:
            settings = Settings(
                _env_file=None,
                _secrets_dir=None,
                sharetribe_client_id=sim.config.client_id,
                sharetribe_client_secret=sim.config.client_secret,
                sharetribe_api_base_url=base_url,
                redis_url=redis.url,
                namespace="bench",
                rate_limit="dev",
            )
            async with open_redis(settings) as pool, IntegrationClient.from_settings(settings) as client:
                poller = build_poller(settings, client, pool, since=since)
                sim.stats.reset()
                rss_before = peak_rss_mib()
                started = time.perf_counter()
                report = await poller.run_once()
                wall_s = time.perf_counter() - started
                queued = int(await pool.zcard(settings.queue_name))
    queries = sim.stats.requests["GET /v1/integration_api/transactions/query"]
    bound_s = rate_limit_bound_s(minimal_pages)
    print(f"events queued: {queued} (cycle reported {report.events} new; complete: {report.complete})")
    print(f"answers: {dict(sim.stats.answers)} (429s: {sim.stats.too_many_requests})")
    print(f"queries: {queries}; minimal pages: {minimal_pages}; ratio {queries / minimal_pages:.3f}")
    print(
        f"wall time: {wall_s:.1f} s; rate-limit bound for the minimal pages: {bound_s:.1f} s; "
        f"ratio {wall_s / bound_s:.3f}"
        if bound_s
        else f"wall time: {wall_s:.1f} s (within the burst: no rate-limit bound)"
    )
    print(f"peak RSS: {rss_before:.0f} MiB before the walk, {peak_rss_mib():.0f} MiB after")
    if queued != transitions:
        raise SystemExit(f"lost or extra events: {queued} queued of {transitions}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transitions", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(main(args.transitions, args.seed))
