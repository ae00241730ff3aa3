"""The one timing module of the benchmarks: wall clock, CUDA events (torch or numba), and GPU
kernel time from the CUPTI trace of torch's profiler when torch is there.

Every function returns seconds; ``*_stats`` variants return (median, (p90 - p10) / median).
"""
from __future__ import annotations

import re
import time

import numpy as np


def stats(times):
    """(median, (p90 - p10) / median) of a list of times."""
    t = np.asarray(times, dtype=np.float64)
    med = float(np.median(t))
    spread = float((np.percentile(t, 90) - np.percentile(t, 10)) / med) if med > 0 else 0.0
    return med, spread


def wall_once(fn) -> float:
    """Host wall time of one ``fn()``."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_wall(fn, reps, sync=None, warmup=2):
    """(median s, spread) of ``fn(); sync()`` by the host clock."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return stats(times)


def time_events(torch, fn, reps, warmup=3):
    """(median s, spread) of ``fn()`` between two torch CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return stats([s.elapsed_time(e) * 1e-3 for s, e in ev])


def numba_events(cuda, fn, reps, runs=5, stream=0):
    """Median s per call of ``fn()`` over ``runs`` timings of ``reps`` back-to-back calls between two
    numba CUDA events (includes host launch cost whenever it exceeds the GPU time)."""
    start, stop = cuda.event(), cuda.event()
    fn()
    cuda.synchronize()
    times = []
    for _ in range(runs):
        start.record(stream)
        for _ in range(reps):
            fn()
        stop.record(stream)
        stop.synchronize()
        times.append(cuda.event_elapsed_time(start, stop) * 1e-3 / reps)
    return float(np.median(times))


def kernel_time(torch, fn, calls, sync, log=print, per_kernel=False):
    """Mean GPU kernel time per call of ``fn`` from the profiler's CUPTI trace (memcpy / memset
    excluded), or None when torch's profiler is unavailable or sees no kernel. ``per_kernel``: also
    log each kernel's time per call (numba's mangled names shortened), largest first."""
    if torch is None:
        return None
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
                sync()
        total, n, per = 0.0, 0, {}
        for e in prof.events():
            if e.device_type != DeviceType.CUDA or e.name.startswith(("Memcpy", "Memset")):
                continue
            total += e.time_range.elapsed_us()
            n += 1
            found = re.findall(r"([A-Za-z_]+_kernel)", e.name)
            short = found[-1] if found else e.name[:60]
            per[short] = per.get(short, 0.0) + e.time_range.elapsed_us() * 1e-3 / calls
        if per_kernel:
            for name, ms in sorted(per.items(), key=lambda x: -x[1]):
                log(f"    {ms:9.3f} ms  {name}")
        return total * 1e-6 / calls if n else None
    except Exception as exc:  # the profiler is a convenience: never let it sink a row
        log(f"    (kernel-only timing unavailable: {type(exc).__name__}: {exc})")
        return None


def median_times_interleaved(fns, repeat=9, warmup=1) -> list:
    """Median wall time in seconds of each of ``fns``, timed in turn (f0, f1, ..., f0, f1, ...) so
    that a slow spell of a shared machine falls on every variant alike: the ratios of a comparison
    are steadier than from back-to-back runs of one variant after the other."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for t, fn in zip(times, fns):
            t.append(wall_once(fn))
    return [float(np.median(t)) for t in times]


def median_time(fn, repeat=9, warmup=1, sync=None) -> float:
    """Median wall time of ``fn()`` in seconds (``sync()`` after each call, for async devices)."""
    return time_wall(fn, repeat, sync, warmup)[0]
