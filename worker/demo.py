"""``flexworker demo``: the whole product on one machine, checked against ground truth.

It starts the simulator with live traffic, a private redis-server on a free port
(unless ``REDIS_URL`` is set), the poller and the worker with the ``jsonl``
handler, shows live progress, and at the end compares what was delivered with
every transition the simulator applied: missing, duplicated, and the latency from
a transition to its delivery. It exits non-zero if anything is missing or doubled.

The marketplace is lively (:data:`worker.sim.LIVELY`): reviews, messages, and now
and then a user deleted or banned, a listing or a finished transaction deleted. A
transition of a transaction deleted before the poller saw it cannot be delivered
by the ``transactions`` source; it counts as lost with its transaction, not as
missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from handlers.jsonl import JsonlHandler, read_jsonl
from handlers.log import LogHandler
from worker.events import SourceName, event_key
from worker.ops.redis_server import RedisServer
from worker.ops.status import HandlerStats, read_handler_stats
from worker.service import open_redis, run_poller, run_worker
from worker.settings import Settings
from worker.sim import LIVELY, SimConfig, Simulator, serve

__all__ = ["DemoResult", "run_demo"]


@dataclass(frozen=True)
class DemoResult:
    made: int
    delivered: int
    missing: list[str]
    duplicated: list[str]
    latencies_s: list[float]
    #: undelivered transitions whose transaction was deleted first (not a failure).
    lost_with_deleted: int = 0
    #: per handler: done, retried, dead-lettered, skipped.
    handlers: dict[str, HandlerStats] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.duplicated

    def percentile_s(self, share: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@contextlib.contextmanager
def _redis(redis_url: str | None) -> Iterator[str]:
    if redis_url:
        yield redis_url
        return
    with RedisServer() as server:
        yield server.url


def _expected_keys(sim: Simulator, since: datetime) -> tuple[list[str], set[str]]:
    """Keys of every transition since ``since``, and those of them whose transaction was deleted."""
    expected: list[str] = []
    deleted: set[str] = set()
    for record in sim.store.transition_log:
        if record.created_at >= since:
            key = event_key(record.transaction_id, record.transition, record.created_at)
            expected.append(key)
            if record.transaction_id in sim.store.deleted_transactions:
                deleted.add(key)
    return expected, deleted


def evaluate(sim: Simulator, jsonl_path: Path, since: datetime) -> DemoResult:
    """Compare the jsonl audit file with the simulator's ground truth."""
    expected, deleted = _expected_keys(sim, since)
    records = read_jsonl(jsonl_path)
    counts = Counter(str(r["key"]) for r in records)
    undelivered = [key for key in expected if key not in counts]
    latencies = [
        (datetime.fromisoformat(r["delivered_at"]) - datetime.fromisoformat(r["at"])).total_seconds()
        for r in records
    ]
    return DemoResult(
        made=len(expected),
        delivered=len(counts),
        missing=[key for key in undelivered if key not in deleted],
        duplicated=[key for key, n in counts.items() if n > 1],
        latencies_s=latencies,
        lost_with_deleted=sum(1 for key in undelivered if key in deleted),
    )


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in rows:
        table.add_row(label, value)
    return table


@contextlib.asynccontextmanager
async def _services(settings: Settings, source: SourceName, since: datetime) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_poller(settings, stop, source=source, since=since)),
        asyncio.create_task(
            run_worker(settings, stop, handlers=[JsonlHandler(settings), LogHandler(settings)])
        ),
    ]
    try:
        yield stop
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


async def run_demo(
    *,
    duration_s: float,
    rate: float,
    source: SourceName = "transactions",
    seed: int = 1,
    idle_interval_s: float = 2.0,
    drain_timeout_s: float = 60.0,
    redis_url: str | None = None,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo and return its result (the CLI prints it)."""
    console = console or Console()
    sim = Simulator(SimConfig(seed=seed, traffic_rate=0.0, reviews=True, activity=LIVELY))
    with tempfile.TemporaryDirectory(prefix="flexworker-demo-") as tmp, _redis(redis_url) as url:
        jsonl_path = Path(tmp) / "events.jsonl"
        async with serve(sim) as base_url:
            settings = Settings(
                sharetribe_client_id=sim.config.client_id,
                sharetribe_client_secret=sim.config.client_secret,
                sharetribe_api_base_url=base_url,
                redis_url=url,
                namespace=f"demo-{os.getpid()}-{int(time.time())}",
                source=source,
                idle_interval_s=idle_interval_s,
                jsonl_path=str(jsonl_path),
                handlers=["jsonl", "log"],
                _env_file=None,
            )
            since = datetime.now(UTC)
            async with _services(settings, source, since):
                sim.start_traffic(rate)
                started = time.monotonic()
                with Live(console=console, refresh_per_second=4, transient=True) as live:
                    while (elapsed := time.monotonic() - started) < duration_s:
                        result = evaluate(sim, jsonl_path, since)
                        live.update(
                            _table(
                                f"flexworker demo — {source} source, {rate:g}/s",
                                [
                                    ("elapsed", f"{elapsed:.0f} / {duration_s:.0f} s"),
                                    ("transitions made", str(result.made)),
                                    ("delivered", str(result.delivered)),
                                    ("waiting", str(len(result.missing))),
                                ],
                            )
                        )
                        await asyncio.sleep(0.25)
                    await sim.stop_traffic()
                    deadline = time.monotonic() + drain_timeout_s
                    while time.monotonic() < deadline:
                        result = evaluate(sim, jsonl_path, since)
                        if not result.missing:
                            break
                        live.update(
                            _table("draining", [("waiting for", f"{len(result.missing)} transitions")])
                        )
                        await asyncio.sleep(0.25)
            result = evaluate(sim, jsonl_path, since)
            async with open_redis(settings) as redis_pool:
                result = replace(result, handlers=await read_handler_stats(settings, redis_pool))
    return result


def summary(result: DemoResult) -> Table:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    return _table(
        "flexworker demo: summary",
        [
            ("transitions made", str(result.made)),
            ("delivered", str(result.delivered)),
            ("missing", str(len(result.missing))),
            ("duplicated", str(len(result.duplicated))),
            ("lost with a deleted transaction", str(result.lost_with_deleted)),
            ("latency p50", seconds(result.percentile_s(0.50))),
            ("latency p95", seconds(result.percentile_s(0.95))),
            ("latency p99", seconds(result.percentile_s(0.99))),
            ("latency max", seconds(max(result.latencies_s, default=None))),
            *(
                (
                    f"handler {name}",
                    f"done {s.done} · retried {s.retried} · dead {s.dead_lettered} · skipped {s.skipped}",
                )
                for name, s in result.handlers.items()
            ),
            ("result", "OK" if result.ok else "FAILED"),
        ],
    )
