"""Handler plugins for the registry tests, loaded through hand-made entry points."""
