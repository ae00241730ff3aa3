"""``python -m paged_numba``: the demo (default) -- a paged KV cache, a decode step and a prefill
on the default runtime, checked against the float64 reference, with timings.

    python -m paged_numba [demo] [--runtime NAME]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _time(fn, repeat=5):
    fn()  # warm-up (compiles on the first ever call)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def demo(runtime=None) -> int:
    import paged_numba as pn
    from paged_numba.ops.reference import paged_attention_fwd_ref

    rt = pn.get_runtime(runtime)
    print(f"paged_numba {pn.__version__} on runtime {rt.name!r} ({rt.device})")
    rng = np.random.default_rng(0)
    B, H, Hkv, D, bs = 4, 16, 4, 64, 16
    lens = np.array([700, 1024, 33, 512], np.int32)
    M = int(lens.max() + bs - 1) // bs
    need = int(((lens + bs - 1) // bs).sum())
    N = need + 8
    # A paged cache: a pool of N blocks; each sequence owns a shuffled set of them.
    k_blocks = rng.standard_normal((N, bs, Hkv, D), dtype=np.float32)
    v_blocks = rng.standard_normal((N, bs, Hkv, D), dtype=np.float32)
    perm = rng.permutation(N)
    table = np.full((B, M), -1, np.int32)
    used = 0
    for b, L in enumerate(lens):
        n = (int(L) + bs - 1) // bs
        table[b, :n] = perm[used:used + n]
        used += n
    print(f"KV pool: {N} blocks x {bs} tokens x {Hkv} kv heads x {D} dims, "
          f"{k_blocks.nbytes * 2 / 2**20:.1f} MiB; lengths {lens.tolist()}")
    ok = True
    for name, Sq, causal in (("decode", 1, False), ("prefill", 128, True)):
        q = rng.standard_normal((B, H, Sq, D), dtype=np.float32)
        args = (q, k_blocks, v_blocks, table)
        out, lse = pn.paged_attention_fwd(*args, causal=causal, seq_lens=lens, runtime=rt)
        ref, ref_lse = paged_attention_fwd_ref(*args, causal=causal, seq_lens=lens)
        err = float(np.abs(out - ref).max())
        t = _time(lambda: pn.paged_attention_fwd(*args, causal=causal, seq_lens=lens, runtime=rt))
        t_ref = _time(lambda: paged_attention_fwd_ref(*args, causal=causal, seq_lens=lens), repeat=1)
        good = err < 1e-4 and np.allclose(lse, ref_lse, atol=1e-4)
        ok &= good
        print(f"{name:8s} Sq={Sq:<4d} causal={causal!s:5s} max|out-ref|={err:.2e} "
              f"{'ok' if good else 'MISMATCH'}  {t * 1e3:8.2f} ms  (reference {t_ref * 1e3:.0f} ms)")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paged_numba", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="demo", choices=["demo"])
    parser.add_argument("--runtime", default=None, help="cpu, cuda or auto (default: $PAGED_NUMBA_RUNTIME or auto)")
    args = parser.parse_args(argv)
    return demo(args.runtime)


if __name__ == "__main__":
    raise SystemExit(main())
