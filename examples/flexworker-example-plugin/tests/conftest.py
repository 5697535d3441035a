"""flexworker's pytest plugin gives a private Redis, event factories and ``deliver``."""

pytest_plugins = ["worker.testing"]
