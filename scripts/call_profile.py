"""Where the host time of one public CUDA call goes: wall time per call of
``pn.paged_attention_fwd`` on device Tensors (decode B32 H32/8 D128 L4096 bf16), then a cProfile of
20 calls, sorted by own time (or --sort cumulative); run on a GPU.

    python scripts/call_profile.py [--top 30] [--sort tottime]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative, ...)")
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--L", type=int, default=4096)
    args = ap.parse_args()
    import ml_dtypes

    import paged_numba as pn

    rt = pn.get_runtime("cuda")
    rng = np.random.default_rng(0)
    B, H, Hkv, D, L, bs = args.B, 32, 8, 128, args.L, 16
    M = L // bs
    N = B * M
    bf = ml_dtypes.bfloat16
    q = pn.tensor(rng.standard_normal((B, H, 1, D), dtype=np.float32).astype(bf), runtime=rt)
    k = pn.tensor(rng.standard_normal((N, bs, Hkv, D), dtype=np.float32).astype(bf), runtime=rt)
    v = pn.tensor(rng.standard_normal((N, bs, Hkv, D), dtype=np.float32).astype(bf), runtime=rt)
    table = rng.permutation(N).reshape(B, M).astype(np.int32)
    lens = np.full(B, L, np.int32)

    def call():
        return pn.paged_attention_fwd(q, k, v, table, seq_lens=lens)

    for _ in range(3):
        call()
    rt.synchronize()
    times = []
    for _ in range(20):
        t = time.perf_counter()
        call()
        rt.synchronize()
        times.append(time.perf_counter() - t)
    print(f"wall per call (Tensors in, synchronize): median {np.median(times) * 1e6:.0f} us, "
          f"min {min(times) * 1e6:.0f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        call()
    rt.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
