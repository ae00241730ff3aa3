"""Running a CPU range kernel over threads.

Every CPU kernel is an ``@njit(nogil=True, cache=True)`` function whose last two arguments are a
range of work items, ``kernel(*args, start, stop)``. ``launch`` runs items ``[0, n)``:

- on the calling thread alone when the estimated single-thread time is below ``SERIAL_US`` or
  numba allows one thread (``numba.set_num_threads`` / ``NUMBA_NUM_THREADS``);
- otherwise in ``4 x threads`` contiguous chunks that the calling thread and ``threads - 1`` pool
  threads take one at a time until none is left (dynamic scheduling). A thread that the OS does
  not run (another process holds its core) takes no chunk, and the call never waits for a thread
  that has not started: it waits only for chunks in flight.

Why not ``prange``: a ``parallel=True`` kernel gives each thread a fixed share, so one descheduled
thread stalls the whole call by a scheduler time slice (milliseconds, ~100x a small decode), and
its compile costs more (the parfor passes, and LLVM optimizing the kernel body once per linked
library).
"""
from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numba

# Below this estimated single-thread time (microseconds) a call runs on the calling thread: a
# second thread saves at most half of it, and waking one costs tens of microseconds (much more
# when another process holds the other core).
SERIAL_US = 300.0
CHUNKS_PER_THREAD = 4

_pool = None
_pool_lock = threading.Lock()


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, numba.config.NUMBA_NUM_THREADS - 1)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="paged_numba")
        return _pool


class _Run:
    """One launch: the chunk bounds, the next chunk to take, and the count of finished chunks."""

    def __init__(self, kernel, args, bounds):
        self.kernel, self.args, self.bounds = kernel, args, bounds
        self.chunks = len(bounds) - 1
        self.next = itertools.count()   # next() is atomic under the GIL
        self.done = 0
        self.error = None
        self.cv = threading.Condition()

    def work(self):
        finished = 0
        while True:
            c = next(self.next)
            if c >= self.chunks:
                break
            try:
                if self.error is None:
                    self.kernel(*self.args, self.bounds[c], self.bounds[c + 1])
            except BaseException as e:  # handed to the caller
                self.error = e
            finished += 1
        if finished:
            with self.cv:
                self.done += finished
                self.cv.notify_all()

    def wait(self):
        with self.cv:
            while self.done < self.chunks:
                self.cv.wait()
        if self.error is not None:
            raise self.error


def launch(kernel, args: tuple, n: int, est_us: float) -> None:
    """Run ``kernel(*args, start, stop)`` over work items ``[0, n)``; ``est_us`` is the estimated
    single-thread time of the whole call in microseconds (it picks serial or threaded)."""
    if n <= 0:
        return
    threads = min(numba.get_num_threads(), n)
    if threads <= 1 or est_us < SERIAL_US:
        kernel(*args, 0, n)
        return
    chunks = min(n, threads * CHUNKS_PER_THREAD)
    run = _Run(kernel, args, [n * c // chunks for c in range(chunks + 1)])
    pool = _get_pool()
    for _ in range(threads - 1):
        pool.submit(run.work)
    run.work()
    run.wait()
