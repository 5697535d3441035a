"""The simulator's answers carry a Date header from its own clock, ahead of or behind the host's."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp
from multidict import CIMultiDictProxy

from tests.simkit import SimHttp
from worker.sim import FaultConfig, ManualClock, SimConfig, Simulator, serve

AHEAD = datetime(2031, 5, 6, 7, 8, 9, 500000, tzinfo=UTC)
BEHIND = datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)


def _date(headers: CIMultiDictProxy[str]) -> str:
    return headers["Date"]


async def test_every_answer_is_dated_by_the_simulator_clock() -> None:
    clock = ManualClock(AHEAD)
    sim = Simulator(SimConfig(seed=3, rate_limits=None, clock=clock))
    async with serve(sim) as url, aiohttp.ClientSession() as session:
        http = SimHttp(session, url)
        granted = await http.grant()
        assert granted.status == 200
        assert _date(granted.headers) == "Tue, 06 May 2031 07:08:09 GMT"
        await http.login()
        shown = await http.get("marketplace/show")
        assert shown.status == 200 and _date(shown.headers) == "Tue, 06 May 2031 07:08:09 GMT"
        unauthorized = await http.get("marketplace/show", auth=False)
        assert unauthorized.status == 401 and _date(unauthorized.headers) == "Tue, 06 May 2031 07:08:09 GMT"
        unknown = await http.get("nothing/here")
        assert unknown.status == 404 and _date(unknown.headers) == "Tue, 06 May 2031 07:08:09 GMT"
        admin = await http.admin("GET", "stats")
        assert _date(admin.headers) == "Tue, 06 May 2031 07:08:09 GMT"

        clock.advance(3600.75)
        later = await http.get("marketplace/show")
        assert parsedate_to_datetime(_date(later.headers)) == datetime(2031, 5, 6, 8, 8, 10, tzinfo=UTC)

        clock.set(BEHIND)
        behind = await http.get("marketplace/show")
        assert _date(behind.headers) == "Sat, 03 Feb 2001 04:05:06 GMT"
        host_now = datetime.now(UTC)
        assert parsedate_to_datetime(_date(behind.headers)) < host_now

        sim.faults = FaultConfig(error_rate=1.0)
        failed = await http.get("marketplace/show")
        assert failed.status >= 500 and _date(failed.headers) == "Sat, 03 Feb 2001 04:05:06 GMT"
