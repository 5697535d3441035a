"""The ``log`` handler: one structured log line per transition.

It logs identifiers only (event key, transaction, transition, actor, time), never
the transaction's data, which holds personal details.
"""

from __future__ import annotations

import structlog

from worker.events import TransitionEvent
from worker.settings import Settings

__all__ = ["LogHandler"]


class LogHandler:
    name = "log"

    def __init__(self, settings: Settings) -> None:
        self._log = structlog.get_logger("flexworker.handlers.log")

    async def handle(self, event: TransitionEvent) -> None:
        self._log.info(
            "transition",
            key=event.key,
            transaction_id=str(event.transaction_id),
            transition=event.transition,
            by=event.by,
            at=event.at.isoformat(),
            process=event.process_name,
            source=event.source,
        )
