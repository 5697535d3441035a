"""The arq side: the two job functions and the worker that runs them.

- ``handle_event`` (queued by the poller, one per event) fans the event out: one
  ``run_handler`` job per enabled, matching handler (:meth:`Delivery.fan_out`).
- ``run_handler`` delivers one event to one handler (:meth:`Delivery.deliver`) and
  re-defers itself with ``arq.Retry`` when it must wait or retry.

arq's own retry limit is set out of reach (:data:`ARQ_MAX_TRIES`): waiting for order
re-runs a job without being an attempt, and the handler's retry policy decides when
to give up. A Redis failure in our bookkeeping re-defers the job rather than losing it.
"""

from __future__ import annotations

from typing import Any

import redis
import structlog
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.worker import Retry, Worker, func

from worker.deliver.delivery import Delivery
from worker.queue.ordering import EVENT_JOB_FUNCTION, HANDLER_JOB_FUNCTION, JOB_EXPIRY_S, ORDER_PARK_S
from worker.settings import Settings

__all__ = ["ARQ_MAX_TRIES", "KEEP_RESULT_S", "build_worker", "handle_event", "run_handler"]

log = structlog.get_logger(__name__)

#: arq keeps each job's result this long; our own seen and delivery records last far longer.
KEEP_RESULT_S = 3600
#: Far beyond any real count of re-runs: the delivery rules decide, not arq.
ARQ_MAX_TRIES = 2**31 - 1
#: Re-defer after a Redis failure in our own bookkeeping.
STORE_RETRY_S = 2.0
CTX_DELIVERY = "flexworker_delivery"


async def _keep_job(redis_pool: ArqRedis, job_id: str, delay_s: float) -> None:
    # arq drops a job whose key expired; a long chain of waits or retries must not get there.
    await redis_pool.pexpire(job_key_prefix + job_id, int((delay_s + JOB_EXPIRY_S) * 1000))


async def handle_event(ctx: dict[str, Any], payload: dict[str, Any]) -> list[str]:
    """arq job: queue the event for every enabled handler that subscribes to it."""
    delivery: Delivery = ctx[CTX_DELIVERY]
    try:
        return await delivery.fan_out(payload, job_id=ctx["job_id"])
    except redis.RedisError as exc:
        log.warning("fan-out deferred: Redis failed", job_id=ctx["job_id"], error=type(exc).__name__)
        await _keep_job(ctx["redis"], ctx["job_id"], STORE_RETRY_S)
        raise Retry(defer=STORE_RETRY_S) from exc


async def run_handler(ctx: dict[str, Any], handler: str, payload: dict[str, Any]) -> str:
    """arq job: deliver one event to one handler; re-defer while waiting or retrying."""
    delivery: Delivery = ctx[CTX_DELIVERY]
    job_id: str = ctx["job_id"]
    try:
        outcome = await delivery.deliver(handler, payload, job_id=job_id)
    except redis.RedisError as exc:
        log.warning(
            "delivery deferred: Redis failed", job_id=job_id, handler=handler, error=type(exc).__name__
        )
        await _keep_job(ctx["redis"], job_id, STORE_RETRY_S)
        raise Retry(defer=STORE_RETRY_S) from exc
    if outcome.again:
        await _keep_job(ctx["redis"], job_id, outcome.delay_s or ORDER_PARK_S)
        # Without a delay arq leaves the job's score as the claim script parked it.
        raise Retry(defer=outcome.delay_s)
    return outcome.kind


def build_worker(
    settings: Settings, redis_pool: ArqRedis, delivery: Delivery, *, burst: bool = False
) -> Worker:
    """An arq worker on this namespace's queue, delivering through ``delivery``."""
    # arq must never cut an attempt short: ours end at the handler's timeout, then settle.
    timeout_s = max(settings.job_timeout_s, delivery.longest_timeout_s + 30)
    return Worker(
        functions=[
            func(handle_event, name=EVENT_JOB_FUNCTION),
            # No arq result: the delivery record already makes a second copy of the job a no-op,
            # and storing a result would pickle the whole event once more.
            func(run_handler, name=HANDLER_JOB_FUNCTION, timeout=timeout_s, keep_result=0),
        ],
        queue_name=settings.queue_name,
        redis_pool=redis_pool,
        burst=burst,
        handle_signals=False,
        max_jobs=settings.worker_max_jobs,
        job_timeout=settings.job_timeout_s,
        keep_result=KEEP_RESULT_S,
        max_tries=ARQ_MAX_TRIES,
        poll_delay=0.1,
        ctx={CTX_DELIVERY: delivery},
        log_results=False,
    )
