"""Causal tensor-core prefill calls at the benchmark shape (B4 H32/8 Sq=L=4096 D128, BF16 or F32,
block size 16, shuffled table), for profilers (``ncu -k regex:prefill python
scripts/prefill_probe.py``) and for comparing tile shapes (``--sweep``: each tile set timed by
CUDA events over back-to-back calls -- a kernel-time estimate; the benchmarks use CUPTI).

    python scripts/prefill_probe.py [--dtype bf16|f32] [--tiles NW,MT,BK] [--calls N]
    python scripts/prefill_probe.py --dtype f32 --sweep "4,1,32 4,1,16 8,1,32" [--calls N]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", default=None, help="NW,MT,BK (default: the client's table)")
    ap.add_argument("--sweep", default=None, help="space-separated NW,MT,BK tile sets to time in turn")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "f32"))
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args(argv)
    import ml_dtypes
    from numba import cuda

    import paged_numba as pn
    from paged_numba.runtime import cuda as cuda_rt

    real_tiles = cuda_rt.plan.mma_tiles

    def use(tiles):
        cuda_rt.plan.mma_tiles = (lambda D, sim, *a, **kw: tiles) if tiles else real_tiles

    B, H, Hkv, S, D, bs = 4, 32, 8, 4096, 128, 16
    rng = np.random.default_rng(0)
    M = S // bs
    table = rng.permutation(B * M).reshape(B, M).astype(np.int32)
    dt = ml_dtypes.bfloat16 if args.dtype == "bf16" else np.float32
    q = pn.tensor(rng.standard_normal((B, H, S, D), dtype=np.float32).astype(dt), runtime="cuda")
    k = pn.tensor(rng.standard_normal((B * M, bs, Hkv, D), dtype=np.float32).astype(dt), runtime="cuda")
    v = pn.tensor(rng.standard_normal((B * M, bs, Hkv, D), dtype=np.float32).astype(dt), runtime="cuda")
    rt = pn.get_runtime("cuda")
    flops = 4 * B * H * S * S * D / 2
    sets = [tuple(int(x) for x in t.split(",")) for t in args.sweep.split()] if args.sweep else [
        tuple(int(x) for x in args.tiles.split(",")) if args.tiles else None]
    for tiles in sets:
        use(tiles)
        out, lse = pn.paged_attention_fwd(q, k, v, table, causal=True)    # compile, warm up
        rt.synchronize()
        t0, t1 = cuda.event(), cuda.event()
        t0.record()
        for _ in range(args.calls):
            out, lse = pn.paged_attention_fwd(q, k, v, table, causal=True)
        t1.record()
        t1.synchronize()
        ms = cuda.event_elapsed_time(t0, t1) / args.calls
        print(f"tiles {tiles or 'default'} {args.dtype}: {ms:.3f} ms per call, {flops / ms / 1e9:.1f} TFLOP/s, "
              f"max |lse| {float(np.abs(lse.numpy()).max()):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
