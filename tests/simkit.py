"""A thin raw-HTTP helper for the simulator's tests (no flexworker client involved)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from worker.api import wire

API = "/v1/integration_api"


@dataclass
class Answer:
    status: int
    raw: bytes
    content_type: str
    headers: Any

    @property
    def body(self) -> Any:
        mime = wire.TRANSIT_MIME if self.content_type == wire.TRANSIT_MIME else wire.JSON_MIME
        return wire.decode(self.raw, mime)

    @property
    def error_codes(self) -> list[str]:
        return [e["code"] for e in self.body["errors"]]

    @property
    def error_paths(self) -> list[list[str]]:
        return [e.get("source", {}).get("path") for e in self.body["errors"]]


class SimHttp:
    """Raw requests against a served simulator, with a token once :meth:`login` ran."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url
        self.token: str | None = None
        self.client_id = "sim-client-id"
        self.client_secret = "sim-client-secret"

    async def _answer(self, resp: aiohttp.ClientResponse) -> Answer:
        return Answer(resp.status, await resp.read(), resp.content_type, resp.headers)

    async def form(self, path: str, data: dict[str, str]) -> Answer:
        async with self.session.post(self.base_url + path, data=data) as resp:
            return await self._answer(resp)

    async def grant(self, secret: str | None = None) -> Answer:
        return await self.form(
            "/v1/auth/token",
            {
                "client_id": self.client_id,
                "client_secret": self.client_secret if secret is None else secret,
                "grant_type": "client_credentials",
                "scope": "integ",
            },
        )

    async def login(self) -> dict[str, Any]:
        answer = await self.grant()
        assert answer.status == 200, answer.raw
        tokens: dict[str, Any] = answer.body
        self.token = tokens["access_token"]
        return tokens

    def _headers(self, accept: str, token: str | None, auth: bool) -> dict[str, str]:
        headers = {"Accept": accept}
        tok = token if token is not None else self.token
        if auth and tok is not None:
            headers["Authorization"] = f"bearer {tok}"
        return headers

    async def get(
        self,
        path: str,
        params: dict[str, str] | None = None,
        *,
        accept: str = wire.JSON_MIME,
        token: str | None = None,
        auth: bool = True,
    ) -> Answer:
        url = self.base_url + (path if path.startswith("/") else f"{API}/{path}")
        async with self.session.get(url, params=params, headers=self._headers(accept, token, auth)) as resp:
            return await self._answer(resp)

    async def command(
        self,
        path: str,
        body: Any,
        *,
        params: dict[str, str] | None = None,
        content_type: str = wire.JSON_MIME,
        accept: str = wire.JSON_MIME,
    ) -> Answer:
        headers = {**self._headers(accept, None, True), "Content-Type": content_type}
        data = wire.encode(body, content_type)
        async with self.session.post(
            f"{self.base_url}{API}/{path}", data=data, params=params, headers=headers
        ) as resp:
            return await self._answer(resp)

    async def admin(self, method: str, path: str, body: Any = None) -> Answer:
        kwargs: dict[str, Any] = {} if body is None else {"data": wire.encode(body)}
        async with self.session.request(method, f"{self.base_url}/_sim/{path}", **kwargs) as resp:
            return await self._answer(resp)
