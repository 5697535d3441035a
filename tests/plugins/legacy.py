"""The older form: a factory taking the settings, returning an object with name and handle(event)."""

from __future__ import annotations

from worker.events import TransitionEvent
from worker.settings import Settings


class LegacyHandler:
    name = "legacy"

    def __init__(self, settings: Settings) -> None:
        self.seen: list[str] = []

    async def handle(self, event: TransitionEvent) -> None:
        self.seen.append(event.key)
