"""Helpers for the delivery state machine: a manual clock, a dying worker, and arq's job protocol.

:class:`ArqEmulator` runs queued jobs the way arq 0.28 does (``Worker.run_job`` /
``finish_job``, with :class:`worker.deliver.runner.FlexWorker`'s ``finished`` shortcut),
but on a test-owned clock and with no polling, so a test decides exactly which due
jobs run together and when time moves:

- take: the job key is read and arq's try counter (``arq:retry:<id>``) incremented in
  one transaction, as arq does; a queued job without a job key is what arq fails as
  "expired" (recorded in :attr:`ArqEmulator.expired`, then finished as arq would).
- run: ``handle_event`` / ``run_handler`` with arq's ``ctx``; several jobs at once are
  separate tasks (think: one replica each).
- finish: a job its settle finished already (``Delivery.finished_jobs``) is left alone;
  otherwise a normal return removes it, ``Retry`` without a delay leaves its score,
  ``Retry(defer)`` moves it by ``defer + (now - score)`` as arq does, a cancellation
  leaves it queued.
- :class:`Crash` (a ``BaseException``) escaping a job is a dead worker: nothing is
  finished, the job stays queued and its claims stay until their lease ends.

Handlers may *hang* (:meth:`ArqEmulator.hang`). Once every task of the batch is done
or waits on a hang, a hang in a live job is a stopping worker: the job is cancelled
(and a step that hung in flight is let go, so it finishes within its grace); a hang
left behind by a job that crashed is a step of the dead process: it ends with
:class:`Crash` too, without touching Redis.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import deserialize_job_raw
from arq.worker import Retry

from worker.deliver.delivery import Delivery
from worker.deliver.runner import CTX_DELIVERY, handle_event, run_handler
from worker.queue.ordering import EVENT_JOB_FUNCTION, HANDLER_JOB_FUNCTION

__all__ = ["CURRENT_JOB", "ArqEmulator", "Crash", "Hang", "JobRun", "ManualClock"]

#: The arq job a piece of code runs for (set in each job's task; attempts and steps inherit it).
CURRENT_JOB: contextvars.ContextVar[str] = contextvars.ContextVar("current_job", default="")

JobFunction = Callable[..., Coroutine[Any, Any, Any]]
FUNCTIONS: dict[str, JobFunction] = {EVENT_JOB_FUNCTION: handle_event, HANDLER_JOB_FUNCTION: run_handler}
#: arq keeps its try counter this long.
RETRY_KEY_S = 88400
#: Real seconds a batch may take before the test gives up on it (something waits on nothing).
STUCK_S = 30.0
#: Turns of the event loop a batch lets pass before it takes its jobs for stuck on their hangs.
YIELDS = 5


class Crash(BaseException):
    """The worker dies here: a ``BaseException``, so no ``except Exception`` of flexworker's sees it."""


class ManualClock:
    """Unix time in seconds that moves only when told (never backwards).

    Kept in whole milliseconds; it reads half a millisecond past them, so that
    ``int(clock() * 1000)``, which flexworker uses for records and queue scores, is
    exactly :attr:`ms`.
    """

    def __init__(self) -> None:
        self.ms = int(time.time() * 1000)

    def __call__(self) -> float:
        return (self.ms + 0.5) / 1000

    def advance(self, seconds: float) -> None:
        self.ms += max(0, round(seconds * 1000))

    def advance_to(self, ms: int) -> None:
        self.ms = max(self.ms, ms)

    def catch_up(self) -> None:
        """Not behind the wall clock (what the poller's enqueue and a replay score jobs by)."""
        self.ms = max(self.ms, int(time.time() * 1000) + 1)


@dataclass(eq=False)
class Hang:
    """A handler (or its step) waiting for the test to decide how its run ends."""

    job_id: str
    pair: tuple[str, str]
    task: asyncio.Task[Any]
    #: the handler's task waiting on a step that hangs (None when the handler itself hangs).
    holder: asyncio.Task[Any] | None
    future: asyncio.Future[None]
    resolved: bool = False


@dataclass
class JobRun:
    """One run of one job and how it ended."""

    job_id: str
    function: str
    job_try: int
    score: int
    task: asyncio.Task[Any]
    #: return, retry, cancelled, crash or error.
    outcome: str = ""
    error: BaseException | None = None
    result: Any = None


@dataclass
class ArqEmulator:
    """arq's job protocol on one queue, run batch by batch on a manual clock."""

    redis: ArqRedis
    delivery: Delivery
    clock: ManualClock
    queue_name: str
    hangs: list[Hang] = field(default_factory=list)
    #: job ids arq would have failed as "expired" (queued, but no job key).
    expired: list[str] = field(default_factory=list)
    _notify: asyncio.Future[None] | None = None

    async def due(self) -> list[str]:
        """The queued jobs due now, by id (a stable order: scores may come from the wall clock)."""
        ids = await self.redis.zrangebyscore(self.queue_name, "-inf", self.clock.ms)
        return sorted(i.decode() for i in ids)

    async def scores(self) -> dict[str, int]:
        pairs = await self.redis.zrange(self.queue_name, 0, -1, withscores=True)
        return {member.decode(): int(score) for member, score in pairs}

    # -- hangs ----------------------------------------------------------------------------

    async def hang(self, pair: tuple[str, str], holder: asyncio.Task[Any] | None) -> None:
        """Wait until the batch resolves this hang: cancelled, let go (in a step), or Crash."""
        task = asyncio.current_task()
        assert task is not None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.hangs.append(Hang(CURRENT_JOB.get(), pair, task, holder, future))
        if self._notify is not None and not self._notify.done():
            self._notify.set_result(None)
        await future

    # -- a batch --------------------------------------------------------------------------

    async def run(self, job_ids: Sequence[str]) -> list[JobRun]:
        """Take each of ``job_ids`` that is still due, run them together, finish them as arq would."""
        runs: list[JobRun] = []
        self.hangs.clear()  # the last batch ended every one
        for job_id in job_ids:
            score = await self.redis.zscore(self.queue_name, job_id)
            if score is None or score > self.clock.ms:
                continue  # taken by an earlier job of the batch's doing (settled, re-scored)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(job_key_prefix + job_id)
                pipe.incr(retry_key_prefix + job_id)
                pipe.expire(retry_key_prefix + job_id, RETRY_KEY_S)
                raw, job_try, _ = await pipe.execute()
            if raw is None:
                self.expired.append(job_id)
                await self._finish_failed(job_id)
                continue
            function, args, kwargs, _, _ = deserialize_job_raw(raw, deserializer=self.redis.job_deserializer)
            ctx = {
                "job_id": job_id,
                "job_try": int(job_try),
                "redis": self.redis,
                CTX_DELIVERY: self.delivery,
            }
            task = asyncio.create_task(self._job(job_id, FUNCTIONS[function], ctx, args, kwargs))
            runs.append(JobRun(job_id, function, int(job_try), int(score), task))
        await self._settle_down(runs)
        for run in runs:
            self._outcome(run)
            await self._finish(run)
        return runs

    @staticmethod
    async def _job(
        job_id: str, function: JobFunction, ctx: dict[str, Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> Any:
        CURRENT_JOB.set(job_id)
        return await function(ctx, *args, **kwargs)

    def _active(self, runs: Sequence[JobRun]) -> list[asyncio.Task[Any]]:
        """Tasks that can still make progress by themselves."""
        open_hangs = [h for h in self.hangs if not h.resolved]
        waiting = {h.task for h in open_hangs} | {h.holder for h in open_hangs if h.holder is not None}
        hung_jobs = {h.job_id for h in open_hangs}
        job_tasks = {run.task: run.job_id for run in runs}
        me = asyncio.current_task()
        active = []
        for task in asyncio.all_tasks():
            if task is me or task.done() or task in waiting:
                continue
            if task in job_tasks and job_tasks[task] in hung_jobs:
                continue  # waits on its attempts; those that do not hang are counted themselves
            active.append(task)
        return active

    async def _settle_down(self, runs: Sequence[JobRun]) -> None:
        """Run until every task is done, resolving hangs once nothing else can move."""
        tasks = {run.job_id: run.task for run in runs}
        deadline = time.monotonic() + STUCK_S
        while True:
            active = self._active(runs)
            if active:
                self._notify = asyncio.get_running_loop().create_future()
                await asyncio.wait([*active, self._notify], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                assert time.monotonic() < deadline, self._stuck(active)
                continue
            for h in self.hangs:
                if h.resolved and not h.future.done() and tasks[h.job_id].done():
                    # Its job ended without reaching it (a sibling's crash won the race).
                    h.future.set_exception(Crash())
            open_hangs = [h for h in self.hangs if not h.resolved]
            if not open_hangs:
                if all(t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task()):
                    return
                await asyncio.sleep(0)
                continue
            # A job whose attempts just ended is only woken on a later turn of the loop: let
            # those turns pass (no I/O is pending), so that a job about to end is not taken
            # for one that waits on its hung attempt.
            done = sum(t.done() for t in tasks.values())
            for _ in range(YIELDS):
                await asyncio.sleep(0)
            if self._active(runs) or sum(t.done() for t in tasks.values()) != done:
                continue
            cancelled: set[asyncio.Task[Any]] = set()
            for h in open_hangs:
                h.resolved = True
                job = tasks[h.job_id]
                if job.done():
                    # Left behind by a job that crashed: the dead process's code just stops.
                    h.future.set_exception(Crash())
                else:
                    cancelled.add(job)
            for job in cancelled:
                job.cancel()  # a stopping worker cancels its running jobs
            for h in open_hangs:
                if h.holder is not None and tasks[h.job_id] in cancelled and not h.future.done():
                    h.future.set_result(None)  # the step in flight finishes within its grace

    def _stuck(self, active: Sequence[asyncio.Task[Any]]) -> str:
        lines = ["batch stuck; open hangs:"]
        lines += [
            f"  {h.job_id} {h.pair} task={h.task.get_name()} holder={h.holder and h.holder.get_name()}"
            for h in self.hangs
            if not h.resolved
        ]
        for task in active:
            lines.append(f"  still running: {task!r}")
            lines += [f"    {f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack()]
        return "\n".join(lines)

    @staticmethod
    def _outcome(run: JobRun) -> None:
        task = run.task
        if task.cancelled():
            run.outcome = "cancelled"
            return
        exc = task.exception()
        run.error = exc
        if exc is None:
            run.outcome, run.result = "return", task.result()
        elif isinstance(exc, Retry):
            run.outcome = "retry"
        elif isinstance(exc, Crash):
            run.outcome = "crash"
        else:
            run.outcome = "error"

    async def _finish(self, run: JobRun) -> None:
        job_id = run.job_id
        finished = self.delivery.finished_jobs
        if run.outcome == "crash":
            finished.discard(job_id)  # the dead worker's memory; arq never finishes the job
            return
        if job_id in finished:
            finished.discard(job_id)  # FlexWorker.finish_job: the settle finished it already
            return
        async with self.redis.pipeline(transaction=True) as tr:
            keys = [in_progress_key_prefix + job_id]
            if run.outcome in ("return", "error"):
                keys += [retry_key_prefix + job_id, job_key_prefix + job_id]
                tr.zrem(self.queue_name, job_id)
            elif run.outcome == "retry":
                assert isinstance(run.error, Retry)
                if run.error.defer_score:
                    tr.zincrby(self.queue_name, run.error.defer_score + (self.clock.ms - run.score), job_id)
            tr.delete(*keys)
            await tr.execute()

    async def _finish_failed(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as tr:
            tr.delete(retry_key_prefix + job_id, in_progress_key_prefix + job_id, job_key_prefix + job_id)
            tr.zrem(self.queue_name, job_id)
            await tr.execute()
