"""A plugin whose import fails."""

import flexworker_plugin_dependency_that_is_not_installed  # noqa: F401
