"""The arq side: the job that hands each event to the enabled handlers.

Every handler runs even when an earlier one fails; the job fails (and the failure
is counted) if any of them did. Retries with backoff, per-handler jobs and the
dead-letter queue come with the handler framework.
"""

from __future__ import annotations

from typing import Any

import structlog
from arq.connections import ArqRedis
from arq.worker import Worker, func

from worker.errors import FlexworkerError
from worker.events import TransitionEvent
from worker.queue import JOB_FUNCTION
from worker.registry import Handler
from worker.settings import Settings

__all__ = ["HandlerFailedError", "build_worker", "failure_counter_key", "handle_event"]

log = structlog.get_logger(__name__)

#: arq keeps each job's result this long; our own seen records last far longer.
KEEP_RESULT_S = 3600


class HandlerFailedError(FlexworkerError):
    """One or more handlers raised on an event."""


def failure_counter_key(settings: Settings) -> str:
    return f"{settings.redis_prefix}:stats:failed"


async def handle_event(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    """arq job: run every enabled handler on one event."""
    event = TransitionEvent.model_validate(payload)
    handlers: list[Handler] = ctx["flexworker_handlers"]
    failed = []
    for handler in handlers:
        try:
            await handler.handle(event)
        except Exception as exc:  # a plugin may raise anything; it must not stop the others
            failed.append(handler.name)
            log.error(
                "handler failed",
                handler=handler.name,
                key=event.key,
                error=f"{type(exc).__name__}: {exc}",
            )
    if failed:
        redis: ArqRedis = ctx["redis"]
        await redis.incr(ctx["flexworker_failure_key"])
        raise HandlerFailedError(f"handlers failed on {event.key}: {', '.join(failed)}")


def build_worker(
    settings: Settings, redis: ArqRedis, handlers: list[Handler], *, burst: bool = False
) -> Worker:
    """An arq worker on this namespace's queue with ``handlers`` enabled."""
    return Worker(
        functions=[func(handle_event, name=JOB_FUNCTION)],
        queue_name=settings.queue_name,
        redis_pool=redis,
        burst=burst,
        handle_signals=False,
        max_jobs=settings.worker_max_jobs,
        job_timeout=settings.job_timeout_s,
        keep_result=KEEP_RESULT_S,
        poll_delay=0.1,
        ctx={"flexworker_handlers": handlers, "flexworker_failure_key": failure_counter_key(settings)},
        log_results=False,
    )
