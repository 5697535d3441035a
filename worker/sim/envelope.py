"""Answer bodies of the simulated API: format negotiation and the error envelope.

Every answer under ``/v1/`` is written in the format the request's ``Accept``
header asks for (Transit when it names ``application/transit+json``, JSON
otherwise), errors included. Errors always use the API's envelope::

    {"errors": [{"id": ..., "status": 400, "code": "validation-invalid-params",
                 "title": ..., "details": ..., "source": {"path": [...], "type": "query"}}]}
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from worker.api.wire import JSON_MIME, TRANSIT_MIME, encode

__all__ = ["TITLES", "answer", "error_response", "error_tree", "response_mime"]

#: One fixed title per error code, as the API promises.
TITLES: dict[str, str] = {
    "auth-invalid-access-token": "Access token is invalid or has expired",
    "auth-missing-access-token": "No access token was sent",
    "auth-invalid-client": "Client credentials were not accepted",
    "auth-invalid-refresh-token": "Refresh token is unknown or revoked",
    "forbidden": "Not allowed",
    "not-found": "Resource not found",
    "transaction-invalid-transition": "Transition is not possible",
    "validation-invalid-params": "Query parameters are invalid",
    "validation-invalid-value": "A value is invalid",
    "validation-missing-key": "A required key is missing",
    "validation-disallowed-key": "A key is not allowed here",
    "unsupported-media-type": "Body format not supported",
    "method-not-allowed": "Method not allowed",
    "too-many-requests": "Too many requests",
    "internal-server-error": "Internal server error",
    "bad-gateway": "Bad gateway",
    "service-unavailable": "Service unavailable",
}


def response_mime(request: web.Request) -> str:
    """Transit if the client accepts it, JSON otherwise."""
    return TRANSIT_MIME if TRANSIT_MIME in request.headers.get("Accept", "") else JSON_MIME


def answer(request: web.Request, tree: Any, status: int = 200) -> web.Response:
    """Encode ``tree`` in the negotiated format."""
    mime = response_mime(request)
    return web.Response(status=status, body=encode(tree, mime), content_type=mime)


def error_tree(
    status: int,
    code: str,
    *,
    details: str | None = None,
    source_path: Sequence[str] | None = None,
    source_type: str = "query",
) -> dict[str, Any]:
    """A one-error envelope."""
    error: dict[str, Any] = {
        "id": uuid.uuid4(),
        "status": status,
        "code": code,
        "title": TITLES.get(code, code),
    }
    if details is not None:
        error["details"] = details
    if source_path is not None:
        error["source"] = {"path": list(source_path), "type": source_type}
    return {"errors": [error]}


def error_response(
    request: web.Request,
    status: int,
    code: str,
    *,
    details: str | None = None,
    source_path: Sequence[str] | None = None,
    source_type: str = "query",
) -> web.Response:
    """An error envelope answer in the negotiated format."""
    tree = error_tree(status, code, details=details, source_path=source_path, source_type=source_type)
    return answer(request, tree, status)
