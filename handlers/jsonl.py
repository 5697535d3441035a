"""The ``jsonl`` handler: an append-only audit file, one JSON line per transition.

An event already in the file is not written again, even by another worker
process: every append happens under an exclusive ``flock``, after reading what
other writers appended since this process last looked. A line cut short by a
crash is ignored when reading and never counted as delivered.

Appends are group-committed: events that arrive while a write and its ``fsync``
are under way go together in the next one, so concurrent deliveries share one
``fsync`` instead of queueing for one each. Every ``handle`` still returns only
after its event is on disk.

The file is ``FLEXWORKER_JSONL_PATH`` (flexworker's ``jsonl_path`` setting).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.events import TransitionEvent
from worker.plugin import FlexworkerSettings, Handler, HandlerContext

__all__ = ["JsonlHandler", "read_jsonl"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete record in a jsonl audit file."""
    if not path.exists():
        return []
    records = []
    with path.open("rb") as file:
        for line in file:
            if line.endswith(b"\n"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    return records


class JsonlHandler(Handler):
    """Appends every transition to the audit file (default subscription and retry policy)."""

    name = "jsonl"

    def __init__(self, settings: FlexworkerSettings, handler_settings: Any = None) -> None:
        super().__init__(settings, handler_settings)
        self.path = Path(settings.jsonl_path)
        self._keys: set[str] = set()
        self._offset = 0
        self._lock = asyncio.Lock()
        # A write cancelled on our side goes on in its thread; the next one must wait for it.
        self._file_lock = threading.Lock()
        self._waiting: dict[str, TransitionEvent] = {}

    async def startup(self) -> None:
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)

    async def handle(self, ctx: HandlerContext) -> None:
        event = ctx.event
        self._waiting.setdefault(event.key, event)
        async with self._lock:
            if event.key not in self._waiting:
                return  # the batch of a delivery before us wrote it
            batch = list(self._waiting.values())
            self._waiting.clear()
            try:
                await asyncio.to_thread(self._append, batch)
            except BaseException:
                # Whoever comes next writes them (what did reach the file is skipped by key).
                for waiting in batch:
                    self._waiting.setdefault(waiting.key, waiting)
                raise

    def _catch_up(self, file: Any) -> None:
        """Learn the keys other writers appended since our last look."""
        file.seek(self._offset)
        for line in file:
            if not line.endswith(b"\n"):
                break  # a torn last line; the next append starts on a fresh line
            self._offset += len(line)
            try:
                self._keys.add(json.loads(line)["key"])
            except (ValueError, KeyError, TypeError):
                continue

    def _append(self, events: list[TransitionEvent]) -> None:
        with self._file_lock, self.path.open("a+b") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            try:
                self._catch_up(file)
                fresh = [event for event in events if event.key not in self._keys]
                if not fresh:
                    return
                delivered_at = datetime.now(UTC).isoformat()
                lines = b"".join(
                    json.dumps(
                        {"delivered_at": delivered_at, **event.model_dump(mode="json")}, separators=(",", ":")
                    ).encode()
                    + b"\n"
                    for event in fresh
                )
                file.seek(0, os.SEEK_END)
                if file.tell() > self._offset:
                    lines = b"\n" + lines  # end a torn line left by a crash
                file.write(lines)
                file.flush()
                os.fsync(file.fileno())
                self._offset = file.tell()
                self._keys.update(event.key for event in fresh)
            finally:
                fcntl.flock(file, fcntl.LOCK_UN)
