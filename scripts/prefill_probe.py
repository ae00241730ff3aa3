"""One causal tensor-core prefill call at the benchmark shape (B4 H32/8 Sq=L=4096 D128 BF16, block
size 16, shuffled table), for profilers: ``ncu -k regex:prefill python scripts/prefill_probe.py``.

    python scripts/prefill_probe.py [--tiles NW,MT,BK] [--calls N]
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
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args(argv)
    import ml_dtypes

    import paged_numba as pn
    from paged_numba.runtime import cuda as cuda_rt

    if args.tiles:
        tiles = tuple(int(x) for x in args.tiles.split(","))
        cuda_rt.plan.mma_tiles = lambda D, sim, *a, **kw: tiles
    B, H, Hkv, S, D, bs = 4, 32, 8, 4096, 128, 16
    rng = np.random.default_rng(0)
    M = S // bs
    table = rng.permutation(B * M).reshape(B, M).astype(np.int32)
    bf = ml_dtypes.bfloat16
    q = pn.tensor(rng.standard_normal((B, H, S, D), dtype=np.float32).astype(bf), runtime="cuda")
    k = pn.tensor(rng.standard_normal((B * M, bs, Hkv, D), dtype=np.float32).astype(bf), runtime="cuda")
    v = pn.tensor(rng.standard_normal((B * M, bs, Hkv, D), dtype=np.float32).astype(bf), runtime="cuda")
    for _ in range(args.calls):
        out, lse = pn.paged_attention_fwd(q, k, v, table, causal=True)
    pn.get_runtime("cuda").synchronize()
    print("ok", out.shape, float(np.abs(lse.numpy()).max()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
