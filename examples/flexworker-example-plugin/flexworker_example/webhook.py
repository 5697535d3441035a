"""``example-webhook``: post each confirmed payment to a webhook, once.

The receiver is expected to accept ``POST {url}`` with a JSON body and an
``Idempotency-Key`` header, and to answer ``GET {url}?idempotency_key=K`` with
``{"received": true|false}`` so an uncertain attempt can be checked.
"""

from __future__ import annotations

from typing import Any

from pydantic_settings import BaseSettings

from worker.plugin import HandlerContext, PermanentError, RetryPolicy, handler

__all__ = ["WebhookSettings", "webhook"]


class WebhookSettings(BaseSettings):
    """``FLEXWORKER_HANDLER_EXAMPLE_WEBHOOK_URL``: where to post."""

    url: str


@handler(
    "example-webhook",
    transitions=["transition/confirm-payment"],
    settings=WebhookSettings,
    retry=RetryPolicy(max_attempts=5, base_s=1.0, cap_s=60.0, timeout_s=10.0),
)
async def webhook(ctx: HandlerContext) -> None:
    key = ctx.idempotency_key("post")
    await ctx.step("post", lambda: _post(ctx, key), if_uncertain=lambda: _received(ctx, key))
    ctx.log.info("webhook posted")


def _url(ctx: HandlerContext) -> str:
    config: WebhookSettings = ctx.handler_settings
    return config.url


async def _post(ctx: HandlerContext, key: str) -> dict[str, Any]:
    event = ctx.event
    body = {
        "event": event.key,
        "transaction": str(event.transaction_id),
        "transition": event.transition,
        "at": event.at.isoformat(),
    }
    async with ctx.http.post(_url(ctx), json=body, headers={"Idempotency-Key": key}) as response:
        if 400 <= response.status < 500 and response.status != 429:
            # The receiver refuses this event for good: no retry, a person looks at the DLQ.
            raise PermanentError(f"webhook refused the event with HTTP {response.status}")
        response.raise_for_status()  # 429 and 5xx: retried with backoff
        return {"status": response.status}


async def _received(ctx: HandlerContext, key: str) -> dict[str, Any] | None:
    async with ctx.http.get(_url(ctx), params={"idempotency_key": key}) as response:
        response.raise_for_status()
        answer = await response.json()
    return {"status": 200} if answer.get("received") else None
