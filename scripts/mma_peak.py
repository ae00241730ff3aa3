"""Tensor-core throughput of the mma.sync primitives in ``kernels/cuda/mma.py`` on this GPU: a
register-only loop of independent accumulator chains per warp (no memory traffic), for the BF16
m16n8k16 and the TF32 m16n8k8 mma -- the ceiling the prefill kernels work under (3xTF32 issues
three TF32 mma per product, so its ceiling is a third of the TF32 figure).

    python scripts/mma_peak.py [--iters N] [--chains C]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make(kind, C, N):
    """The loop kernel: each thread's warp runs N rounds of C independent mma of type ``kind``."""
    from numba import cuda, float32, uint32

    from paged_numba.kernels.cuda.mma import mma
    DN = 4 * C

    @cuda.jit
    def kernel(out, seed):
        a = cuda.local.array(4, uint32)
        b = cuda.local.array(2, uint32)
        d = cuda.local.array(DN, float32)
        x = uint32(cuda.threadIdx.x) * uint32(2654435761) + uint32(seed)
        for j in range(4):      # small normal values (bf16 pairs / tf32 words near 0.0078)
            a[j] = uint32(0x3C003C00) | (x >> uint32(28 - j))
        for j in range(2):
            b[j] = uint32(0x3C003C00) | (x >> uint32(26 - j))
        for i in range(DN):
            d[i] = 0.0
        for _ in range(N):
            for c in range(C):
                mma(kind, d, 4 * c, a, 0, b, 0)
        acc = float32(0.0)
        for i in range(DN):
            acc += d[i]
        out[cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x] = acc
    return kernel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=4096)
    ap.add_argument("--chains", type=int, default=4, help="independent accumulators per warp")
    args = ap.parse_args(argv)
    from numba import cuda

    from paged_numba.dtypes import BF16, F32

    dev = cuda.get_current_device()
    blocks, threads = dev.MULTIPROCESSOR_COUNT * 8, 128
    out = cuda.device_array(blocks * threads, np.float32)
    for name, kind, flops in (("bf16 m16n8k16", BF16, 2 * 16 * 8 * 16), ("tf32 m16n8k8", F32, 2 * 16 * 8 * 8)):
        k = make(kind, args.chains, args.iters)
        k[blocks, threads](out, 1)
        cuda.synchronize()
        e0, e1 = cuda.event(), cuda.event()
        times = []
        for rep in range(5):
            e0.record()
            k[blocks, threads](out, rep)
            e1.record()
            e1.synchronize()
            times.append(cuda.event_elapsed_time(e0, e1) * 1e-3)
        t = float(np.median(times))
        total = blocks * (threads // 32) * args.iters * args.chains * flops
        print(f"{name}: {total / t / 1e12:.1f} TFLOP/s ({args.chains} chains per warp, {blocks} blocks x "
              f"{threads} threads, median of 5: {t * 1e3:.2f} ms)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
