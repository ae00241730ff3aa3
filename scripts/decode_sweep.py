"""Time the CUDA decode kernel alone for a few geometries (threads, tokens in flight per lane
group, partition size) on the benchmark's decode shape; run on a GPU.

    python scripts/decode_sweep.py [--fp8]
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--B", type=int, default=32)
    args = ap.parse_args()
    import ml_dtypes
    from numba import cuda

    import paged_numba as pn
    from paged_numba.kernels.cuda.paged_decode import decode_kernel
    from paged_numba.ops.config import fwd_config, fwd_fp8_config
    from paged_numba.runtime import cuda as rcuda

    rt = pn.get_runtime("cuda")
    rng = np.random.default_rng(0)
    B, H, Hkv, D, L, bs = args.B, 32, 8, 128, args.L, 16
    M = L // bs
    N = B * M
    kvt = ml_dtypes.float8_e4m3fn if args.fp8 else ml_dtypes.bfloat16
    q = rng.standard_normal((B, H, 1, D), dtype=np.float32).astype(ml_dtypes.bfloat16)
    k = rng.standard_normal((N, bs, Hkv, D), dtype=np.float32).astype(kvt)
    v = rng.standard_normal((N, bs, Hkv, D), dtype=np.float32).astype(kvt)
    table = rng.permutation(N).reshape(B, M).astype(np.int32)
    cfg = (fwd_fp8_config if args.fp8 else fwd_config)(q, k, v, table)
    client = rt.client
    kd = cfg.kv_dtype
    wdt = rcuda._word_dtype(D * kd.itemsize)
    W = D * kd.itemsize // wdt.itemsize
    dq = cuda.to_device(q.view(np.uint16))
    kw = cuda.to_device(k.view(kd.storage)).view(wdt)
    vw = cuda.to_device(v.view(kd.storage)).view(wdt)
    table_d, lens_d, flag = client._metadata(cfg)
    out = cuda.device_array(cfg.q_shape, np.uint16)
    lse = cuda.device_array(cfg.q_shape[:3], np.float32)
    kv_bytes = 2 * N * bs * Hkv * D * kd.itemsize
    start, stop = cuda.event(), cuda.event()
    print(f"B{B} H{H}/{Hkv} D{D} L{L} {'fp8' if args.fp8 else 'bf16'}: {kv_bytes / 1e6:.0f} MB of K/V")
    for NT, U, PT in itertools.product((128, 256), (1, 2, 4), (256, 512)):
        TPG = rcuda._tpg(D, W, False)
        n_parts = -(-L // PT)
        R = rcuda._DECODE_R
        rows_blocks = B * Hkv * -(-cfg.G // R)
        po = cuda.device_array((B, H, 1, n_parts, D), np.float32)
        pml = cuda.device_array((B, H, 1, n_parts, 2), np.float32)
        kern = decode_kernel(D, cfg.q_dtype.code, kd.code, cfg.q_dtype.code, wdt.itemsize * 8, TPG, NT, R, PT, U)
        args_k = (dq, kw, vw, table_d, lens_d, cfg.scale, 1.0, False, out, lse, po, pml, flag)
        kern[(rows_blocks, n_parts), NT](*args_k)
        cuda.synchronize()
        times = []
        for _ in range(30):
            start.record()
            kern[(rows_blocks, n_parts), NT](*args_k)
            stop.record()
            stop.synchronize()
            times.append(cuda.event_elapsed_time(start, stop) * 1e-3)
        t = float(np.median(times))
        print(f"NT={NT:4d} U={U} PT={PT:4d} TPG={TPG}: {t * 1e6:8.1f} us  {kv_bytes / t / 1e12:5.2f} TB/s")


if __name__ == "__main__":
    main()
