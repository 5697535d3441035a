"""Settings, read from the environment, a ``.env`` file and a secrets directory.

Precedence, highest first: keyword arguments, environment variables, ``.env`` in
the working directory, files in the secrets directory (Kubernetes mounts each
secret as a file named after the variable, e.g. ``/run/secrets/SHARETRIBE_CLIENT_SECRET``;
the directory is ``$FLEXWORKER_SECRETS_DIR``, default ``/run/secrets``, used when it exists).

The Sharetribe credentials and ``REDIS_URL`` use their customary names; every
other variable is ``FLEXWORKER_`` + the field name in upper case. :func:`load_settings`
turns any problem into a one-line :class:`~worker.errors.ConfigError` naming the
variable, and never echoes a secret's value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.errors import ConfigError

__all__ = ["DEFAULT_API_BASE_URL", "DEFAULT_SECRETS_DIR", "Settings", "load_settings", "setting_problem"]

DEFAULT_API_BASE_URL = "https://flex-integ-api.sharetribe.com"
DEFAULT_SECRETS_DIR = "/run/secrets"


def _env(name: str) -> Any:
    """Field option binding a field to one customary, unprefixed variable name."""
    return AliasChoices(name.lower(), name)


class Settings(BaseSettings):
    """Everything flexworker can be configured with (see README's table)."""

    model_config = SettingsConfigDict(
        env_prefix="FLEXWORKER_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
    )

    sharetribe_client_id: str = Field(
        validation_alias=_env("SHARETRIBE_CLIENT_ID"),
        min_length=1,
        description="Integration API application's client id.",
    )
    sharetribe_client_secret: SecretStr = Field(
        validation_alias=_env("SHARETRIBE_CLIENT_SECRET"),
        description="Integration API application's client secret.",
    )
    sharetribe_api_base_url: str = Field(
        default=DEFAULT_API_BASE_URL,
        validation_alias=_env("SHARETRIBE_API_BASE_URL"),
        description="Integration API base URL; point it at `flexworker sim` for local runs.",
    )
    redis_url: str = Field(
        default="redis://localhost:6379/0",
        validation_alias=_env("REDIS_URL"),
        repr=False,  # may carry a password
        description="Redis holding the queue, cursors and idempotency records.",
    )
    rate_limit: Literal["dev", "prod", "off"] = Field(
        default="dev",
        description="Client-side rate-limit preset: the official SDK's dev or prod buckets, or off.",
    )
    api_format: Literal["json", "transit"] = Field(
        default="json", description="Wire format asked of the API."
    )
    http_timeout_s: float = Field(default=30.0, gt=0, description="Whole-request timeout.")
    http_connect_timeout_s: float = Field(default=10.0, gt=0, description="Connection timeout.")
    http_max_connections: int = Field(
        default=10, ge=1, le=10, description="Concurrent connections to the API (Sharetribe allows 10)."
    )
    api_retry_max_attempts: int = Field(default=6, ge=1, description="Attempts per API call, first included.")
    api_retry_base_s: float = Field(default=0.5, gt=0, description="First backoff step.")
    api_retry_cap_s: float = Field(default=30.0, gt=0, description="Longest single backoff.")
    api_retry_max_total_s: float = Field(
        default=120.0, gt=0, description="Time budget of one call: rate-limit, token and retry waits."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")

    # Poller, queue and worker.
    namespace: str = Field(
        default="default",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Names this marketplace's keys in Redis; one poller runs per namespace.",
    )
    source: Literal["transactions", "events"] = Field(
        default="transactions", description="Where the poller reads transitions from."
    )
    lookback_s: float = Field(
        default=5.0, gt=0, le=3600, description="Transactions source: re-read this far behind the watermark."
    )
    api_page_cap: int = Field(
        default=10_000, ge=1, description="Items a query can reach by paging (deeper backlogs go by windows)."
    )
    idle_interval_s: float = Field(default=10.0, gt=0, description="Pause between polls when caught up.")
    seen_retention_s: float = Field(
        default=7 * 86400,
        ge=7200,
        description="How long the queue remembers an enqueued event key (at least 2 h).",
    )
    idempotency_retention_s: float = Field(
        default=30 * 86400,
        gt=0,
        description="How long a handler's done record and step results are kept (at least seen_retention_s).",
    )
    lease_ttl_s: float = Field(default=30.0, gt=0, description="Poller lease lifetime; renewed at a third.")
    include: Annotated[list[Literal["customer", "provider", "listing"]], NoDecode] = Field(
        default_factory=list, description="Related resources to snapshot into each event (comma-separated)."
    )
    handlers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["log"], description="Enabled handlers, comma-separated."
    )
    jsonl_path: str = Field(
        default="flexworker-events.jsonl", description="File the `jsonl` handler appends events to."
    )
    sentry_dsn: SecretStr | None = Field(
        default=None,
        description="When set, the worker reports dead-lettered events to this Sentry project.",
    )
    worker_max_jobs: int = Field(default=10, ge=1, description="Jobs one worker runs at once.")
    redis_outage_limit_s: float = Field(
        default=300.0, gt=0, description="How long the worker waits out an unreachable Redis before it stops."
    )

    @field_validator("sharetribe_api_base_url", mode="after")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1]) == 0:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("redis_url", mode="after")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("idempotency_retention_s", mode="after")
    @classmethod
    def _check_idempotency_retention(cls, value: float, info: ValidationInfo) -> float:
        # A done record that expired before the queue forgot the event would let a
        # re-queued copy run the handler a second time.
        seen_s = info.data.get("seen_retention_s")
        if seen_s is not None and value < seen_s:
            raise ValueError(f"must be at least FLEXWORKER_SEEN_RETENTION_S ({seen_s:g} s)")
        return value

    @field_validator("include", "handlers", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def redis_prefix(self) -> str:
        """Prefix of every Redis key of this namespace."""
        return f"flexworker:{self.namespace}"

    @property
    def queue_name(self) -> str:
        return f"{self.redis_prefix}:queue"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def _variable_name(loc: str) -> str:
    """The environment variable behind an error location (a field name or an alias)."""
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            if loc == name or loc in alias.choices:
                return str(alias.choices[-1])
        elif loc == name:
            return "FLEXWORKER_" + name.upper()
    return loc


def load_settings(
    *,
    env_file: str | Path | None = ".env",
    secrets_dir: str | Path | None = None,
    **overrides: Any,
) -> Settings:
    """Read the settings or raise :class:`ConfigError` with one line naming the culprit."""
    if secrets_dir is None:
        secrets_dir = os.environ.get("FLEXWORKER_SECRETS_DIR", DEFAULT_SECRETS_DIR)
    secrets = secrets_dir if Path(secrets_dir).is_dir() else None
    try:
        return Settings(_env_file=env_file, _secrets_dir=secrets, **overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = _variable_name(str(first["loc"][0])) if first["loc"] else "settings"
        raise ConfigError(f"setting {name} {setting_problem(exc)}") from None


def setting_problem(exc: ValidationError) -> str:
    """What is wrong with the first invalid setting, in words, and how many more are wrong.

    A pydantic message never contains the input value, so secrets stay out of it.
    """
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "missing":
        problem = "is required but not set"
    else:
        msg = str(first["msg"]).removeprefix("Value error, ")
        problem = f"is invalid: {msg[:1].lower()}{msg[1:]}"
    more = len(errors) - 1
    return problem + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
