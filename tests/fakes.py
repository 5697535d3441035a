"""Test doubles for the Integration API client: a scripted local server and a fake clock.

:class:`FakeApi` is a real aiohttp server on 127.0.0.1 (free port) serving the token
endpoint and ``/v1/integration_api/...``. Each path answers from a queue of scripted
responders, falling back to a default responder, and every request is recorded
(method, path, query, headers, form or body, fake time) so tests can assert exactly
what the client sent.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from worker.api import wire

__all__ = [
    "FakeApi",
    "FakeClock",
    "Recorded",
    "Responder",
    "drop_connection",
    "error_response",
    "event_doc",
    "json_response",
    "page_doc",
    "raw_response",
    "token_error",
    "token_ok",
    "transaction_doc",
    "truncated_response",
]

TOKEN_PATH = "/v1/auth/token"
API_PREFIX = "/v1/integration_api/"

Responder = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeClock:
    """Monotonic time that only moves when told to; ``sleep`` records and advances."""

    def __init__(self, start_s: float = 1_000.0) -> None:
        self.now_s = start_s
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now_s

    def advance(self, delta_s: float) -> None:
        self.now_s += delta_s

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        self.now_s += delay_s
        # Still yield, so code that sleeps in a loop lets other tasks run.
        await asyncio.sleep(0)


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    form: dict[str, str]
    body: bytes
    at_s: float | None

    @property
    def grant(self) -> str | None:
        return self.form.get("grant_type")

    @property
    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("bearer ") if auth.startswith("bearer ") else None


# -- responders -----------------------------------------------------------------------


def json_response(
    doc: Any, status: int = 200, headers: Mapping[str, str] | None = None, mime: str = wire.JSON_MIME
) -> Responder:
    async def respond(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=status, body=wire.encode(doc, mime), headers={"Content-Type": mime, **(headers or {})}
        )

    return respond


def raw_response(body: bytes, status: int = 200, content_type: str = "application/json") -> Responder:
    async def respond(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers={"Content-Type": content_type})

    return respond


def error_response(
    status: int,
    code: str,
    title: str,
    *,
    details: str | None = None,
    source_path: Iterable[str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Responder:
    error: dict[str, Any] = {"id": str(uuid.uuid4()), "status": status, "code": code, "title": title}
    if details is not None:
        error["details"] = details
    if source_path is not None:
        error["source"] = {"path": list(source_path), "type": "query"}
    return json_response({"errors": [error]}, status=status, headers=headers)


def drop_connection() -> Responder:
    """Close the socket without answering (the client sees a disconnect)."""

    async def respond(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    return respond


def truncated_response(doc: Any) -> Responder:
    """Promise a longer body than is sent, then hang up mid-body."""

    async def respond(request: web.Request) -> web.StreamResponse:
        body = wire.encode(doc)
        resp = web.StreamResponse(status=200, headers={"Content-Type": wire.JSON_MIME})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        assert request.transport is not None
        request.transport.close()
        return resp

    return respond


def token_ok(access: str, *, refresh: str | None = None, expires_in: float | None = 3600) -> Responder:
    doc: dict[str, Any] = {"access_token": access, "token_type": "bearer"}
    if refresh is not None:
        doc["refresh_token"] = refresh
    if expires_in is not None:
        doc["expires_in"] = expires_in
    return json_response(doc)


def token_error(status: int, error: str, description: str | None = None) -> Responder:
    doc = {"error": error}
    if description is not None:
        doc["error_description"] = description
    return json_response(doc, status=status)


# -- documents ------------------------------------------------------------------------


def transaction_doc(tx_id: uuid.UUID | str | None = None, **attributes: Any) -> dict[str, Any]:
    """A minimal valid transaction resource in JSON form."""
    attrs: dict[str, Any] = {
        "createdAt": "2024-05-01T10:00:00.000Z",
        "processName": "default-booking",
        "processVersion": 3,
        "state": "state/preauthorized",
        "lastTransition": "transition/confirm-payment",
        "lastTransitionedAt": "2024-05-01T10:05:00.000Z",
        "transitions": [
            {
                "transition": "transition/request-payment",
                "createdAt": "2024-05-01T10:00:00.000Z",
                "by": "customer",
            },
            {
                "transition": "transition/confirm-payment",
                "createdAt": "2024-05-01T10:05:00.000Z",
                "by": "customer",
            },
        ],
        "metadata": {},
    }
    attrs.update(attributes)
    return {"id": str(tx_id or uuid.uuid4()), "type": "transaction", "attributes": attrs}


def event_doc(sequence_id: int, resource_id: uuid.UUID | str | None = None) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "type": "event",
        "attributes": {
            "sequenceId": sequence_id,
            "createdAt": "2024-05-01T10:05:00.000Z",
            "eventType": "transaction/transitioned",
            "source": "source/transaction",
            "resourceId": str(resource_id or uuid.uuid4()),
            "resourceType": "transaction",
            "resource": None,
            "previousValues": {},
        },
    }


def page_doc(items: list[dict[str, Any]], *, page: int, per_page: int, total_items: int) -> dict[str, Any]:
    total_pages = -(-total_items // per_page)
    return {
        "data": items,
        "meta": {"totalItems": total_items, "totalPages": total_pages, "page": page, "perPage": per_page},
    }


# -- the server -----------------------------------------------------------------------


@dataclass
class FakeApi:
    """Scripted Integration API and token endpoint on a local port."""

    clock: Callable[[], float] | None = None
    requests: list[Recorded] = field(default_factory=list)
    scripts: defaultdict[str, deque[Responder]] = field(default_factory=lambda: defaultdict(deque))
    defaults: dict[str, Responder] = field(default_factory=dict)
    _server: TestServer | None = None
    _issued: int = 0

    async def start(self) -> FakeApi:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = TestServer(app, host="127.0.0.1", port=0)
        await self._server.start_server()
        return self

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None and self._server.port is not None
        return f"http://127.0.0.1:{self._server.port}"

    def script(self, path: str, *responders: Responder) -> None:
        """Answer the next requests to ``path`` (``"transactions/query"`` or ``TOKEN_PATH``) in order."""
        self.scripts[self._full(path)].extend(responders)

    def default(self, path: str, responder: Responder) -> None:
        """Answer ``path`` with ``responder`` once its script is used up."""
        self.defaults[self._full(path)] = responder

    @property
    def token_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == TOKEN_PATH]

    @property
    def api_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith(API_PREFIX)]

    @staticmethod
    def _full(path: str) -> str:
        return path if path.startswith("/") else API_PREFIX + path

    async def _issue_token(self, request: web.Request) -> web.StreamResponse:
        self._issued += 1
        return await token_ok(f"tok-{self._issued}", refresh=f"ref-{self._issued}")(request)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        form: dict[str, str] = {}
        if request.content_type == "application/x-www-form-urlencoded":
            form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(
            Recorded(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=dict(request.headers),
                form=form,
                body=body,
                at_s=self.clock() if self.clock else None,
            )
        )
        queue = self.scripts.get(request.path)
        if queue:
            return await queue.popleft()(request)
        if request.path in self.defaults:
            return await self.defaults[request.path](request)
        if request.path == TOKEN_PATH:
            return await self._issue_token(request)
        return web.Response(
            status=404,
            body=json.dumps({"errors": [{"status": 404, "code": "not-found", "title": "Not found"}]}),
            content_type="application/json",
        )
