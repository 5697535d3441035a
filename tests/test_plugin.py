"""The plugin API and the registry: subscriptions, retry policies, specs, error classes, loading."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import EntryPoint
from pathlib import Path

import aiohttp
import pydantic
import pytest
import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from tests.delivery_kit import events, make_settings
from tests.plugins.legacy import LegacyHandler
from worker import registry
from worker.deliver.failures import classify, describe
from worker.errors import ConfigError, ServerError, TransportError, status_error
from worker.plugin import (
    Handler,
    HandlerContext,
    HandlerSpec,
    PermanentError,
    RetryLater,
    RetryPolicy,
    StepUncertainError,
    Subscription,
    handler,
)
from worker.settings import load_settings


class MaxRandom(random.Random):
    """Full jitter always draws the ceiling, so the schedule shows."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_subscription_globs_on_transition_and_process() -> None:
    (inquire, request, confirm) = events(1, 3)
    payments = Subscription(transitions=["transition/*payment*"])
    assert [payments.matches(e) for e in (inquire, request, confirm)] == [False, True, True]
    purchase = Subscription(processes="default-purchase")  # one pattern may be a bare string
    assert purchase.processes == ("default-purchase",)
    assert not purchase.matches(inquire)
    assert Subscription(processes=["default-*"]).matches(inquire)
    # Globs are case-sensitive, as transition names are.
    assert not Subscription(transitions=["TRANSITION/*"]).matches(inquire)


def test_subscription_predicate_must_agree() -> None:
    (inquire,) = events(1, 1)
    (other,) = events(2, 1)
    only_one = Subscription(predicate=lambda e: e.transaction_id == inquire.transaction_id)
    assert only_one.matches(inquire)
    assert not only_one.matches(other)
    # The predicate is not asked when the globs already say no.
    asked: list[str] = []
    narrow = Subscription(transitions=["transition/accept"], predicate=lambda e: bool(asked.append(e.key)))
    assert not narrow.matches(inquire)
    assert asked == []


@pytest.mark.parametrize("bad", [[], [""], ("",)])
def test_subscription_rejects_empty_patterns(bad: list[str]) -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        Subscription(transitions=bad)


def test_backoff_schedule_doubles_to_the_cap_and_stops() -> None:
    policy = RetryPolicy(max_attempts=7, base_s=1.0, cap_s=10.0)
    rng = MaxRandom()
    delays = [policy.delay_s(failed, rng) for failed in range(1, 8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, None]


def test_backoff_is_jittered_below_the_ceiling() -> None:
    policy = RetryPolicy(max_attempts=50, base_s=0.5, cap_s=4.0)
    rng = random.Random(42)
    delays = [policy.delay_s(3, rng) for _ in range(200)]
    assert all(d is not None and 0 <= d <= 2.0 for d in delays)
    assert len({round(d or 0, 6) for d in delays}) > 150  # really random, not a constant


def test_retry_later_is_a_floor_even_beyond_the_cap() -> None:
    policy = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=2.0)
    assert policy.delay_s(1, random.Random(1), at_least_s=30.0) == 30.0
    assert policy.delay_s(1, MaxRandom(), at_least_s=0.1) == 1.0
    # The floor does not buy attempts: the last one is still the last.
    assert policy.delay_s(3, random.Random(1), at_least_s=30.0) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"base_s": 0},
        {"base_s": 5.0, "cap_s": 1.0},
        {"timeout_s": 0},
        {"timeout_s": float("inf")},
    ],
)
def test_retry_policy_validates(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_decorator_makes_a_spec() -> None:
    @handler("crm-sync", transitions=["transition/accept"], retry=RetryPolicy(max_attempts=2))
    async def crm(ctx: HandlerContext) -> None:
        pass

    assert isinstance(crm, HandlerSpec)
    assert crm.name == "crm-sync"
    assert crm.env_prefix == "FLEXWORKER_HANDLER_CRM_SYNC_"
    assert crm.retry.max_attempts == 2
    assert crm.subscription.transitions == ("transition/accept",)
    assert crm.fn is not None
    assert crm.origin.endswith("test_decorator_makes_a_spec.<locals>.crm")


def test_decorator_refuses_sync_functions_and_wrong_parameters() -> None:
    def sync(ctx: HandlerContext) -> None:
        pass

    async def two(ctx: HandlerContext, extra: int) -> None:
        pass

    with pytest.raises(ConfigError, match=r"handler 'a': .*sync must be async def"):
        handler("a")(sync)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"handler 'b': .*two must take exactly one argument"):
        handler("b")(two)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="handler name"):
        handler("no:colons")


def test_class_style_handler_is_checked() -> None:
    class Good(Handler):
        name = "good"
        retry = RetryPolicy(timeout_s=5)

        async def handle(self, ctx: HandlerContext) -> None:
            pass

    spec = HandlerSpec.from_class(Good)
    assert (spec.name, spec.retry.timeout_s, spec.env_prefix) == ("good", 5, "FLEXWORKER_HANDLER_GOOD_")

    class NoHandle(Handler):
        name = "nohandle"

    class SyncStartup(Good):
        name = "syncstartup"

        def startup(self) -> None:  # type: ignore[override]
            pass

    with pytest.raises(ConfigError, match="does not define handle"):
        HandlerSpec.from_class(NoHandle)
    with pytest.raises(
        ConfigError, match=r"handler 'syncstartup': .*startup must be async def startup\(self\)"
    ):
        HandlerSpec.from_class(SyncStartup)


def test_idempotency_key_is_stable_short_and_distinct() -> None:
    (event,) = events(1, 1)

    def ctx(handler_name: str, namespace: str) -> HandlerContext:
        return HandlerContext(
            event=event,
            client=None,  # type: ignore[arg-type]
            log=None,  # type: ignore[arg-type]
            settings=None,  # type: ignore[arg-type]
            handler_settings=None,
            http=None,  # type: ignore[arg-type]
            attempt=1,
            handler=handler_name,
            namespace=namespace,
            steps=None,  # type: ignore[arg-type]
        )

    key = ctx("crm", "prod").idempotency_key("create-deal")
    assert key == ctx("crm", "prod").idempotency_key("create-deal")
    assert len(key) <= 200 and key.startswith("fw-crm-")
    assert str(event.transaction_id) not in key
    others = {
        ctx("crm", "prod").idempotency_key("refund"),
        ctx("sms", "prod").idempotency_key("create-deal"),
        ctx("crm", "staging").idempotency_key("create-deal"),
    }
    assert key not in others and len(others) == 3


def _response_error(status: int, retry_after: str | None = None) -> aiohttp.ClientResponseError:
    headers = CIMultiDictProxy(CIMultiDict({"Retry-After": retry_after} if retry_after else {}))
    return aiohttp.ClientResponseError(None, (), status=status, message="x", headers=headers)  # type: ignore[arg-type]


class _Model(pydantic.BaseModel):
    email: str
    age: int


def _validation_error() -> pydantic.ValidationError:
    try:
        _Model.model_validate({"email": "jane@example.com", "age": "forty jane@example.com"})
    except pydantic.ValidationError as exc:
        return exc
    raise AssertionError("expected a validation error")


@pytest.mark.parametrize(
    ("exc", "permanent"),
    [
        (PermanentError("no"), True),
        (StepUncertainError("unknown"), True),
        (_validation_error(), True),
        (status_error(400, []), True),
        (status_error(404, []), True),
        (status_error(409, []), True),
        (status_error(429, []), False),
        (status_error(503, []), False),
        (ServerError("x", status=500), False),
        (TransportError("down"), False),
        (_response_error(404), True),
        (_response_error(429), False),
        (_response_error(502), False),
        (aiohttp.ClientConnectionError("reset"), False),
        (OSError("refused"), False),
        (TimeoutError(), False),
        (RetryLater(3), False),
        (ValueError("a plugin bug, maybe a flaky dependency"), False),
    ],
)
def test_classify(exc: Exception, permanent: bool) -> None:
    assert classify(exc, now_s=0.0).permanent is permanent


def test_classify_honours_retry_later_and_retry_after() -> None:
    assert classify(RetryLater(2.5), now_s=0.0).at_least_s == 2.5
    assert classify(_response_error(429, "7"), now_s=0.0).at_least_s == 7.0
    assert classify(_response_error(503), now_s=0.0).at_least_s is None


def test_describe_is_one_line_without_input_values() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    record = describe(_validation_error(), attempt=2, at=at)
    assert record.type == "ValidationError"
    assert "age" in record.message
    assert "jane@example.com" not in record.message
    try:
        raise ValueError("first line\nsecond line " + "x" * 1000)
    except ValueError as exc:
        long = describe(exc, attempt=1, at=at)
    assert "\n" not in long.message and len(long.message) <= 500
    assert long.where.startswith("test_plugin.py:")


# --- the registry -----------------------------------------------------------------------------


def _entry(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=registry.HANDLER_GROUP)


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Installed handlers: the test plugins, through hand-made entry points."""
    installed = {
        "crm": _entry("crm", "tests.plugins.good:crm"),
        "audit": _entry("audit", "tests.plugins.good:Audit"),
        "legacy": _entry("legacy", "tests.plugins.legacy:LegacyHandler"),
        "broken": _entry("broken", "tests.plugins.broken_import:handler"),
        "sync": _entry("sync", "tests.plugins.sync_handler:sync"),
        "syncclass": _entry("syncclass", "tests.plugins.sync_class:SyncClass"),
        "misnamed": _entry("misnamed", "tests.plugins.good:Audit"),
    }
    monkeypatch.setattr(registry, "installed_handlers", lambda: installed)
    for name in list(os.environ):
        if name.startswith("FLEXWORKER_HANDLER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def _load(*names: str) -> list[registry.LoadedHandler]:
    return registry.load_handlers(make_settings("redis://127.0.0.1:1/0", handlers=list(names)))


@pytest.mark.usefixtures("plugins")
def test_loads_both_styles_and_the_older_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXWORKER_HANDLER_CRM_API_KEY", "k-123")
    monkeypatch.setenv("FLEXWORKER_HANDLER_CRM_BATCH_SIZE", "25")
    crm, audit, legacy = _load("crm", "audit", "legacy")
    assert crm.handler_settings.api_key == "k-123"
    assert crm.handler_settings.batch_size == 25
    assert crm.spec.retry.max_attempts == 7
    assert audit.spec.subscription.processes == ("default-purchase",)
    assert isinstance(audit.handler, Handler) and audit.handler_settings is None
    assert legacy.spec.retry == RetryPolicy()
    assert isinstance(legacy.handler.wrapped, LegacyHandler)  # type: ignore[attr-defined]


@pytest.mark.usefixtures("plugins")
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("broken", "handler 'broken' failed to import: ModuleNotFoundError: No module named "),
        ("sync", "handler 'sync': sync must be async def fn(ctx)"),
        ("syncclass", "handler 'syncclass': SyncClass.handle must be async def handle(self, ctx)"),
        ("crm", "handler 'crm' setting FLEXWORKER_HANDLER_CRM_API_KEY is required but not set"),
        ("misnamed", "handler 'misnamed': the entry point names a handler called 'audit'"),
        ("nope", "handler 'nope' is not installed (installed: "),
    ],
)
def test_bad_plugins_stop_start_up_with_one_line(name: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(name)
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.usefixtures("plugins")
def test_bad_setting_value_is_named_but_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXWORKER_HANDLER_CRM_API_KEY", "k-123")
    monkeypatch.setenv("FLEXWORKER_HANDLER_CRM_BATCH_SIZE", "secret-looking-value")
    with pytest.raises(ConfigError) as caught:
        _load("crm")
    text = str(caught.value)
    assert text.startswith("handler 'crm' setting FLEXWORKER_HANDLER_CRM_BATCH_SIZE is invalid: ")
    assert "secret-looking-value" not in text


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI sets logging up for the process (on pytest's captured stderr); undo it after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("plugins", "restore_logging")
def test_cli_work_with_a_bad_plugin_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import main

    monkeypatch.setenv("SHARETRIBE_CLIENT_ID", "id")
    monkeypatch.setenv("SHARETRIBE_CLIENT_SECRET", "secret")
    monkeypatch.setenv("FLEXWORKER_SECRETS_DIR", "/nonexistent")
    monkeypatch.setenv("FLEXWORKER_HANDLERS", "audit,sync")
    assert main(["work"]) == 2
    err = capsys.readouterr().err
    assert err == "flexworker: error: handler 'sync': sync must be async def fn(ctx)\n"


def test_activate_takes_instances_and_older_objects() -> None:
    settings = make_settings("redis://127.0.0.1:1/0")
    legacy = registry.activate(LegacyHandler(settings), settings)
    assert legacy.name == "legacy"

    class Plain:
        name = "plain"

        def handle(self, event: object) -> None:
            pass

    with pytest.raises(
        ConfigError, match=r"handler 'plain': .*Plain.handle must be async def handle\(self, event\)"
    ):
        registry.activate(Plain(), settings)
    with pytest.raises(ConfigError, match="not a handler"):
        registry.activate(42, settings)


def test_idempotency_retention_never_shorter_than_seen_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARETRIBE_CLIENT_ID", "id")
    monkeypatch.setenv("SHARETRIBE_CLIENT_SECRET", "secret")
    monkeypatch.setenv("FLEXWORKER_SEEN_RETENTION_S", "86400")
    monkeypatch.setenv("FLEXWORKER_IDEMPOTENCY_RETENTION_S", "7200")
    with pytest.raises(ConfigError) as caught:
        load_settings(env_file=None, secrets_dir="/nonexistent")
    assert str(caught.value) == (
        "setting FLEXWORKER_IDEMPOTENCY_RETENTION_S is invalid: must be at least "
        "FLEXWORKER_SEEN_RETENTION_S (86400 s)"
    )
    monkeypatch.delenv("FLEXWORKER_IDEMPOTENCY_RETENTION_S")
    assert load_settings(env_file=None, secrets_dir="/nonexistent").idempotency_retention_s == 30 * 86400
