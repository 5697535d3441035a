"""The arq side: the two job functions, the worker that runs them, and its heartbeat.

- ``handle_event`` (queued by the poller, one per event) delivers the event inline
  to the handlers this worker runs (:meth:`Delivery.deliver_event`).
- ``run_handler`` delivers one event to one handler (:meth:`Delivery.deliver`): a
  retry, a delivery that waited for order, or one handed over by another replica.

arq's retry limit and timeout are set out of reach: the delivery rules decide when
to give up, and each handler's attempt ends at its own timeout, so arq never cancels
a job (a cancelled job would be marked failed and deleted). A job that must run
again has already been re-scored by our scripts; it re-raises ``arq.Retry`` without
a delay, which leaves the score alone.

arq marks a running job with an in-progress key for as long as the job may run; we
shorten it to :data:`IN_PROGRESS_S` and renew it from a heartbeat, so a killed
worker's jobs are taken up again within seconds (their deliveries then wait for
the dead attempt's claim, see :mod:`worker.deliver.delivery`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import structlog
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import Retry, Worker, func

from worker.deliver.delivery import Delivery, Outcome
from worker.deliver.roster import HEARTBEAT_S
from worker.queue.ordering import EVENT_JOB_FUNCTION, HANDLER_JOB_FUNCTION
from worker.settings import Settings

__all__ = [
    "ARQ_MAX_TRIES",
    "ARQ_TIMEOUT_S",
    "IN_PROGRESS_S",
    "FlexWorker",
    "build_worker",
    "handle_event",
    "keep_alive",
    "run_handler",
]

log = structlog.get_logger(__name__)

#: Far beyond any real count of re-runs: the delivery rules decide, not arq.
ARQ_MAX_TRIES = 2**31 - 1
#: arq's per-job timeout, out of reach: attempts end at their handler's own timeout.
ARQ_TIMEOUT_S = 10 * 365 * 86400.0
#: Lifetime of arq's in-progress key of a running job; renewed every :data:`RENEW_S`.
IN_PROGRESS_S = 15.0
RENEW_S = 5.0
#: Re-defer after a Redis failure in our own bookkeeping.
STORE_RETRY_S = 2.0
#: Longest re-defer of an event job whose own code keeps failing (it is never dropped).
FAILING_RETRY_MAX_S = 300.0
CTX_DELIVERY = "flexworker_delivery"


async def handle_event(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    """arq job: deliver one event to the handlers that subscribe to it."""
    delivery: Delivery = ctx[CTX_DELIVERY]
    await _run(
        ctx, "event job", delivery.deliver_event(payload, job_id=ctx["job_id"], job_try=ctx["job_try"])
    )


async def run_handler(ctx: dict[str, Any], handler: str, payload: dict[str, Any]) -> str:
    """arq job: deliver one event to one handler; run again while waiting or retrying."""
    delivery: Delivery = ctx[CTX_DELIVERY]
    job = delivery.deliver(handler, payload, job_id=ctx["job_id"], job_try=ctx["job_try"])
    return (await _run(ctx, "handler job", job)).kind


async def _run(ctx: dict[str, Any], what: str, job: Awaitable[Outcome]) -> Outcome:
    """Await a job's delivery; anything that keeps it from ending re-defers it, never drops it."""
    job_id: str = ctx["job_id"]
    try:
        outcome = await job
    except redis.RedisError as exc:
        log.warning(f"{what} deferred: Redis failed", job_id=job_id, error=type(exc).__name__)
        raise Retry(defer=STORE_RETRY_S) from exc
    except Exception as exc:
        # A fault in our own code outside any one delivery: keep the job, say so, try later.
        delay_s = min(FAILING_RETRY_MAX_S, STORE_RETRY_S * 2 ** min(ctx["job_try"], 10))
        log.error(
            f"{what} failed; it runs again", job_id=job_id, error=type(exc).__name__, retry_in_s=delay_s
        )
        raise Retry(defer=delay_s) from exc
    if outcome.again:
        raise Retry(defer=None)  # the scripts set the job's score (parked, deferred): leave it
    return outcome


# KEYS: the job's in-progress key, the queue. ARGV: job id, in-progress ms.
# arq's check-and-mark of a job to start (WATCH, EXISTS, ZSCORE, MULTI/PSETEX/EXEC: four round
# trips) as one script: the same rule, atomically, with "due" judged by Redis's clock (a host
# whose clock runs fast lists jobs early but cannot start them early). The job's score, or false.
_TAKE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
local t = redis.call('TIME')
if not score or tonumber(score) > tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then
  return false
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
return score
"""


class FlexWorker(Worker):
    """arq's worker, with two of its per-job round trips folded away.

    - Starting a job: arq's optimistic transaction becomes one script (:data:`_TAKE`).
    - A handler job this worker handed back (it does not run that handler) is left to the
      other workers for a moment when it comes due (``leave``).
    - Finishing it: a delivery's settle script already removed the job as arq would
      (:meth:`worker.deliver.scripts.DeliveryScripts.settle` with ``finish``), and says so
      in ``finished``; arq's own finishing transaction is then skipped.

    Everything else (polling, concurrency, retries, the job's run) is arq's own.
    """

    def __init__(
        self, *args: Any, finished: set[str], leave: Callable[[str], bool] = lambda _: False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._finished = finished
        self._leave = leave
        self._take = self.pool.register_script(_TAKE)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            job_id = job_id_b.decode()
            if self._leave(job_id):  # handed back by this worker lately: the others' turn
                self.job_counter -= 1
                self.sem.release()
                continue
            score = await self._take(
                keys=[in_progress_key_prefix + job_id, self.queue_name],
                args=[job_id, int(self.in_progress_timeout_s * 1000)],
            )
            if score is None:  # running elsewhere, done, or deferred since it was listed
                self.job_counter -= 1
                self.sem.release()
                continue
            task = asyncio.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        if job_id in self._finished:
            # Finished by its settle already; arq's transaction would only re-add a removed job
            # (a cancel after the settle asks arq to re-queue it).
            self._finished.discard(job_id)
            return
        await super().finish_job(
            job_id, finish, result_data, result_timeout_s, keep_result_forever, incr_score, keep_in_progress
        )


def build_worker(
    settings: Settings, redis_pool: ArqRedis, delivery: Delivery, *, burst: bool = False
) -> Worker:
    """An arq worker on this namespace's queue, delivering through ``delivery``."""
    worker = FlexWorker(
        finished=delivery.finished_jobs,
        leave=delivery.leaves_to_others,
        functions=[
            # No arq results: the delivery records already make a copy of a job a no-op, and a
            # result would pickle the whole event once more.
            func(handle_event, name=EVENT_JOB_FUNCTION, timeout=ARQ_TIMEOUT_S, keep_result=0),
            func(run_handler, name=HANDLER_JOB_FUNCTION, timeout=ARQ_TIMEOUT_S, keep_result=0),
        ],
        queue_name=settings.queue_name,
        redis_pool=redis_pool,
        burst=burst,
        handle_signals=False,
        max_jobs=settings.worker_max_jobs,
        job_timeout=ARQ_TIMEOUT_S,
        keep_result=0,
        max_tries=ARQ_MAX_TRIES,
        poll_delay=0.05,
        ctx={CTX_DELIVERY: delivery},
        log_results=False,
    )
    # arq sizes this from the longest timeout; our heartbeat renews it instead (keep_alive).
    worker.in_progress_timeout_s = IN_PROGRESS_S
    return worker


async def keep_alive(worker: Worker, delivery: Delivery) -> None:
    """Renew the in-progress keys of the worker's running jobs, and its roster entries, forever."""
    announced_s = -float("inf")
    while True:
        try:
            if time.monotonic() - announced_s >= HEARTBEAT_S:
                await delivery.roster.announce()
                announced_s = time.monotonic()
            running = [job_id for job_id, task in list(worker.tasks.items()) if not task.done()]
            if running:
                async with worker.pool.pipeline(transaction=False) as pipe:
                    for job_id in running:
                        pipe.pexpire(in_progress_key_prefix + job_id, int(IN_PROGRESS_S * 1000))
                    await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.debug("heartbeat missed: Redis failed", error=type(exc).__name__)
        await asyncio.sleep(RENEW_S)
