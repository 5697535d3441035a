"""The ``jsonl`` handler: an append-only audit file, one JSON line per transition.

An event already in the file is not written again, even by another worker
process: every append happens under an exclusive ``flock``, after reading what
other writers appended since this process last looked. A line cut short by a
crash is ignored when reading and never counted as delivered.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.events import TransitionEvent
from worker.settings import Settings

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


class JsonlHandler:
    name = "jsonl"

    def __init__(self, settings: Settings) -> None:
        self.path = Path(settings.jsonl_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keys: set[str] = set()
        self._offset = 0
        self._lock = asyncio.Lock()

    async def handle(self, event: TransitionEvent) -> None:
        async with self._lock:
            await asyncio.to_thread(self._append, event)

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

    def _append(self, event: TransitionEvent) -> None:
        with self.path.open("a+b") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            try:
                self._catch_up(file)
                if event.key in self._keys:
                    return
                record = {"delivered_at": datetime.now(UTC).isoformat(), **event.model_dump(mode="json")}
                line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
                file.seek(0, os.SEEK_END)
                if file.tell() > self._offset:
                    line = b"\n" + line  # end a torn line left by a crash
                file.write(line)
                file.flush()
                os.fsync(file.fileno())
                self._offset = file.tell()
                self._keys.add(event.key)
            finally:
                fcntl.flock(file, fcntl.LOCK_UN)
