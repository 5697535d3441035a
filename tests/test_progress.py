"""What a ``poll --once`` run shows: the bar on a terminal, the summary line at the end."""

from __future__ import annotations

import io

from rich.console import Console

from worker.ops.progress import progress_bar, summary_line
from worker.poll.sources import CycleProgress, CycleReport


def test_the_bar_counts_pages_events_and_what_is_left() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with progress_bar(console) as watch:
        watch(CycleProgress(pages=12, events=480, left=3_400, part="createdAt 2026-01-01 .. now"))
    shown = out.getvalue()
    assert "12 pages" in shown
    assert "480 new events" in shown
    assert "≤ 3400 transactions left" in shown
    assert "createdAt 2026-01-01 .. now" in shown


def test_the_summary_says_whether_the_cycle_finished_and_what_is_left() -> None:
    done = summary_line("transactions", CycleReport(cursor=1_780_272_000_000, events=60_000, pages=161))
    assert done == (
        "poll: cycle complete: 161 pages, 60000 new events, transactions cursor 2026-06-01T00:00:00+00:00"
    )
    stopped = summary_line("events", CycleReport(cursor=42, events=7, pages=3, complete=False, left=900))
    assert stopped.startswith("poll: stopped at a checkpoint: 3 pages, 7 new events, events cursor 42")
    assert stopped.endswith("about 900 transactions left; the next run resumes there")
