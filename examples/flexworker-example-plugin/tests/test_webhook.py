"""The example handler through flexworker's real job path, against a local receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from flexworker_example.webhook import WebhookSettings, webhook
from worker.testing import Deliver, make_event


@dataclass
class Receiver:
    """A webhook receiver that answers with scripted statuses and records what it accepted."""

    statuses: list[int] = field(default_factory=list)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    url: str = ""

    async def post(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.accepted[request.headers["Idempotency-Key"]] = await request.json()
        return web.json_response({}, status=status)

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response({"received": request.query["idempotency_key"] in self.accepted})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/hook", recv.post)
    app.router.add_get("/hook", recv.get)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    recv.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield recv
    await runner.cleanup()


async def test_posts_a_confirmed_payment_once(deliver: Deliver, receiver: Receiver) -> None:
    event = make_event("transition/confirm-payment")
    settings = WebhookSettings(url=receiver.url)
    outcome = await deliver(event, webhook, handler_settings=settings)
    assert outcome.status == "done"
    assert outcome.attempts == 1
    (body,) = receiver.accepted.values()
    assert body["event"] == event.key
    assert body["transition"] == "transition/confirm-payment"
    # The same event again is a no-op: the handler finished it.
    again = await deliver(event, webhook, handler_settings=settings)
    assert again.status == "skipped"
    assert len(receiver.accepted) == 1


async def test_server_errors_are_retried(deliver: Deliver, receiver: Receiver) -> None:
    receiver.statuses = [503, 500]
    outcome = await deliver(make_event(), webhook, handler_settings=WebhookSettings(url=receiver.url))
    assert outcome.status == "done"
    assert outcome.attempts == 3
    assert [e.split(":")[0] for e in outcome.errors] == ["ClientResponseError", "ClientResponseError"]
    assert len(receiver.accepted) == 1


async def test_a_refusal_is_dead_lettered_without_retry(deliver: Deliver, receiver: Receiver) -> None:
    receiver.statuses = [422]
    outcome = await deliver(make_event(), webhook, handler_settings=WebhookSettings(url=receiver.url))
    assert outcome.status == "dead_lettered"
    assert outcome.attempts == 1
    assert "HTTP 422" in outcome.errors[0]
    assert receiver.accepted == {}


async def test_other_transitions_are_not_subscribed(deliver: Deliver, receiver: Receiver) -> None:
    outcome = await deliver(
        make_event("transition/accept"), webhook, handler_settings=WebhookSettings(url=receiver.url)
    )
    assert outcome.status == "not_subscribed"
    assert receiver.accepted == {}


def test_the_plugin_is_discovered_through_its_entry_point() -> None:
    from worker.registry import installed_handlers

    assert installed_handlers()["example-webhook"].value == "flexworker_example.webhook:webhook"
