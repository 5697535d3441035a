"""A private ``redis-server`` process on a free port, for tests and the demo.

Tests must be able to stop, kill and restart their Redis and never share state, so
each gets its own server in its own directory. With ``persist=True`` the server
keeps an append-only file, so data survives :meth:`RedisServer.restart` and
:meth:`RedisServer.kill` the way a production Redis with AOF would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from worker.errors import ConfigError, FlexworkerError

__all__ = ["RedisServer", "RedisServerError", "free_port"]

INSTALL_HINT = (
    "install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or set REDIS_URL"
)


class RedisServerError(FlexworkerError):
    """The private redis-server could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """Start, stop, kill and restart one private redis-server."""

    def __init__(
        self,
        *,
        port: int | None = None,
        directory: Path | None = None,
        persist: bool = False,
        executable: str = "redis-server",
    ) -> None:
        found = shutil.which(executable)
        if found is None:
            raise ConfigError(f"{executable} not found on PATH: {INSTALL_HINT}")
        self._executable = found
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="flexworker-redis-"))
        self.persist = persist
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        args = [
            self._executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    break
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.02)  # the server is still starting: nothing to wait on but the socket
        finally:
            client.close()
        log = self.directory / "redis.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        self.stop()
        reason = " ".join(tail) or "no log"
        raise RedisServerError(f"redis-server on port {self.port} did not start: {reason}")

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM)."""
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def kill(self) -> None:
        """Die at once (SIGKILL), as in a crash."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None

    def restart(self, *, timeout_s: float = 10.0) -> None:
        self.stop()
        self.start(timeout_s=timeout_s)

    def close(self) -> None:
        """Stop the server and remove its directory if we made it."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
