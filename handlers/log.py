"""The ``log`` handler: one structured log line per transition.

It logs identifiers only (event key, transaction, transition, actor, time), never
the transaction's data, which holds personal details.
"""

from __future__ import annotations

from typing import Any

import structlog

from worker.plugin import FlexworkerSettings, Handler, HandlerContext

__all__ = ["LogHandler"]


class LogHandler(Handler):
    """Logs every transition (default subscription and retry policy)."""

    name = "log"

    def __init__(self, settings: FlexworkerSettings, handler_settings: Any = None) -> None:
        super().__init__(settings, handler_settings)
        self._log = structlog.get_logger("flexworker.handlers.log")

    async def handle(self, ctx: HandlerContext) -> None:
        event = ctx.event
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
