"""A command whose answer is lost is never sent again: its step is left uncertain.

End to end through ``worker.testing``'s ``deliver``: a handler runs
``transactions/transition`` in ``ctx.step`` against a local server that applies the
transition and then answers 504, as a gateway does when the upstream was slow.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiohttp import web

from tests.fakes import FakeApi, error_response, json_response, transaction_doc
from worker.errors import CommandOutcomeUnknownError
from worker.plugin import HandlerContext, RetryPolicy, handler
from worker.testing import Deliver, make_event

QUICK = RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.02, timeout_s=10)
ACCEPT = "transition/operator-accept"


class Marketplace:
    """One transaction that takes ``operator-accept`` once; the answer to it is a 504."""

    def __init__(self, api: FakeApi, tx_id: uuid.UUID) -> None:
        self.tx_id = tx_id
        self.applied: list[str] = []
        self.shown = 0
        api.default("transactions/transition", self.transition)
        api.default("transactions/show", self.show)

    async def transition(self, request: web.Request) -> web.StreamResponse:
        if self.applied:
            return await error_response(409, "transaction-invalid-transition", "Invalid transition")(request)
        self.applied.append(ACCEPT)
        # Applied upstream; the gateway gave up waiting for the answer.
        return web.Response(status=504, text="<html>504 Gateway Time-out</html>", content_type="text/html")

    async def show(self, request: web.Request) -> web.StreamResponse:
        self.shown += 1
        doc = transaction_doc(self.tx_id)
        if self.applied:
            doc["attributes"]["lastTransition"] = ACCEPT
            doc["attributes"]["transitions"].append(
                {"transition": ACCEPT, "createdAt": "2024-05-01T10:06:00.000Z", "by": "operator"}
            )
        return await json_response({"data": doc})(request)


async def accept(ctx: HandlerContext) -> str:
    ref = await ctx.client.transactions_transition(ctx.event.transaction_id, ACCEPT, expand=False)
    return str(ref.id)


async def accepted_already(ctx: HandlerContext) -> str | None:
    tx = await ctx.client.transactions_show(ctx.event.transaction_id)
    return str(tx.id) if any(t.transition == ACCEPT for t in tx.attributes.transitions) else None


@handler("accept-checked", transitions=["transition/confirm-payment"], retry=QUICK)
async def accept_checked(ctx: HandlerContext) -> None:
    await ctx.step("operator-accept", lambda: accept(ctx), if_uncertain=lambda: accepted_already(ctx))


@handler("accept-blind", transitions=["transition/confirm-payment"], retry=QUICK)
async def accept_blind(ctx: HandlerContext) -> None:
    await ctx.step("operator-accept", lambda: accept(ctx))


def against(deliver: Deliver, api: FakeApi) -> Deliver:
    return deliver.with_settings(sharetribe_api_base_url=api.url, rate_limit="off")


async def test_a_504_after_the_command_applied_is_checked_not_repeated(
    deliver: Deliver, api: FakeApi
) -> None:
    event = make_event("transition/confirm-payment")
    market = Marketplace(api, event.transaction_id)
    outcome = await against(deliver, api)(event, accept_checked)
    assert outcome.status == "done"
    assert market.applied == [ACCEPT]
    transitions = [r for r in api.api_requests if r.path.endswith("/transactions/transition")]
    assert len(transitions) == 1  # the command went out once, the 504 was not retried
    assert market.shown == 1  # the second attempt asked if_uncertain, which found it applied
    assert outcome.attempts == 2
    assert [e.split(":")[0] for e in outcome.errors] == ["CommandOutcomeUnknownError"]
    assert "504" in outcome.errors[0]


async def test_without_a_check_the_uncertain_step_is_dead_lettered(deliver: Deliver, api: FakeApi) -> None:
    event = make_event("transition/confirm-payment")
    market = Marketplace(api, event.transaction_id)
    outcome = await against(deliver, api)(event, accept_blind)
    assert outcome.status == "dead_lettered"
    assert market.applied == [ACCEPT]
    assert len([r for r in api.api_requests if r.path.endswith("/transactions/transition")]) == 1
    assert [e.split(":")[0] for e in outcome.errors] == ["CommandOutcomeUnknownError", "StepUncertainError"]
    assert outcome.dead_letter is not None


async def test_a_step_raised_from_an_unknown_outcome_stays_uncertain(deliver: Deliver, api: FakeApi) -> None:
    event = make_event("transition/confirm-payment")
    market = Marketplace(api, event.transaction_id)
    calls: list[int] = []

    async def wrapped(ctx: HandlerContext) -> Any:
        calls.append(ctx.attempt)
        try:
            return await accept(ctx)
        except Exception as exc:
            raise RuntimeError("accepting failed") from exc

    @handler("accept-wrapped", transitions=["transition/confirm-payment"], retry=QUICK)
    async def accept_wrapped(ctx: HandlerContext) -> None:
        await ctx.step("operator-accept", lambda: wrapped(ctx))

    outcome = await against(deliver, api)(event, accept_wrapped)
    assert outcome.status == "dead_lettered"
    assert calls == [1]
    assert market.applied == [ACCEPT]
    assert [e.split(":")[0] for e in outcome.errors] == ["RuntimeError", "StepUncertainError"]


def _unknown() -> CommandOutcomeUnknownError:
    return CommandOutcomeUnknownError("Integration API answered 504; the command may have taken effect")


def _raised_while_handling() -> BaseException:
    try:
        try:
            raise _unknown()
        except CommandOutcomeUnknownError:
            raise RuntimeError("accepting failed")  # noqa: B904 - as a handler might
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    "make",
    [
        _raised_while_handling,
        lambda: ExceptionGroup("task group", [ValueError("other task"), _unknown()]),
    ],
    ids=["re-raised without from", "in an exception group"],
)
def test_an_unknown_outcome_is_seen_however_it_is_wrapped(make: Any) -> None:
    from worker.deliver.idempotency import _outcome_unknown

    assert _outcome_unknown(make())
    assert not _outcome_unknown(RuntimeError("surely failed"))
