"""How a ``poll --once`` run shows its progress: a bar on a terminal, one line at the end.

On a TTY a progress bar counts pages and new events, estimates the transactions left
(from the answers' ``totalItems``) and the time to go. Off a TTY the poller itself logs
one line per finished part of the walk (a ``createdAt`` window), so a CronJob's log
stays short. Either way the run ends with one summary line.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

from worker.events import SourceName, from_ms
from worker.poll.poller import ProgressWatcher
from worker.poll.sources import CycleProgress, CycleReport

__all__ = ["progress_bar", "summary_line"]

#: Transactions a page holds, to turn "transactions left" into pages left.
PER_PAGE = 100


@contextlib.contextmanager
def progress_bar(console: Console) -> Iterator[ProgressWatcher]:
    """A watcher that draws the cycle's progress on ``console`` while the block runs."""
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f} pages · {task.fields[events]} new events · {task.fields[left]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = bar.add_task("polling", total=None, events=0, left="")

    def watch(progress: CycleProgress) -> None:
        total = None
        left = ""
        if progress.left is not None:
            left = f"≤ {progress.left} transactions left"
            total = progress.pages + math.ceil(progress.left / PER_PAGE)
        bar.update(
            task,
            completed=progress.pages,
            total=total,
            events=progress.events,
            left=left,
            description=progress.part or "polling",
        )

    with bar:
        yield watch


def summary_line(source: SourceName, report: CycleReport) -> str:
    """The one line a run ends with."""
    if source == "transactions":
        where = "none" if report.cursor is None else from_ms(report.cursor).isoformat()
    else:
        where = "none" if report.cursor is None else str(report.cursor)
    done = f"{report.pages} pages, {report.events} new events, {source} cursor {where}"
    if report.complete:
        return f"poll: cycle complete: {done}"
    left = "" if report.left is None else f"; about {report.left} transactions left"
    return f"poll: stopped at a checkpoint: {done}{left}; the next run resumes there"
