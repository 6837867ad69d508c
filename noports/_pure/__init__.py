"""Pure-Python twins of the compiled data-plane modules (same API, same tests)."""
