"""The dead-letter queue: storing, filtering, replaying, purging, Sentry, and the CLI commands."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from arq.connections import ArqRedis

from tests.delivery_kit import enqueue, events, make_settings, stats, until, worker
from tests.test_cli import cli_env, flexworker
from worker.deliver.dlq import DeadLetter, DeadLetters, DlqFilter, init_sentry, report
from worker.deliver.failures import ErrorRecord
from worker.deliver.idempotency import DeliveryRecords
from worker.errors import ConfigError, PermanentError
from worker.plugin import HandlerContext, RetryPolicy, handler
from worker.queue.keys import Keys
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[1]
T = datetime(2026, 5, 1, 12, tzinfo=UTC)


def letter(handler_name: str, number: int, index: int, at: datetime) -> DeadLetter:
    event = events(number, index + 1)[index]
    return DeadLetter.of(
        handler_name,
        event,
        job_id=f"{event.key}:{handler_name}",
        reason="exhausted",
        attempts=2,
        errors=[
            ErrorRecord(at=at - timedelta(seconds=5), attempt=1, type="OSError", message="refused"),
            ErrorRecord(
                at=at, attempt=2, type="OSError", message="refused again", where="crm.py:9 in handle"
            ),
        ],
        dead_lettered_at=at,
    )


async def store(redis: ArqRedis, dead_letters: DeadLetters, *letters: DeadLetter) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        for item in letters:
            dead_letters.add_in(pipe, item)
        await pipe.execute()


@pytest.fixture
def sample() -> list[DeadLetter]:
    return [
        letter("crm", 1, 2, T),  # confirm-payment
        letter("crm", 2, 0, T + timedelta(hours=1)),  # inquire
        letter("sms", 3, 2, T + timedelta(hours=2)),  # confirm-payment
    ]


async def test_list_filters_and_show(arq_redis: ArqRedis, redis_url: str, sample: list[DeadLetter]) -> None:
    dead_letters = DeadLetters(arq_redis, make_settings(redis_url))
    await store(arq_redis, dead_letters, *sample)
    assert await dead_letters.count() == 3
    assert [d.id for d in await dead_letters.list()] == [d.id for d in sample]  # oldest first
    assert [d.handler for d in await dead_letters.list(DlqFilter(handler="sms"))] == ["sms"]
    payments = await dead_letters.list(DlqFilter(transition="transition/*payment*"))
    assert [d.id for d in payments] == [sample[0].id, sample[2].id]
    window = DlqFilter(since=T + timedelta(minutes=30), until=T + timedelta(hours=1))
    assert [d.id for d in await dead_letters.list(window)] == [sample[1].id]
    assert await dead_letters.show(sample[1].id) == sample[1]
    assert await dead_letters.show("0" * 16) is None
    with pytest.raises(ConfigError, match="no dead letter with id 'nope'"):
        await dead_letters.select(["nope"])


async def test_purge_removes_entries(arq_redis: ArqRedis, redis_url: str, sample: list[DeadLetter]) -> None:
    dead_letters = DeadLetters(arq_redis, make_settings(redis_url))
    await store(arq_redis, dead_letters, *sample)
    assert await dead_letters.purge(await dead_letters.list(DlqFilter(handler="crm"))) == 2
    assert [d.handler for d in await dead_letters.list()] == ["sms"]


async def test_replay_reruns_and_empties_the_dlq(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    healthy = {"now": False}
    attempts: list[tuple[int, bool]] = []

    @handler("crm", retry=RetryPolicy(max_attempts=2, base_s=0.01, cap_s=0.01))
    async def crm(ctx: HandlerContext) -> None:
        attempts.append((ctx.attempt, healthy["now"]))
        if not healthy["now"]:
            raise OSError("the CRM is down")

    batch = events(1, 2)
    dead_letters = DeadLetters(arq_redis, settings)
    async with worker(settings, [crm]):
        await enqueue(arq_redis, settings, batch)
        await until(lambda: _count(dead_letters, 2), what="two dead letters")
        healthy["now"] = True
        letters = await dead_letters.list()
        replayed = await dead_letters.replay(letters)
        assert len(replayed) == 2 and all(":replay:" in job_id for job_id in replayed)
        assert await dead_letters.count() == 0
        await until(lambda: _done(arq_redis, settings, "crm", 2), what="replays done")
    # Each event failed twice, then its replay started again at attempt 1.
    assert sorted(attempts) == [(1, False), (1, False), (1, True), (1, True), (2, False), (2, False)]
    record = await DeliveryRecords(arq_redis, Keys(settings.redis_prefix), retention_s=60).read(
        "crm", batch[0].key
    )
    assert (record.status, record.attempts, record.errors) == ("done", 1, [])


async def _count(dead_letters: DeadLetters, n: int) -> bool:
    return await dead_letters.count() >= n


async def _done(redis: ArqRedis, settings: Settings, name: str, n: int) -> bool:
    return (await stats(redis, settings, name)).get("done", 0) >= n


async def test_replay_of_a_done_delivery_needs_force(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    runs: list[int] = []

    @handler("crm")
    async def crm(ctx: HandlerContext) -> None:
        runs.append(ctx.attempt)

    (event,) = events(1, 1)
    dead_letters = DeadLetters(arq_redis, settings)
    async with worker(settings, [crm]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _done(arq_redis, settings, "crm", 1), what="done")
        # An entry for a delivery that did get done (say, a second copy of the event succeeded).
        stale = letter("crm", 1, 0, T)
        await store(arq_redis, dead_letters, stale)
        await dead_letters.replay([stale])
        await until(lambda: _skipped(arq_redis, settings), what="a no-op")
        assert runs == [1]
        await store(arq_redis, dead_letters, stale)
        await dead_letters.replay([stale], force=True)
        await until(lambda: _done(arq_redis, settings, "crm", 2), what="a forced run")
    assert runs == [1, 1]


async def _skipped(redis: ArqRedis, settings: Settings) -> bool:
    return (await stats(redis, settings, "crm")).get("skipped", 0) > 0


async def test_replay_can_forget_uncertain_steps(arq_redis: ArqRedis, redis_url: str) -> None:
    settings = make_settings(redis_url)
    sent: list[int] = []

    async def send(attempt: int) -> str:
        sent.append(attempt)
        return "ok"

    @handler("sms", retry=RetryPolicy(max_attempts=2, base_s=0.01, cap_s=0.01))
    async def sms(ctx: HandlerContext) -> None:
        await ctx.step("send", lambda: send(ctx.attempt))

    (event,) = events(1, 1)
    await arq_redis.hset(
        Keys(settings.redis_prefix).delivery("sms", event.key), "step:send", '{"state":"started","attempt":1}'
    )  # type: ignore[misc]
    dead_letters = DeadLetters(arq_redis, settings)
    async with worker(settings, [sms]):
        await enqueue(arq_redis, settings, [event])
        await until(lambda: _count(dead_letters, 1), what="uncertain step dead-lettered")
        # Replayed as it is, the step is still uncertain.
        await dead_letters.replay(await dead_letters.list())
        await until(lambda: _dead(arq_redis, settings, 2), what="dead-lettered again")
        assert sent == []
        await dead_letters.replay(await dead_letters.list(), forget_uncertain=True)
        await until(lambda: _done(arq_redis, settings, "sms", 1), what="done")
    assert sent == [1]


async def _dead(redis: ArqRedis, settings: Settings, n: int) -> bool:
    return (await stats(redis, settings, "sms")).get("dead_lettered", 0) >= n


@pytest.fixture
def sentry_events() -> Iterator[list[dict[str, Any]]]:
    captured: list[dict[str, Any]] = []

    def keep(event: Any, hint: Any) -> None:
        captured.append(event)  # and send nothing

    sentry_sdk.init(dsn="https://public@127.0.0.1:9/1", before_send=keep, default_integrations=False)
    try:
        yield captured
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.Scope.get_global_scope().set_client(None)  # 2.0 has no top-level get_global_scope()


def test_dead_letters_go_to_sentry_without_personal_data(sentry_events: list[dict[str, Any]]) -> None:
    item = letter("crm", 1, 2, T)
    item.errors[-1] = item.errors[-1].model_copy(update={"message": "no deal for jane@example.com"})
    report(item)
    (event,) = sentry_events
    assert event["level"] == "error"
    assert event["message"] == "dead-lettered: crm on transition/confirm-payment (OSError)"
    assert event["tags"] == {
        "handler": "crm",
        "transition": "transition/confirm-payment",
        "reason": "exhausted",
    }
    assert event["fingerprint"] == ["flexworker-dead-letter", "crm", "OSError"]
    assert "jane@example.com" not in repr(event)


def test_no_sentry_without_a_dsn(redis_url: str) -> None:
    assert not sentry_sdk.get_client().is_active()
    assert init_sentry(make_settings(redis_url)) is False
    report(letter("crm", 1, 0, T))  # nothing to send to, nothing raised
    with pytest.raises(ConfigError) as caught:
        init_sentry(make_settings(redis_url, sentry_dsn="nonsense-key-material"))
    assert "nonsense-key-material" not in str(caught.value)
    assert not sentry_sdk.get_client().is_active()


async def test_worker_reports_a_dead_letter_to_sentry(
    arq_redis: ArqRedis, redis_url: str, sentry_events: list[dict[str, Any]]
) -> None:
    settings = make_settings(redis_url)

    @handler("crm")
    async def crm(ctx: HandlerContext) -> None:
        raise PermanentError("refused")

    async with worker(settings, [crm]):
        await enqueue(arq_redis, settings, events(1, 1))
        await until(lambda: len(sentry_events) == 1, what="a Sentry event")
    assert sentry_events[0]["tags"]["handler"] == "crm"


# --- the command line -------------------------------------------------------------------------


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    return cli_env(
        SHARETRIBE_CLIENT_ID="id",
        SHARETRIBE_CLIENT_SECRET="secret",
        REDIS_URL=redis_url,
        FLEXWORKER_NAMESPACE="t",
        **extra,
    )


async def test_cli_dlq_list_show_replay_purge(
    arq_redis: ArqRedis, redis_url: str, sample: list[DeadLetter], tmp_path: Path
) -> None:
    dead_letters = DeadLetters(arq_redis, make_settings(redis_url))
    await store(arq_redis, dead_letters, *sample)
    env = _env(redis_url)

    code, out, err = await flexworker("dlq", "list", "--handler", "crm", env=env, cwd=tmp_path)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1] == "2 dead letters"
    assert lines[0].startswith(
        f"{sample[0].id}  2026-05-01T12:00:00+00:00  crm  transition/confirm-payment  "
    )
    code, out, _ = await flexworker(
        "dlq",
        "list",
        "--since",
        "2026-05-01T12:30:00Z",
        "--transition",
        "transition/*payment*",
        env=env,
        cwd=tmp_path,
    )
    assert code == 0 and out.strip().splitlines()[-1] == "1 dead letter" and sample[2].id in out

    code, out, err = await flexworker("dlq", "show", sample[0].id, env=env, cwd=tmp_path)
    assert code == 0, err
    assert "reason:           exhausted after 2 attempt(s)" in out
    assert "attempt 2: OSError: refused again [crm.py:9 in handle]" in out
    assert '"transaction"' not in out  # the event (personal data) only with --event
    code, out, _ = await flexworker("dlq", "show", sample[0].id, "--event", env=env, cwd=tmp_path)
    assert '"transaction"' in out

    code, _, err = await flexworker("dlq", "replay", env=env, cwd=tmp_path)
    assert code == 2
    assert (
        err.strip() == "flexworker: error: dlq replay: give dead letter ids, or --all (with filters) for many"
    )
    code, out, err = await flexworker("dlq", "replay", sample[1].id, env=env, cwd=tmp_path)
    assert (code, out.strip()) == (0, "replayed 1 dead letter"), err
    queued = [job.decode() for job in await arq_redis.zrange("flexworker:t:queue", 0, -1)]
    # The replay's job: the handler's own job id (namespaced) and when it was replayed.
    assert len(queued) == 1 and queued[0].startswith(f"flexworker:t:{sample[1].job_id}:replay:")

    code, out, err = await flexworker("dlq", "purge", "--all", "--handler", "sms", env=env, cwd=tmp_path)
    assert (code, out.strip()) == (0, "purged 1 dead letter"), err
    assert [d.id for d in await dead_letters.list()] == [sample[0].id]
    code, _, err = await flexworker("dlq", "show", "0" * 16, env=env, cwd=tmp_path)
    assert code == 2 and "no dead letter with id" in err

    await arq_redis.hset(Keys("flexworker:t").stats("crm"), mapping={"done": 5, "retried": 2})  # type: ignore[misc]
    code, out, err = await flexworker("status", env=env, cwd=tmp_path)
    assert code == 0, err
    assert "dead letters:        1\n" in out
    assert "handler crm:         done 5, retried 2, dead-lettered 0, skipped 0\n" in out


def _fake_distribution(root: Path, entries: dict[str, str]) -> None:
    """A distribution with handler entry points, visible to importlib.metadata on PYTHONPATH."""
    info = root / "fw_test_plugins-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fw-test-plugins\nVersion: 1.2\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[flexworker.handlers]\n{lines}\n")


async def test_cli_handlers_lists_installed_handlers(redis_url: str, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(
        site, {"crm": "tests.plugins.good:crm", "broken": "tests.plugins.broken_import:handler"}
    )
    env = _env(
        redis_url,
        PYTHONPATH=f"{site}:{REPO}",
        FLEXWORKER_HANDLERS="log,crm",
        FLEXWORKER_HANDLER_CRM_API_KEY="k",
    )
    code, out, err = await flexworker("handlers", env=env, cwd=tmp_path)
    assert code == 0, err
    assert "crm (enabled) from fw-test-plugins 1.2: tests.plugins.good:crm" in out
    assert "  subscription: transitions=transition/confirm-payment processes=*" in out
    assert "  retry:        max_attempts=7 base_s=1 cap_s=300 timeout_s=60" in out
    assert "jsonl (disabled) from flexworker " in out
    assert "log (enabled) from flexworker " in out
    assert "broken (disabled)" in out
    assert "  problem:      handler 'broken' failed to import: ModuleNotFoundError" in out
    # An enabled handler that cannot start makes the listing fail like start-up would.
    env["FLEXWORKER_HANDLERS"] = "log,broken"
    code, out, err = await flexworker("handlers", env=env, cwd=tmp_path)
    assert code == 2
    assert err.strip().startswith("flexworker: error: handler 'broken' failed to import: ModuleNotFoundError")
