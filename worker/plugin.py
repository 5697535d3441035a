"""The handler plugin API: the one module a handler author imports.

A handler acts on transaction transitions. flexworker delivers each event to each
enabled handler whose subscription matches, in its own job: a failing handler
never re-runs another. Delivery is at least once, made effectively once by
idempotency: a handler that finished an event never sees it again, and
:meth:`HandlerContext.step` keeps a side effect from happening twice when an
attempt is retried. Events of one transaction reach a handler in transition
order; different transactions run concurrently.

A complete plugin, in its own distribution::

    # my_crm/handler.py
    from pydantic_settings import BaseSettings

    from worker.plugin import HandlerContext, PermanentError, RetryPolicy, handler


    class CrmSettings(BaseSettings):
        api_url: str = "https://crm.example.com"
        api_key: str  # FLEXWORKER_HANDLER_CRM_API_KEY (required: start-up fails without it)


    @handler(
        "crm",
        transitions=["transition/confirm-payment", "transition/*-refund*"],
        processes=["default-booking"],
        predicate=lambda event: event.customer is not None,
        settings=CrmSettings,
        retry=RetryPolicy(max_attempts=8, base_s=2.0, cap_s=600.0, timeout_s=30.0),
    )
    async def crm(ctx: HandlerContext) -> None:
        config: CrmSettings = ctx.handler_settings
        deal = await ctx.step(
            "create-deal",
            lambda: create_deal(ctx, config),
            if_uncertain=lambda: find_deal(ctx, config),  # did the lost attempt create it?
        )
        ctx.log.info("deal recorded", deal_id=deal["id"])


    async def create_deal(ctx: HandlerContext, config: CrmSettings) -> dict[str, str]:
        async with ctx.http.post(
            f"{config.api_url}/deals",
            json={"transaction": str(ctx.event.transaction_id)},
            headers={"Authorization": f"Bearer {config.api_key}",
                     "Idempotency-Key": ctx.idempotency_key("create-deal")},
        ) as response:
            if response.status == 422:
                raise PermanentError("the CRM refused the deal")  # no retry: dead-lettered
            response.raise_for_status()  # 429 and 5xx are retried with backoff, other 4xx are not
            return {"id": (await response.json())["id"]}


    async def find_deal(ctx: HandlerContext, config: CrmSettings) -> dict[str, str] | None:
        ...  # look the deal up; None means "it was not created", so create_deal runs

and in its ``pyproject.toml``::

    [project.entry-points."flexworker.handlers"]
    crm = "my_crm.handler:crm"

Enable it with ``FLEXWORKER_HANDLERS=log,crm``. The same handler as a class, for
handlers that hold state between events (a client, a connection pool)::

    class Crm(Handler):
        name = "crm"
        subscription = Subscription(transitions=("transition/confirm-payment",))
        retry = RetryPolicy(max_attempts=8)
        Settings = CrmSettings
        handler_settings: CrmSettings

        async def startup(self) -> None:      # once per worker, before the first event
            self.api = CrmApi(self.handler_settings.api_key)

        async def handle(self, ctx: HandlerContext) -> None:
            await ctx.step("create-deal", lambda: self.api.create_deal(ctx.event.transaction_id))

        async def shutdown(self) -> None:     # once, when the worker stops
            await self.api.close()

What happens when ``handle`` raises:

- **Transient, retried with backoff** (exponential, full jitter, per
  :class:`RetryPolicy`): network errors (``aiohttp.ClientError``, ``OSError``),
  timeouts (the handler's own ``timeout_s`` included), ``aiohttp.ClientResponseError``
  with status 429 or 5xx (``Retry-After`` honoured), flexworker's
  ``TransportError``/``RateLimitedError``/``ServerError``/``CallBudgetError``/
  ``CommandOutcomeUnknownError``, :class:`RetryLater` (waits at least ``after_s``),
  and any other unexpected exception: a bug may be a flaky dependency. When
  ``max_attempts`` are used up the event is dead-lettered.
- **Uncertain**: ``ctx.client``'s commands (``transactions_transition``,
  ``transactions_update_metadata``, ``post``) raise ``CommandOutcomeUnknownError``
  when the command may have taken effect but no answer says so (a gateway's 502 or
  504, a 500, a connection lost after sending, a read timeout); the client never
  sends such a command again. Raised inside :meth:`HandlerContext.step` (or raised
  *from* one, ``raise X from exc``) it leaves the step uncertain: the next attempt
  calls ``if_uncertain``, or dead-letters with :class:`StepUncertainError` without
  one. So call commands inside a step, with an ``if_uncertain`` that looks at the
  transaction (``ctx.client.transactions_show``) to see whether the change is there.
- **Permanent, dead-lettered at once**: :class:`PermanentError`,
  ``pydantic.ValidationError``, :class:`StepUncertainError`, and other 4xx answers
  (``aiohttp.ClientResponseError``, flexworker's ``HTTPStatusError``).

Dead-lettered events wait for a person: ``flexworker dlq list``, ``show``,
``replay``, ``purge``. Error messages are stored there; keep personal data out of
the messages you raise, since the worker's own logs carry only error types.
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import math
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar, cast

import aiohttp
from pydantic_settings import BaseSettings
from structlog.typing import FilteringBoundLogger

from worker.api.backoff import Backoff
from worker.api.client import IntegrationClient
from worker.errors import ConfigError, PermanentError, RetryLater, StepUncertainError
from worker.events import TransitionEvent
from worker.settings import Settings as FlexworkerSettings

__all__ = [
    "FlexworkerSettings",
    "HandleFn",
    "Handler",
    "HandlerContext",
    "HandlerSpec",
    "IntegrationClient",
    "PermanentError",
    "Predicate",
    "RetryLater",
    "RetryPolicy",
    "StepRunner",
    "StepUncertainError",
    "Subscription",
    "TransitionEvent",
    "default_env_prefix",
    "handler",
]

T = TypeVar("T")

#: A subscription's extra filter: true to receive the event.
Predicate = Callable[[TransitionEvent], bool]
#: A function-style handler.
HandleFn = Callable[["HandlerContext"], Awaitable[None]]

#: Handler names end up in Redis keys, job ids and environment variable names.
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _patterns(value: Sequence[str] | str, what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ConfigError(f"subscription {what} must be a non-empty list of non-empty glob patterns")
    return items


@dataclass(frozen=True)
class Subscription:
    """Which events a handler receives.

    ``transitions`` and ``processes`` are ``fnmatch`` globs (case-sensitive) on
    :attr:`TransitionEvent.transition` (``transition/*payment*``) and
    :attr:`TransitionEvent.process_name` (``default-*``); an event must match one
    pattern of each. ``predicate``, when given, must also return true.
    """

    transitions: Sequence[str] = ("*",)
    processes: Sequence[str] = ("*",)
    predicate: Predicate | None = None

    def __post_init__(self) -> None:
        # Frozen, so normalise through object.__setattr__: lists in, tuples stored.
        object.__setattr__(self, "transitions", _patterns(self.transitions, "transitions"))
        object.__setattr__(self, "processes", _patterns(self.processes, "processes"))
        if self.predicate is not None and not callable(self.predicate):
            raise ConfigError("subscription predicate must be callable: predicate(event) -> bool")

    def matches_names(self, transition: str, process_name: str) -> bool:
        """Whether the transition and process patterns match (the predicate is not asked)."""
        return any(fnmatch.fnmatchcase(transition, p) for p in self.transitions) and any(
            fnmatch.fnmatchcase(process_name, p) for p in self.processes
        )

    def matches(self, event: TransitionEvent) -> bool:
        """Whether the handler receives ``event``: the patterns match and the predicate agrees."""
        return self.matches_names(event.transition, event.process_name) and (
            self.predicate is None or bool(self.predicate(event))
        )

    def describe(self) -> str:
        """One line for ``flexworker handlers``."""
        text = f"transitions={','.join(self.transitions)} processes={','.join(self.processes)}"
        return text + (" +predicate" if self.predicate is not None else "")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one handler is retried.

    ``max_attempts`` counts every attempt, the first included (1 = never retry).
    The wait before retry *n* (0-based) is ``uniform(0, min(cap_s, base_s * 2**n))``;
    :class:`RetryLater` and ``Retry-After`` raise it to at least what they ask.
    One attempt may run ``timeout_s``; past that it is cancelled and counts as a
    transient failure.
    """

    max_attempts: int = 5
    base_s: float = 1.0
    cap_s: float = 300.0
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _ = self.backoff  # building the Backoff validates the numbers
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"retry timeout_s must be a positive number, got {self.timeout_s!r}")

    @property
    def backoff(self) -> Backoff:
        """The schedule, as the shared :class:`~worker.api.backoff.Backoff` (no total-time budget)."""
        return Backoff(
            base_s=self.base_s, cap_s=self.cap_s, max_attempts=self.max_attempts, max_total_s=math.inf
        )

    def delay_s(
        self, failed_attempts: int, rng: random.Random, *, at_least_s: float | None = None
    ) -> float | None:
        """The wait before the next attempt after ``failed_attempts`` failures; None when used up."""
        return self.backoff.next_delay_s(failed_attempts, 0.0, rng, retry_after_s=at_least_s)

    def describe(self) -> str:
        return (
            f"max_attempts={self.max_attempts} base_s={self.base_s:g} cap_s={self.cap_s:g} "
            f"timeout_s={self.timeout_s:g}"
        )


class StepRunner(Protocol):
    """What :meth:`HandlerContext.step` delegates to (``worker.deliver.idempotency`` implements it)."""

    async def run(
        self,
        name: str,
        fn: Callable[[], Awaitable[Any]],
        if_uncertain: Callable[[], Awaitable[Any]] | None,
    ) -> Any: ...


@dataclass(frozen=True, kw_only=True, eq=False)
class HandlerContext:
    """Everything a handler gets for one attempt at one event."""

    #: the transition being delivered.
    event: TransitionEvent
    #: the worker's Integration API client (shared; rate limited and retried).
    client: IntegrationClient
    #: a structlog logger bound to ``event_key``, ``transaction_id``, ``handler`` and ``attempt``.
    log: FilteringBoundLogger
    #: flexworker's own settings.
    settings: FlexworkerSettings
    #: the handler's own settings (an instance of its settings model), or None without one.
    handler_settings: Any
    #: an HTTP session shared by every handler of the worker.
    http: aiohttp.ClientSession
    #: this attempt's number, 1-based.
    attempt: int
    #: the handler's name.
    handler: str
    #: the namespace (``FLEXWORKER_NAMESPACE``) the event belongs to.
    namespace: str
    steps: StepRunner = field(repr=False)

    def idempotency_key(self, step: str) -> str:
        """A key for an external API's idempotency header, the same on every retry and worker.

        Derived from the namespace, the handler, the event key and ``step``; at most
        133 characters of ``[A-Za-z0-9_.-]``, and no personal data.
        """
        material = "\0".join((self.namespace, self.handler, self.event.key, step))
        return f"fw-{self.handler}-{hashlib.sha256(material.encode()).hexdigest()}"

    async def step(
        self,
        name: str,
        fn: Callable[[], Awaitable[T]],
        *,
        if_uncertain: Callable[[], Awaitable[T | None]] | None = None,
    ) -> T:
        """Run a side effect once per event, however often the handler is retried.

        Before calling ``fn()`` the step is recorded as started; its result, which must
        be JSON (None, bool, numbers, strings, lists, dicts), is stored after. A later
        attempt gets the stored result back without calling ``fn`` again: the value as
        JSON gives it back, so every attempt sees the same thing.

        If ``fn`` raises, nothing is stored and a retry calls it again (pass
        :meth:`idempotency_key` to the remote side so a repeat is harmless). If an
        attempt ends while ``fn`` runs (the worker dies, the handler's timeout cancels
        it), or ``fn`` raises :class:`~worker.errors.CommandOutcomeUnknownError` (or an
        exception raised from it, or while handling it, or a group holding it), the step
        is *uncertain*: the next attempt calls ``if_uncertain()``, which returns the
        result if the side effect did happen, or None if it did not (then ``fn`` runs).
        Without ``if_uncertain`` it raises :class:`StepUncertainError` and the event is
        dead-lettered for a person to decide.
        """
        return cast(T, await self.steps.run(name, fn, if_uncertain))


class Handler:
    """Base class of class-style handlers.

    Set ``name`` and override :meth:`handle`; optionally set ``subscription``,
    ``retry``, ``Settings`` (a pydantic-settings model read from the environment
    with ``env_prefix``, default ``FLEXWORKER_HANDLER_<NAME>_``), and override
    :meth:`startup` / :meth:`shutdown`. The worker creates one instance with its
    settings and the handler's own settings (``self.handler_settings``).
    """

    name: str
    subscription: ClassVar[Subscription] = Subscription()
    retry: ClassVar[RetryPolicy] = RetryPolicy()
    Settings: ClassVar[type[BaseSettings] | None] = None
    env_prefix: ClassVar[str | None] = None

    def __init__(self, settings: FlexworkerSettings, handler_settings: Any = None) -> None:
        self.settings = settings
        self.handler_settings = handler_settings

    async def startup(self) -> None:
        """Called once per worker before the first event (open clients here)."""

    async def shutdown(self) -> None:
        """Called once when the worker stops."""

    async def handle(self, ctx: HandlerContext) -> None:
        """Act on ``ctx.event``; raise to have it retried or dead-lettered (see the module doc)."""
        raise NotImplementedError


class _FunctionHandler(Handler):
    """The runtime form of a function-style handler."""

    def __init__(
        self, name: str, fn: HandleFn, settings: FlexworkerSettings, handler_settings: Any = None
    ) -> None:
        super().__init__(settings, handler_settings)
        self.name = name
        self._fn = fn

    async def handle(self, ctx: HandlerContext) -> None:
        await self._fn(ctx)


def default_env_prefix(name: str) -> str:
    """``FLEXWORKER_HANDLER_<NAME>_`` with anything but letters and digits as ``_``."""
    return "FLEXWORKER_HANDLER_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper() + "_"


def _is_async(fn: object) -> bool:
    # An instance with ``async def __call__`` is as good as an async function.
    return inspect.iscoroutinefunction(fn) or (
        callable(fn) and not isinstance(fn, type) and inspect.iscoroutinefunction(type(fn).__call__)
    )


def _accepts(fn: Callable[..., Any], n_args: int) -> bool:
    try:
        inspect.signature(fn).bind(*([None] * n_args))
    except TypeError:
        return False
    except ValueError:  # no signature to inspect (some builtins): give it the benefit of the doubt
        return True
    return True


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"handler name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
    return name


def _check_settings_model(name: str, model: object) -> type[BaseSettings] | None:
    if model is None:
        return None
    if not (isinstance(model, type) and issubclass(model, BaseSettings)):
        raise ConfigError(f"handler {name!r}: settings must be a pydantic-settings BaseSettings subclass")
    return model


@dataclass(frozen=True)
class HandlerSpec:
    """A handler as the worker knows it: what it wants and how to build it.

    ``@handler`` and :meth:`from_class` make one; an entry point in the
    ``flexworker.handlers`` group may name a spec, a :class:`Handler` subclass, or
    (the older form) a factory ``Callable[[Settings], object]`` whose result has
    ``name`` and ``async handle(event)``.
    """

    name: str
    subscription: Subscription
    retry: RetryPolicy
    settings_model: type[BaseSettings] | None
    env_prefix: str
    #: builds the runtime handler from flexworker's settings and the handler's own.
    factory: Callable[[FlexworkerSettings, Any], Handler] = field(repr=False)
    #: function style: the decorated function (call the spec to run it in tests).
    fn: HandleFn | None = field(default=None, repr=False)
    #: ``module:qualname`` of the definition, for ``flexworker handlers``.
    origin: str = ""

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_settings_model(self.name, self.settings_model)

    def create(self, settings: FlexworkerSettings, handler_settings: Any = None) -> Handler:
        """The runtime handler instance."""
        return self.factory(settings, handler_settings)

    async def __call__(self, ctx: HandlerContext) -> None:
        """Run a function-style handler directly (handy in a plugin's own tests)."""
        if self.fn is None:
            raise TypeError(f"handler {self.name!r} is class-style; create() it and call handle()")
        await self.fn(ctx)

    @classmethod
    def from_class(cls, handler_class: type[Handler]) -> HandlerSpec:
        """The spec of a :class:`Handler` subclass; its methods are checked here."""
        name = _check_name(getattr(handler_class, "name", None))
        _check_handler_class(handler_class, name)
        return cls(
            name=name,
            subscription=handler_class.subscription,
            retry=handler_class.retry,
            settings_model=_check_settings_model(name, handler_class.Settings),
            env_prefix=handler_class.env_prefix or default_env_prefix(name),
            factory=handler_class,
            origin=f"{handler_class.__module__}:{handler_class.__qualname__}",
        )


def _check_handler_class(handler_class: type[Handler], name: str) -> None:
    """A class-style handler's methods are async with the right parameters."""
    label = handler_class.__qualname__
    if handler_class.handle is Handler.handle:
        raise ConfigError(f"handler {name!r}: {label} does not define handle(ctx)")
    for method, n_args in (("handle", 2), ("startup", 1), ("shutdown", 1)):
        fn = getattr(handler_class, method)
        wanted = "(self, ctx)" if n_args == 2 else "(self)"
        if not (_is_async(fn) and _accepts(fn, n_args)):
            raise ConfigError(f"handler {name!r}: {label}.{method} must be async def {method}{wanted}")
    if not isinstance(handler_class.subscription, Subscription):
        raise ConfigError(f"handler {name!r}: subscription must be a Subscription")
    if not isinstance(handler_class.retry, RetryPolicy):
        raise ConfigError(f"handler {name!r}: retry must be a RetryPolicy")


def handler(
    name: str,
    *,
    transitions: Sequence[str] = ("*",),
    processes: Sequence[str] = ("*",),
    predicate: Predicate | None = None,
    settings: type[BaseSettings] | None = None,
    env_prefix: str | None = None,
    retry: RetryPolicy | None = None,
) -> Callable[[HandleFn], HandlerSpec]:
    """Make ``async def fn(ctx: HandlerContext) -> None`` a handler; returns its :class:`HandlerSpec`.

    ``settings`` is the handler's own pydantic-settings model, read at start-up from
    the environment with ``env_prefix`` (default ``FLEXWORKER_HANDLER_<NAME>_``) and
    handed over as ``ctx.handler_settings``; invalid settings stop the worker.
    """
    _check_name(name)
    subscription = Subscription(transitions=transitions, processes=processes, predicate=predicate)
    policy = retry if retry is not None else RetryPolicy()
    model = _check_settings_model(name, settings)

    def decorate(fn: HandleFn) -> HandlerSpec:
        label = getattr(fn, "__qualname__", repr(fn))
        if not _is_async(fn):
            raise ConfigError(f"handler {name!r}: {label} must be async def fn(ctx)")
        if not _accepts(fn, 1):
            raise ConfigError(f"handler {name!r}: {label} must take exactly one argument (ctx)")

        def build(app_settings: FlexworkerSettings, handler_settings: Any) -> Handler:
            return _FunctionHandler(name, fn, app_settings, handler_settings)

        return HandlerSpec(
            name=name,
            subscription=subscription,
            retry=policy,
            settings_model=model,
            env_prefix=env_prefix or default_env_prefix(name),
            factory=build,
            fn=fn,
            origin=f"{getattr(fn, '__module__', '?')}:{label}",
        )

    return decorate
