"""Finding, checking and building handlers through the ``flexworker.handlers`` entry points.

Built-in handlers register in our own ``pyproject.toml`` exactly like third-party
plugins do in theirs, so there is one way in. An entry point may name:

- a :class:`~worker.plugin.HandlerSpec` (what ``@handler`` returns),
- a :class:`~worker.plugin.Handler` subclass, or
- (the older form) a factory ``Callable[[Settings], object]`` whose result has a
  ``name`` and ``async handle(event)``; it gets every event, with the default
  retry policy.

``FLEXWORKER_HANDLERS`` lists the enabled ones. Each enabled handler is imported,
checked (async, the right parameters), its own settings model is read from the
environment with its prefix, and it is built; any problem stops start-up with
one :class:`~worker.errors.ConfigError` line naming the handler and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from worker.errors import ConfigError
from worker.plugin import (
    Handler,
    HandlerContext,
    HandlerSpec,
    RetryPolicy,
    Subscription,
    _accepts,
    _check_handler_class,
    _FunctionHandler,
    _is_async,
    default_env_prefix,
)
from worker.settings import DEFAULT_SECRETS_DIR, Settings, setting_problem

__all__ = [
    "HANDLER_GROUP",
    "HandlerInfo",
    "LoadedHandler",
    "activate",
    "describe_handlers",
    "installed_handlers",
    "load_handler_settings",
    "load_handlers",
]

HANDLER_GROUP = "flexworker.handlers"


@dataclass(frozen=True)
class LoadedHandler:
    """An enabled handler, built and ready: its spec, instance and own settings."""

    spec: HandlerSpec
    handler: Handler
    handler_settings: Any

    @property
    def name(self) -> str:
        return self.spec.name


class _LegacyHandler(Handler):
    """A handler of the older form: ``name`` and ``async handle(event)``."""

    def __init__(self, wrapped: Any, settings: Settings) -> None:
        super().__init__(settings)
        self.name = str(wrapped.name)
        self.wrapped = wrapped

    async def startup(self) -> None:
        startup = getattr(self.wrapped, "startup", None)
        if startup is not None:
            await startup()

    async def shutdown(self) -> None:
        shutdown = getattr(self.wrapped, "shutdown", None)
        if shutdown is not None:
            await shutdown()

    async def handle(self, ctx: HandlerContext) -> None:
        await self.wrapped.handle(ctx.event)


def installed_handlers() -> dict[str, EntryPoint]:
    """Every handler entry point installed, by name."""
    return {ep.name: ep for ep in entry_points(group=HANDLER_GROUP)}


def _problem(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _spec_of_instance(instance: Handler) -> HandlerSpec:
    """The spec of an already built handler: its class's checks, its instance's name."""
    cls = type(instance)
    if not isinstance(instance, _LegacyHandler | _FunctionHandler):
        _check_handler_class(cls, instance.name)
    return HandlerSpec(
        name=instance.name,
        subscription=cls.subscription,
        retry=cls.retry,
        settings_model=cls.Settings,
        env_prefix=cls.env_prefix or default_env_prefix(instance.name),
        factory=lambda _settings, _handler_settings: instance,
        origin=f"{cls.__module__}:{cls.__qualname__}",
    )


def _legacy(obj: Any, settings: Settings) -> LoadedHandler:
    """Wrap an older-form handler object, with the same checks as the new forms."""
    name = getattr(obj, "name", None)
    label = type(obj).__qualname__
    handle = getattr(obj, "handle", None)
    if not isinstance(name, str) or handle is None:
        raise ConfigError(f"handler {name or label!r}: {label} has no name and async handle(event) method")
    for method, n_args in (("handle", 1), ("startup", 0), ("shutdown", 0)):
        fn = getattr(obj, method, None)
        if fn is not None and not (_is_async(fn) and _accepts(fn, n_args)):
            wanted = "(self, event)" if n_args else "(self)"
            raise ConfigError(f"handler {name!r}: {label}.{method} must be async def {method}{wanted}")
    wrapper = _LegacyHandler(obj, settings)
    spec = HandlerSpec(
        name=name,
        subscription=Subscription(),
        retry=RetryPolicy(),
        settings_model=None,
        env_prefix=default_env_prefix(name),
        factory=lambda _settings, _handler_settings: wrapper,
        origin=f"{type(obj).__module__}:{label}",
    )
    return LoadedHandler(spec, wrapper, None)


def _secrets_dir(secrets_dir: str | Path | None) -> str | Path | None:
    if secrets_dir is None:
        secrets_dir = os.environ.get("FLEXWORKER_SECRETS_DIR", DEFAULT_SECRETS_DIR)
    return secrets_dir if Path(secrets_dir).is_dir() else None


def load_handler_settings(
    spec: HandlerSpec, *, env_file: str | Path | None = ".env", secrets_dir: str | Path | None = None
) -> BaseSettings | None:
    """The handler's own settings, read from the environment with its prefix.

    Like flexworker's settings they also come from ``.env`` and the secrets
    directory, unless the model's own config names others. A problem is one
    :class:`ConfigError` line naming the handler and the variable, never its value.
    """
    model = spec.settings_model
    if model is None:
        return None
    kwargs: dict[str, Any] = {"_env_prefix": spec.env_prefix}
    if model.model_config.get("env_file") is None:
        kwargs["_env_file"] = env_file
    if model.model_config.get("secrets_dir") is None:
        kwargs["_secrets_dir"] = _secrets_dir(secrets_dir)
    try:
        return model(**kwargs)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = str(first["loc"][0]) if first["loc"] else ""
        field = model.model_fields.get(loc)
        if not loc:
            variable = f"{spec.env_prefix}*"
        elif field is not None and field.validation_alias is None and field.alias is None:
            variable = (spec.env_prefix + loc).upper()
        else:
            variable = loc.upper()
        raise ConfigError(f"handler {spec.name!r} setting {variable} {setting_problem(exc)}") from None
    except Exception as exc:
        raise ConfigError(f"handler {spec.name!r} settings could not be read: {type(exc).__name__}") from exc


def _resolve(obj: Any, settings: Settings, *, env_file: str | Path | None) -> LoadedHandler:
    if isinstance(obj, LoadedHandler):
        return obj
    if isinstance(obj, HandlerSpec):
        handler_settings = load_handler_settings(obj, env_file=env_file)
        return LoadedHandler(obj, obj.create(settings, handler_settings), handler_settings)
    if isinstance(obj, type) and issubclass(obj, Handler):
        return _resolve(HandlerSpec.from_class(obj), settings, env_file=env_file)
    if isinstance(obj, Handler):
        return LoadedHandler(_spec_of_instance(obj), obj, obj.handler_settings)
    if hasattr(obj, "handle") and not isinstance(obj, type):
        return _legacy(obj, settings)
    if callable(obj):
        # The older form: a factory taking the settings.
        product = obj(settings)
        if isinstance(product, Handler) or hasattr(product, "handle"):
            return _resolve(product, settings, env_file=env_file)
        raise ConfigError(f"handler factory {obj!r} returned {type(product).__name__}, not a handler")
    raise ConfigError(
        f"{obj!r} is not a handler (a HandlerSpec, a Handler subclass, or a factory of objects with handle)"
    )


def activate(obj: Any, settings: Settings, *, env_file: str | Path | None = ".env") -> LoadedHandler:
    """Build a handler from any accepted form (spec, class, instance, older factory or object).

    An already :class:`LoadedHandler` is returned as it is.

    ``run_worker(handlers=...)`` takes these directly, so tests and the demo can
    pass handlers that are not installed.
    """
    return _resolve(obj, settings, env_file=env_file)


def _import(name: str, entry: EntryPoint) -> Any:
    try:
        return entry.load()
    except ConfigError as exc:
        # ``@handler`` checks at import time, and its message already names the handler.
        text = str(exc)
        raise ConfigError(
            text if text.startswith(f"handler {name!r}") else f"handler {name!r}: {text}"
        ) from exc
    except Exception as exc:
        raise ConfigError(f"handler {name!r} failed to import: {_problem(exc)}") from exc


def _load_one(name: str, entry: EntryPoint, settings: Settings, env_file: str | Path | None) -> LoadedHandler:
    obj = _import(name, entry)
    try:
        loaded = _resolve(obj, settings, env_file=env_file)
    except ConfigError as exc:
        text = str(exc)
        named = text if text.startswith(f"handler {name!r}") else f"handler {name!r}: {text}"
        raise ConfigError(named) from exc
    except Exception as exc:
        raise ConfigError(f"handler {name!r} failed to load: {_problem(exc)}") from exc
    if loaded.name != name:
        raise ConfigError(f"handler {name!r}: the entry point names a handler called {loaded.name!r}")
    return loaded


def load_handlers(settings: Settings, *, env_file: str | Path | None = ".env") -> list[LoadedHandler]:
    """Build the handlers ``settings.handlers`` enables, in that order."""
    installed = installed_handlers()
    loaded: list[LoadedHandler] = []
    for name in settings.handlers:
        entry = installed.get(name)
        if entry is None:
            known = ", ".join(sorted(installed)) or "none"
            raise ConfigError(f"handler {name!r} is not installed (installed: {known})")
        loaded.append(_load_one(name, entry, settings, env_file))
    return loaded


@dataclass(frozen=True)
class HandlerInfo:
    """One installed handler, for ``flexworker handlers``."""

    name: str
    distribution: str
    target: str
    enabled: bool
    subscription: str
    retry: str
    #: why it cannot be used, when it cannot.
    problem: str | None = None


def describe_handlers(settings: Settings, *, env_file: str | Path | None = ".env") -> list[HandlerInfo]:
    """Every installed handler; enabled ones are built, so their problems show."""
    infos = []
    for name, entry in sorted(installed_handlers().items()):
        dist = f"{entry.dist.name} {entry.dist.version}" if entry.dist is not None else "?"
        enabled = name in settings.handlers
        subscription = retry = "-"
        problem = None
        try:
            obj = _import(name, entry)
            spec: HandlerSpec | None = None
            if isinstance(obj, HandlerSpec):
                spec = obj
            elif isinstance(obj, type) and issubclass(obj, Handler):
                spec = HandlerSpec.from_class(obj)
            if spec is not None:
                subscription, retry = spec.subscription.describe(), spec.retry.describe()
            else:
                subscription, retry = Subscription().describe() + " (older form)", RetryPolicy().describe()
            if enabled:
                _load_one(name, entry, settings, env_file)
        except ConfigError as exc:
            problem = str(exc)
        except Exception as exc:
            problem = f"handler {name!r} failed to load: {_problem(exc)}"
        infos.append(HandlerInfo(name, dist, entry.value, enabled, subscription, retry, problem))
    return infos
