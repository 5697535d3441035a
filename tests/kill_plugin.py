"""A handler and a worker entry point for ``tests/test_kill_worker.py``.

The test runs ``python -m tests.kill_plugin`` as a real worker process (so it can
SIGKILL it). Everything comes from the environment:

- ``KILL_PLUGIN_URL``: the test's recording HTTP server.
- ``KILL_PLUGIN_REDIS_URL``, ``KILL_PLUGIN_NAMESPACE``: where the worker's queue is.
- ``KILL_PLUGIN_HANG=1``: after the side effect, hang forever (the test kills the process).
- ``KILL_PLUGIN_NO_CHECK=1``: run the step without ``if_uncertain``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from worker.plugin import HandlerContext, RetryPolicy, handler
from worker.service import run_worker
from worker.settings import Settings

HANDLER_NAME = "kill-test"
STEP = "effect"
#: Long enough that the attempt is never cut short by its own timeout before the test kills it.
TIMEOUT_S = 8.0


def worker_settings(redis_url: str, namespace: str) -> Settings:
    """The worker's settings (the test builds the same ones to enqueue and inspect)."""
    return Settings(
        _env_file=None,
        _secrets_dir=None,
        sharetribe_client_id="unused",
        sharetribe_client_secret="unused",
        sharetribe_api_base_url="http://127.0.0.1:9",  # never called: the handler does not use ctx.client
        redis_url=redis_url,
        namespace=namespace,
        rate_limit="off",
    )


@handler(
    HANDLER_NAME,
    transitions=["transition/confirm-payment"],
    retry=RetryPolicy(max_attempts=3, base_s=0.05, cap_s=0.1, timeout_s=TIMEOUT_S),
)
async def kill_test(ctx: HandlerContext) -> None:
    base = os.environ["KILL_PLUGIN_URL"]
    key = ctx.idempotency_key(STEP)

    async def post_effect() -> dict[str, Any]:
        async with ctx.http.post(f"{base}/effect", headers={"Idempotency-Key": key}) as response:
            response.raise_for_status()
            result: dict[str, Any] = await response.json()
        if os.environ.get("KILL_PLUGIN_HANG") == "1":
            await asyncio.Event().wait()  # never set: the side effect happened, its result is not recorded
        return result

    async def check_effect() -> dict[str, Any] | None:
        async with ctx.http.get(f"{base}/effect", params={"key": key}) as response:
            response.raise_for_status()
            answer: dict[str, Any] = await response.json()
        return answer["result"] if answer["done"] else None

    async with ctx.http.post(f"{base}/entered", json={"attempt": ctx.attempt}) as response:
        response.raise_for_status()
    no_check = os.environ.get("KILL_PLUGIN_NO_CHECK") == "1"
    await ctx.step(STEP, post_effect, if_uncertain=None if no_check else check_effect)


async def _main() -> None:
    settings = worker_settings(os.environ["KILL_PLUGIN_REDIS_URL"], os.environ["KILL_PLUGIN_NAMESPACE"])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await run_worker(settings, stop, handlers=[kill_test])


if __name__ == "__main__":
    asyncio.run(_main())
