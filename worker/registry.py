"""Finding and loading handlers through the ``flexworker.handlers`` entry points.

Built-in handlers register in our own ``pyproject.toml`` exactly like third-party
plugins do in theirs, so there is one way in. An entry point names a factory (a
class or function) that takes the :class:`~worker.settings.Settings` and returns a
:class:`Handler`. A handler that is not installed, fails to import or fails to
build stops start-up with one line naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Protocol, runtime_checkable

from worker.errors import ConfigError
from worker.events import TransitionEvent
from worker.settings import Settings

__all__ = ["HANDLER_GROUP", "Handler", "HandlerFactory", "installed_handlers", "load_handlers"]

HANDLER_GROUP = "flexworker.handlers"


@runtime_checkable
class Handler(Protocol):
    """Something that acts on each transition event."""

    name: str

    async def handle(self, event: TransitionEvent) -> None: ...


HandlerFactory = Callable[[Settings], Handler]


def installed_handlers() -> dict[str, EntryPoint]:
    """Every handler entry point installed, by name."""
    return {ep.name: ep for ep in entry_points(group=HANDLER_GROUP)}


def load_handlers(settings: Settings) -> list[Handler]:
    """Build the handlers ``settings.handlers`` enables, in that order."""
    installed = installed_handlers()
    handlers: list[Handler] = []
    for name in settings.handlers:
        entry = installed.get(name)
        if entry is None:
            known = ", ".join(sorted(installed)) or "none"
            raise ConfigError(f"handler {name!r} is not installed (installed: {known})")
        try:
            factory = entry.load()
            handler = factory(settings)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"handler {name!r} failed to load: {type(exc).__name__}: {exc}") from exc
        if not isinstance(handler, Handler):
            raise ConfigError(f"handler {name!r} has no async handle(event) method")
        handlers.append(handler)
    return handlers
