"""``python -m paged_numba bench``: time the ops and the PagedKVCache over a set of workloads on one
runtime -- a progress bar while it runs, then a table (median of the repeats after a warm-up).

Workloads: decode attention over the cache (f32, bf16, fp8_e4m3 K/V; throughput = bytes of K/V read
per second), causal prefill attention (GFLOP/s, counting the visible half), cache writes
(``append``: one token per sequence, a whole prompt, an FP8-quantizing write; tokens per second),
and fork + copy-on-write append + free (operations per second). ``--quick`` shrinks the shapes.
"""
from __future__ import annotations

import sys
import time

import numpy as np


def median_time(fn, repeat=5):
    """Median wall time of ``fn()`` in seconds over ``repeat`` calls, after one warm-up call."""
    fn()  # warm-up: compiles on the first call ever (seconds), loads the cache after that
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _progress(i, n, label, width=30, stream=None):
    stream = stream or sys.stderr
    done = width * i // n
    stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label:<44.44s}")
    if i == n:
        stream.write("\n")
    stream.flush()


def _filled_cache(pn, rt, rng, lens, Hkv, D, bs, dtype, extra_blocks=8, **scales):
    N = sum(-(-L // bs) for L in lens) + extra_blocks
    cache = pn.PagedKVCache(N, bs, Hkv, D, dtype, runtime=rt, **scales)
    ids = []
    for L in lens:
        s = cache.add_sequence()
        cache.append(s, rng.standard_normal((L, Hkv, D), dtype=np.float32),
                     rng.standard_normal((L, Hkv, D), dtype=np.float32))
        ids.append(s)
    return cache, ids


def workloads(quick: bool):
    """(label, dtype, shape text, setup) per workload; setup(pn, rt, rng) -> (fn, amount, unit)."""
    if quick:
        B, H, Hkv, D, L, bs, P = 2, 8, 2, 64, 256, 16, 128
    else:
        B, H, Hkv, D, L, bs, P = 4, 32, 8, 128, 2048, 16, 1024
    out = []
    for dtype in ("f32", "bf16", "fp8_e4m3"):
        def decode(pn, rt, rng, dtype=dtype):
            scales = dict(k_scale=4 / 448, v_scale=4 / 448) if dtype.startswith("fp8") else {}
            cache, ids = _filled_cache(pn, rt, rng, [L] * B, Hkv, D, bs, dtype, **scales)
            q = pn.tensor(rng.standard_normal((B, H, 1, D), dtype=np.float32),
                          rt, "f32" if dtype.startswith("fp8") else dtype)

            def fn():
                cache.attention(q, ids)
                rt.synchronize()
            return fn, 2 * B * L * Hkv * D * cache.dtype.itemsize / 1e9, "GB/s"
        out.append(("decode attention", dtype, f"B{B} H{H}/{Hkv} D{D} L{L}", decode))

    def prefill(pn, rt, rng):
        cache, ids = _filled_cache(pn, rt, rng, [P], Hkv, D, bs, "f32")
        q = pn.tensor(rng.standard_normal((1, H, P, D), dtype=np.float32), rt)

        def fn():
            cache.attention(q, ids, causal=True)
            rt.synchronize()
        return fn, 4 * H * D * P * (P + 1) / 2 / 1e9, "GFLOP/s"
    out.append(("causal prefill attention", "f32", f"B1 H{H}/{Hkv} D{D} L{P}", prefill))

    for dtype in ("f32", "fp8_e4m3"):
        def write_step(pn, rt, rng, dtype=dtype):
            scales = dict(k_scale=4 / 448, v_scale=4 / 448) if dtype.startswith("fp8") else {}
            cache, ids = _filled_cache(pn, rt, rng, [bs // 2] * B, Hkv, D, bs, dtype, extra_blocks=B * 8, **scales)
            kv = [pn.tensor(rng.standard_normal((1, Hkv, D), dtype=np.float32), rt) for _ in ids]

            def fn():
                for s, x in zip(ids, kv):
                    cache.append(s, x, x)
                rt.synchronize()
            return fn, B / 1e3, "k tok/s"
        out.append(("append 1 token x B", dtype, f"B{B} Hkv{Hkv} D{D}", write_step))

    def write_prompt(pn, rt, rng):
        cache = pn.PagedKVCache(-(-P // bs) + 1, bs, Hkv, D, runtime=rt)
        k = pn.tensor(rng.standard_normal((P, Hkv, D), dtype=np.float32), rt)

        def fn():
            s = cache.add_sequence()
            cache.append(s, k, k)
            rt.synchronize()
            cache.free(s)
        return fn, P / 1e6, "M tok/s"
    out.append(("append a prompt", "f32", f"T{P} Hkv{Hkv} D{D}", write_prompt))

    def fork_cow(pn, rt, rng):
        cache, ids = _filled_cache(pn, rt, rng, [L + bs // 2], Hkv, D, bs, "f32")
        x = pn.tensor(rng.standard_normal((1, Hkv, D), dtype=np.float32), rt)

        def fn():
            child = cache.fork(ids[0])       # shares L / bs + 1 blocks; the last is half full
            cache.append(child, x, x)        # copies it (copy-on-write), then writes
            rt.synchronize()
            cache.free(child)
        return fn, 1 / 1e3, "k op/s"
    out.append(("fork + CoW append + free", "f32", f"L{L + bs // 2} bs{bs} Hkv{Hkv} D{D}", fork_cow))
    return out


def format_table(rows) -> str:
    head = ("workload", "dtype", "shape", "median", "throughput")
    cells = [(w, dt, sh, f"{t * 1e3:.3f} ms", f"{amount / t:.2f} {unit}") for w, dt, sh, t, amount, unit in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    right = (False, False, False, True, True)

    def line(c):
        return "  ".join(x.rjust(w) if r else x.ljust(w) for x, w, r in zip(c, widths, right)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in cells])


def bench(runtime=None, quick: bool = False, stream=None) -> int:
    import paged_numba as pn

    rt = pn.get_runtime(runtime)
    print(f"paged_numba {pn.__version__} bench on runtime {rt.name!r} ({rt.device})"
          f"{' -- quick shapes' if quick else ''}")
    rng = np.random.default_rng(0)
    todo = workloads(quick)
    repeat = 3 if quick else 10
    rows = []
    for i, (label, dtype, shape, setup) in enumerate(todo):
        _progress(i, len(todo), f"{label} {dtype}", stream=stream)
        fn, amount, unit = setup(pn, rt, rng)
        rows.append((label, dtype, shape, median_time(fn, repeat), amount, unit))
    _progress(len(todo), len(todo), "done", stream=stream)
    print(format_table(rows))
    return 0


__all__ = ["bench", "workloads"]
