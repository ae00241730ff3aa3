"""Exceptions of paged_numba."""


class RuntimeUnavailableError(RuntimeError):
    """A known runtime cannot start here; the message says why and how to fix it."""
