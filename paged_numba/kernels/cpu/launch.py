"""Running a CPU kernel: one thread for small calls, several for the rest.

Every CPU kernel is an ``@njit`` function whose last two arguments are a range of work items,
``kernel(*args, start, stop)``; ``launch`` runs items ``[0, n)``. When the estimated
single-thread time of the call is below ``SERIAL_US`` it runs on the calling thread alone. Above
it, two kinds of kernels:

- ``parallel=True`` kernels (the forward, write_kv, the FP8 encode) loop ``prange(start, stop)``
  on numba's thread pool; for a small call ``launch`` sets ``numba.set_num_threads(1)`` (the count
  is per calling thread, so concurrent callers are unaffected; with numba's default OpenMP
  threading layer a one-thread region runs on the calling thread, waking no worker).
- serial ``nogil=True`` kernels (the backward) loop ``range(start, stop)``; ``launch`` splits the
  items into ``CHUNKS_PER_THREAD`` chunks per thread that the calling thread and a pool of worker
  threads take one at a time from a shared counter until none are left (the kernels release the
  GIL, so they run in parallel). Compiling the parallel form of the backward's kernels (parfor
  lowering, the gufunc wrapper) took twice the serial form's time -- the first backward 15.0 s
  against 7.0 s on the 2-core development machine, at the same speed after -- and cold start is
  what a new user meets first. The forward keeps ``prange``: its serial form ran the causal
  prefill at half the speed (LLVM optimizes the outlined parfor body better), not yet understood.

Either way the thread count is numba's (``NUMBA_NUM_THREADS``, ``numba.set_num_threads``).
Why one thread for small calls: a ``prange`` loop gives every thread a fixed share of the items.
When another process holds one of the cores, the share of the thread waiting for that core starts
a scheduler time slice later -- milliseconds, about 100x a small decode. Splitting a
sub-millisecond call over threads gains at most half of it; waiting for a descheduled thread costs
far more.
"""
from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numba

# Below this estimated single-thread time (microseconds) a call runs on one thread: at most
# ~0.5 ms lost on an idle machine, against several ms of waiting for a descheduled thread on a
# busy one (benchmarks/results/cpu_under_load.md).
SERIAL_US = 1000.0
CHUNKS_PER_THREAD = 4

_pool = None
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    """The process's worker threads for serial kernels (``NUMBA_NUM_THREADS - 1``, created on first
    use)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                           thread_name_prefix="paged_numba")
    return _pool


def launch(kernel, args: tuple, n: int, est_us: float) -> None:
    """Run ``kernel(*args, 0, n)``; ``est_us`` is the estimated single-thread time of the whole
    call in microseconds (it picks one thread or several)."""
    if n <= 0:
        return
    if getattr(kernel, "targetoptions", {"parallel": True}).get("parallel"):
        _launch_prange(kernel, args, n, est_us)
    else:
        _launch_chunks(kernel, args, n, est_us)


def _launch_prange(kernel, args, n, est_us):
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


def _launch_chunks(kernel, args, n, est_us):
    threads = min(numba.get_num_threads(), n)
    if est_us < SERIAL_US or threads <= 1:
        kernel(*args, 0, n)
        return
    chunks = min(n, threads * CHUNKS_PER_THREAD)
    bounds = [n * i // chunks for i in range(chunks + 1)]
    counter = itertools.count()     # next() is atomic under the GIL

    def work():
        while True:
            i = next(counter)
            if i >= chunks:
                return
            kernel(*args, bounds[i], bounds[i + 1])

    futures = [_workers().submit(work) for _ in range(threads - 1)]
    err = None
    try:
        work()
    except BaseException as exc:   # let the workers finish their chunks before raising
        err = exc
    for f in futures:
        try:
            f.result()
        except BaseException as exc:
            err = err or exc
    if err is not None:
        raise err
