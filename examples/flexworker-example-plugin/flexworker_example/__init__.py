"""An example flexworker handler plugin."""
