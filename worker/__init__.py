"""flexworker: keeps a Sharetribe marketplace's back office in step with its transactions."""

__all__ = ["__version__"]

__version__ = "0.1.0"
