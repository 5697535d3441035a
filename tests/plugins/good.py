"""A well-formed plugin in both styles, with its own settings."""

from __future__ import annotations

from pydantic_settings import BaseSettings

from worker.plugin import Handler, HandlerContext, RetryPolicy, Subscription, handler


class CrmSettings(BaseSettings):
    api_key: str
    batch_size: int = 10


@handler(
    "crm", transitions=["transition/confirm-payment"], settings=CrmSettings, retry=RetryPolicy(max_attempts=7)
)
async def crm(ctx: HandlerContext) -> None:
    ctx.log.info("crm")


class Audit(Handler):
    name = "audit"
    subscription = Subscription(processes=("default-purchase",))

    async def handle(self, ctx: HandlerContext) -> None:
        ctx.log.info("audit")
