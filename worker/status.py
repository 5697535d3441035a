"""What ``flexworker status`` reports: cursors and their lag, queue depth, jobs, failures."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from worker.cursor import CursorStore
from worker.runner import failure_counter_key
from worker.settings import Settings
from worker.sources.transactions import from_ms

__all__ = ["Status", "read_status"]


@dataclass(frozen=True)
class Status:
    namespace: str
    watermark: datetime | None
    sequence_id: int | None
    lease_holder: int | None
    queued: int
    in_progress: int
    failed: int
    now: datetime

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
            ("failed jobs", str(self.failed)),
        ]
        return [f"{label + ':':<21}{value}" for label, value in rows]


async def read_status(settings: Settings, redis: ArqRedis) -> Status:
    cursors = CursorStore(redis, settings.redis_prefix)
    watermark_ms = await cursors.get("transactions")
    in_progress = 0
    async for _ in redis.scan_iter(match=in_progress_key_prefix + "*", count=1000):
        in_progress += 1
    holder = await redis.get(f"{settings.redis_prefix}:lease:poller")
    failed = await redis.get(failure_counter_key(settings))
    return Status(
        namespace=settings.namespace,
        watermark=None if watermark_ms is None else from_ms(watermark_ms),
        sequence_id=await cursors.get("events"),
        lease_holder=int(holder) if holder is not None else None,
        queued=int(await redis.zcard(settings.queue_name)),
        in_progress=in_progress,
        failed=int(failed or 0),
        now=datetime.now(UTC),
    )
