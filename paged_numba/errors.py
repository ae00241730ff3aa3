"""Exceptions of paged_numba."""


class RuntimeUnavailableError(RuntimeError):
    """A known runtime cannot start here; the message says why and how to fix it."""


class OutOfBlocksError(RuntimeError):
    """A ``PagedKVCache`` has too few free blocks for a request; the cache was left unchanged."""
