"""Shared fixtures: the private Redis ones come from flexworker's own pytest plugin."""

pytest_plugins = ["worker.testing"]
