"""Settings: sources, precedence, validation and one-line errors that never leak secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.settings import DEFAULT_API_BASE_URL, load_settings

SECRET = "very-secret-value-123"
ALL_VARS = ("SHARETRIBE_CLIENT_ID", "SHARETRIBE_CLIENT_SECRET", "SHARETRIBE_API_BASE_URL", "REDIS_URL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("FLEXWORKER_") or name in ALL_VARS:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env from the developer's checkout


def test_reads_environment_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARETRIBE_CLIENT_ID", "abc")
    monkeypatch.setenv("SHARETRIBE_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("FLEXWORKER_RATE_LIMIT", "prod")
    settings = load_settings(secrets_dir="/nonexistent")
    assert settings.sharetribe_client_id == "abc"
    assert settings.sharetribe_client_secret.get_secret_value() == SECRET
    assert settings.rate_limit == "prod"
    assert settings.sharetribe_api_base_url == DEFAULT_API_BASE_URL
    assert settings.http_max_connections == 10


def test_secret_never_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARETRIBE_CLIENT_ID", "abc")
    monkeypatch.setenv("SHARETRIBE_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@localhost:6379/0")
    settings = load_settings(secrets_dir="/nonexistent")
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert "hunter2" not in repr(settings)


def test_dotenv_file_and_env_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "SHARETRIBE_CLIENT_ID=from-dotenv\nSHARETRIBE_CLIENT_SECRET=x\nFLEXWORKER_HTTP_TIMEOUT_S=7\n"
    )
    monkeypatch.setenv("SHARETRIBE_CLIENT_ID", "from-env")
    settings = load_settings(secrets_dir="/nonexistent")
    assert settings.sharetribe_client_id == "from-env"
    assert settings.http_timeout_s == 7.0


def test_secrets_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "SHARETRIBE_CLIENT_SECRET").write_text(SECRET)
    (secrets / "SHARETRIBE_CLIENT_ID").write_text("from-file")
    monkeypatch.setenv("FLEXWORKER_SECRETS_DIR", str(secrets))
    settings = load_settings()
    assert settings.sharetribe_client_id == "from-file"
    assert settings.sharetribe_client_secret.get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"SHARETRIBE_CLIENT_ID": None, "SHARETRIBE_CLIENT_SECRET": None},
            "setting SHARETRIBE_CLIENT_ID is required but not set (and 1 more problem)",
        ),
        ({"SHARETRIBE_CLIENT_SECRET": None}, "setting SHARETRIBE_CLIENT_SECRET is required but not set"),
        ({"FLEXWORKER_RATE_LIMIT": "fast"}, "setting FLEXWORKER_RATE_LIMIT is invalid: input should be"),
        ({"FLEXWORKER_HTTP_MAX_CONNECTIONS": "50"}, "setting FLEXWORKER_HTTP_MAX_CONNECTIONS is invalid"),
        (
            {"SHARETRIBE_API_BASE_URL": "ftp://x"},
            "setting SHARETRIBE_API_BASE_URL is invalid: must be an http",
        ),
        ({"REDIS_URL": "localhost:6379"}, "setting REDIS_URL is invalid"),
        ({"FLEXWORKER_HTTP_TIMEOUT_S": "-1"}, "setting FLEXWORKER_HTTP_TIMEOUT_S is invalid"),
    ],
)
def test_invalid_settings_give_one_line(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str | None], expected: str
) -> None:
    base: dict[str, str | None] = {"SHARETRIBE_CLIENT_ID": "a", "SHARETRIBE_CLIENT_SECRET": SECRET}
    for name, value in {**base, **env}.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings(secrets_dir="/nonexistent")
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message
    assert SECRET not in message


def test_cli_reports_missing_setting_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXWORKER_") and k not in ALL_VARS}
    env["FLEXWORKER_SECRETS_DIR"] = str(tmp_path / "none")
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "check"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "flexworker: error: setting SHARETRIBE_CLIENT_ID is required but not set (and 1 more problem)"
    ]
    assert "Traceback" not in result.stderr
