"""What ``flexworker status`` reports: cursors and their lag, queue depth, jobs, handler outcomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from worker.events import from_ms
from worker.poll.cursor import CursorStore
from worker.poll.skipped import SkippedItems
from worker.queue.keys import Keys
from worker.settings import Settings

__all__ = ["HandlerStats", "Status", "read_handler_stats", "read_status"]


@dataclass(frozen=True)
class HandlerStats:
    """One handler's delivery outcomes since the namespace began."""

    done: int = 0
    retried: int = 0
    dead_lettered: int = 0
    #: deliveries that were no-ops: already done, dead-lettered, or not wanted after all.
    skipped: int = 0


async def read_handler_stats(settings: Settings, redis: ArqRedis) -> dict[str, HandlerStats]:
    """Every handler's counters (``P:stats:handler:<name>``), by name."""
    keys = Keys(settings.redis_prefix)
    prefix = keys.stats("")
    stats = {}
    async for key in redis.scan_iter(match=keys.stats_pattern, count=1000):
        name = key.decode().removeprefix(prefix)
        raw = await redis.hgetall(key)  # type: ignore[misc]
        values = {k.decode(): int(v) for k, v in raw.items()}
        stats[name] = HandlerStats(
            **{f: values.get(f, 0) for f in ("done", "retried", "dead_lettered", "skipped")}
        )
    return dict(sorted(stats.items()))


@dataclass(frozen=True)
class Status:
    namespace: str
    watermark: datetime | None
    sequence_id: int | None
    lease_holder: int | None
    queued: int
    in_progress: int
    dead_letters: int
    now: datetime
    #: items a source skipped since the namespace began (``flexworker skipped``).
    skipped_items: int = 0
    #: a cycle was cut short and waits to be resumed (per source).
    resuming: tuple[str, ...] = ()
    handlers: dict[str, HandlerStats] = field(default_factory=dict)

    @property
    def lag_s(self) -> float | None:
        """How far the transactions watermark trails the clock."""
        return None if self.watermark is None else (self.now - self.watermark).total_seconds()

    def lines(self) -> list[str]:
        watermark = "none"
        if self.watermark is not None:
            watermark = f"{self.watermark.isoformat()} (lag {self.lag_s:.1f} s)"
        rows = [
            ("namespace", self.namespace),
            ("transactions cursor", watermark),
            ("events cursor", "none" if self.sequence_id is None else str(self.sequence_id)),
            ("poller lease", "free" if self.lease_holder is None else f"held (token {self.lease_holder})"),
            ("queued jobs", str(self.queued)),
            ("jobs in progress", str(self.in_progress)),
            ("dead letters", str(self.dead_letters)),
            ("skipped items", str(self.skipped_items)),
        ]
        if self.resuming:
            rows.append(("cycle to resume", ", ".join(self.resuming)))
        for name, stats in self.handlers.items():
            rows.append(
                (
                    f"handler {name}",
                    f"done {stats.done}, retried {stats.retried}, dead-lettered {stats.dead_lettered}, "
                    f"skipped {stats.skipped}",
                )
            )
        return [f"{label + ':':<21}{value}" for label, value in rows]


async def read_status(settings: Settings, redis: ArqRedis) -> Status:
    cursors = CursorStore(redis, settings.redis_prefix)
    watermark_ms = await cursors.get("transactions")
    resuming = tuple(
        [source for source in ("transactions", "events") if (await cursors.load(source)).resume is not None]
    )
    skipped = SkippedItems(
        redis, settings.redis_prefix, retention_s=settings.seen_retention_s, clock=lambda: 0
    )
    in_progress = 0
    async for _ in redis.scan_iter(match=in_progress_key_prefix + "*", count=1000):
        in_progress += 1
    holder = await redis.get(Keys(settings.redis_prefix).poller_lease)
    return Status(
        namespace=settings.namespace,
        watermark=None if watermark_ms is None else from_ms(watermark_ms),
        sequence_id=await cursors.get("events"),
        lease_holder=int(holder) if holder is not None else None,
        queued=int(await redis.zcard(settings.queue_name)),
        in_progress=in_progress,
        dead_letters=int(await redis.zcard(Keys(settings.redis_prefix).dlq_index)),
        now=datetime.now(UTC),
        handlers=await read_handler_stats(settings, redis),
        skipped_items=await skipped.count(),
        resuming=resuming,
    )
