"""bench/ is collected only when asked for: `pytest bench --benchmark-only`."""
