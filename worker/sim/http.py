"""What every route module of the simulator shares: the simulator on the app, request parsing, problems.

The Integration API routes (:mod:`worker.sim.app`) and the ``/_sim/`` routes
(:mod:`worker.sim.admin`) both find the :class:`~worker.sim.Simulator` through
:data:`SIM_KEY` and refuse requests by raising :class:`ApiProblem`, which the
application's error middleware writes into the API's error envelope.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from worker.api.wire import WireFormatError, decode

if TYPE_CHECKING:
    from worker.sim import Simulator

__all__ = ["SIM_KEY", "ApiProblem", "json_body", "query_params", "simulator"]

SIM_KEY: web.AppKey[Simulator] = web.AppKey("simulator")


class ApiProblem(Exception):
    """An error answer a handler wants sent, in the API's envelope."""

    def __init__(
        self,
        status: int,
        code: str,
        details: str | None = None,
        *,
        source_path: list[str] | None = None,
        source_type: str = "body",
    ) -> None:
        super().__init__(details or code)
        self.status = status
        self.code = code
        self.details = details
        self.source_path = source_path
        self.source_type = source_type


def simulator(request: web.Request) -> Simulator:
    """The simulator the request's application serves."""
    return request.app[SIM_KEY]


def query_params(request: web.Request) -> dict[str, str]:
    """The query string as a plain mapping; the first value wins when a parameter repeats."""
    out: dict[str, str] = {}
    for key, value in request.query.items():
        out.setdefault(key, value)
    return out


async def json_body(request: web.Request) -> dict[str, Any]:
    """A JSON object body (an empty body is an empty object)."""
    raw = await request.read()
    try:
        body = decode(raw) if raw else {}
    except WireFormatError as exc:
        raise ApiProblem(400, "validation-invalid-value", f"body does not parse: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiProblem(400, "validation-invalid-value", "body must be a JSON object")
    return body
