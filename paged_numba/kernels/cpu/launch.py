"""Running a CPU kernel: one thread for small calls, numba's thread pool for the rest.

Every CPU kernel is a ``parallel=True`` function whose last two arguments are a range of work
items, ``kernel(*args, start, stop)``, looping ``prange(start, stop)``. ``launch`` runs items
``[0, n)``; when the estimated single-thread time of the call is below ``SERIAL_US`` it runs it
with ``numba.set_num_threads(1)`` for the call (the count is per calling thread, so concurrent
callers are unaffected; with numba's default OpenMP threading layer a one-thread region runs on
the calling thread, waking no worker).

Why: a ``prange`` loop gives every thread a fixed share of the items. When another process holds
one of the cores, the share of the thread waiting for that core starts a scheduler time slice
later -- milliseconds, about 100x a small decode. Splitting a sub-millisecond call over threads
gains at most half of it; waiting for a descheduled thread costs far more.
"""
from __future__ import annotations

import numba

# Below this estimated single-thread time (microseconds) a call runs on one thread: at most
# ~0.5 ms lost on an idle machine, against several ms of waiting for a descheduled thread on a
# busy one (benchmarks/results/cpu_under_load.md).
SERIAL_US = 1000.0


def launch(kernel, args: tuple, n: int, est_us: float) -> None:
    """Run ``kernel(*args, 0, n)``; ``est_us`` is the estimated single-thread time of the whole
    call in microseconds (it picks one thread or numba's thread pool)."""
    if n <= 0:
        return
    if est_us >= SERIAL_US:
        kernel(*args, 0, n)
        return
    saved = numba.get_num_threads()
    if saved == 1:
        kernel(*args, 0, n)
        return
    numba.set_num_threads(1)
    try:
        kernel(*args, 0, n)
    finally:
        numba.set_num_threads(saved)
