"""Built-in handler plugins (registered through entry points like third-party ones)."""

__all__: list[str] = []
