"""Time the CUDA decode kernel alone over a grid of geometries (tokens per shared-memory tile,
threads, register cap, partition size, elements per lane -> lanes per token row) on the benchmark's
decode shape, next to torch SDPA on the same data made contiguous; run on a GPU. Each geometry's
output is compared with the first one's (``diff``), so a geometry that computes garbage shows.

    python scripts/decode_sweep.py [--kv bf16 fp8] [--L 4096] [--B 32] [--tt 16 32] [--nt 128 256]
                                   [--maxreg 0 128] [--pt 2048] [--epl 8] [--cfg TT,NT,MAXREG,PT,EPL ...]

Each figure is the kernel time per call (decode + merge) from the profiler's CUPTI trace of 20
calls when PyTorch is there, else CUDA events around 20 back-to-back calls (which include numba's
launch overhead whenever it exceeds the kernel time).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", nargs="+", default=["bf16", "fp8"])
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--tt", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--nt", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--maxreg", type=int, nargs="+", default=[0])
    ap.add_argument("--pt", type=int, nargs="+", default=[2048])
    ap.add_argument("--epl", type=int, nargs="+", default=[8])
    ap.add_argument("--reps", type=int, default=20, help="calls per timing")
    ap.add_argument("--runs", type=int, default=5, help="timings (CUDA events only) of which the median is taken")
    ap.add_argument("--cfg", nargs="+", default=None,
                    help="explicit TT,NT,MAXREG,PT,EPL tuples instead of the product of the lists")
    ap.add_argument("--mma", nargs="+", default=None, metavar="BK,MINPT,BPS",
                    help="time the tensor-core decode (the public op) instead, at these keys per tile, "
                         "shortest partitions and target blocks per SM (plan.MMA_DECODE_*)")
    ap.add_argument("--B-list", nargs="+", type=int, default=None,
                    help="--mma: also other batch x length shapes, given as B values at L * B0 / B tokens")
    args = ap.parse_args()
    if args.mma:
        return mma_sweep(args)
    import ml_dtypes
    from numba import cuda

    import paged_numba as pn
    from paged_numba.kernels.cuda.paged_decode import decode_kernel, merge_kernel
    from paged_numba.ops.config import fwd_config, fwd_fp8_config
    from paged_numba.runtime.cuda import plan as geo
    from timing import kernel_time, numba_events, time_events

    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None
    rt = pn.get_runtime("cuda")
    rng = np.random.default_rng(0)
    B, H, Hkv, D, L, bs = args.B, 32, 8, 128, args.L, 16
    M = L // bs
    N = B * M
    q = rng.standard_normal((B, H, 1, D), dtype=np.float32).astype(ml_dtypes.bfloat16)
    table = rng.permutation(N).reshape(B, M).astype(np.int32)
    print(f"device: {rt.device}", flush=True)
    if torch is not None:
        tq = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
        tk = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
        tv = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
        f = torch.nn.functional.scaled_dot_product_attention
        t = time_events(torch, lambda: f(tq, tk, tv, enable_gqa=True), 100)[0]
        kvb = 2 * tk.numel() * 2
        print(f"torch SDPA contiguous bf16: {t * 1e6:8.1f} us  {kvb / t / 1e12:5.2f} TB/s", flush=True)
    for kvn in args.kv:
        kvt = ml_dtypes.float8_e4m3fn if kvn == "fp8" else ml_dtypes.bfloat16
        k = rng.standard_normal((N, bs, Hkv, D), dtype=np.float32).astype(kvt)
        v = rng.standard_normal((N, bs, Hkv, D), dtype=np.float32).astype(kvt)
        cfg = (fwd_fp8_config if kvn == "fp8" else fwd_config)(q, k, v, table)
        client = rt.client
        kd = cfg.kv_dtype
        wdt = geo.word_dtype(D * kd.itemsize)
        W = D * kd.itemsize // wdt.itemsize
        dq = cuda.to_device(q.view(np.uint16))
        kw = cuda.to_device(k.view(kd.storage)).view(wdt).reshape(N * bs * Hkv * W)
        vw = cuda.to_device(v.view(kd.storage)).view(wdt).reshape(N * bs * Hkv * W)
        meta = client.prepare_plan(cfg, own=False).meta
        _, sh, si = cfg.row_layout()
        dq = dq.reshape(B * H, D)
        out = cuda.device_array((B * H, D), np.uint16)
        lse = cuda.device_array(B * H, np.float32)
        slopes = meta.slopes
        kv_bytes = 2 * N * bs * Hkv * D * kd.itemsize
        print(f"B{B} H{H}/{Hkv} D{D} L{L} {kvn}: {kv_bytes / 1e6:.0f} MB of K/V", flush=True)
        grid = ([tuple(int(x) for x in c.split(",")) for c in args.cfg] if args.cfg else
                itertools.product(args.tt, args.nt, args.maxreg, args.pt, args.epl))
        ref = None
        for TT, NT, MAXREG, PT, epl in grid:
            TX = geo.lanes_per_row(D, W, rt.simulator, epl)
            R = geo.decode_rows(cfg.G)
            PT = min(PT, 1 << (L - 1).bit_length())
            n_parts = -(-L // PT)
            rows_blocks = geo.decode_row_blocks(B, Hkv, cfg.G)
            po = cuda.device_array((B, H, 1, n_parts, D), np.float32)
            pml = cuda.device_array((B, H, 1, n_parts, 2), np.float32)
            tag = f"TT={TT:3d} NT={NT:4d} MAXREG={MAXREG:3d} PT={PT:5d} EPL={epl:2d} TX={TX:2d}"
            try:
                kern = decode_kernel(D, cfg.q_dtype.code, kd.code, cfg.q_dtype.code, wdt.itemsize * 8, TX, NT,
                                     R, PT, TT, MAXREG, HWCVT=geo.fp8_hw_convert(rt.cc))
            except AssertionError:
                print(f"{tag}: not a valid geometry", flush=True)
                continue
            MT = geo.merge_threads(D, rt.simulator)
            merge = merge_kernel(D, cfg.q_dtype.code, MT)

            def launch():
                kern[(rows_blocks, n_parts), NT](dq, kw, vw, meta.table, meta.lens, meta.work, bs, Hkv, H, sh, si,
                                                 cfg.scale, 1.0, False, -1, 0.0, slopes, out, lse, po, pml,
                                                 meta.flag)
                if n_parts > 1:
                    merge[B * H, MT](po, pml, meta.work, sh, si, 1.0, out, lse)

            def elapsed(reps=args.reps, runs=args.runs):
                launch()
                cuda.synchronize()
                t = kernel_time(torch, launch, reps, cuda.synchronize)   # CUPTI, when torch is there
                return t if t is not None else numba_events(cuda, launch, reps, runs)

            try:
                t = elapsed()
            except Exception as exc:  # a geometry that does not fit: report and go on
                print(f"{tag}: failed: {str(exc)[:200]}", flush=True)
                continue
            got = out.copy_to_host().view(ml_dtypes.bfloat16).astype(np.float32)
            if ref is None:
                ref = got
            regs = ""
            try:
                regs = f" regs={list(kern.get_regs_per_thread().values())}"
            except Exception:
                pass
            print(f"{tag}: {t * 1e6:8.1f} us  {kv_bytes / t / 1e12:5.2f} TB/s  "
                  f"diff={float(np.abs(got - ref).max()):.2e}{regs}", flush=True)


def mma_sweep(args):
    """The tensor-core decode through ``pn.paged_attention_fwd`` with plan.MMA_DECODE_* patched per
    configuration; CUPTI kernel time (decode + merge) per call, next to the SIMT decode kernel."""
    import torch

    import paged_numba as pn
    from paged_numba.runtime.cuda import plan
    from timing import kernel_time

    rt = pn.get_runtime("cuda")
    client = rt.client
    H, Hkv, D, bs = 32, 8, 128, 16
    shapes = [(args.B, args.L)] + [(b, args.L * args.B // b) for b in (args.B_list or [])]
    for kvn in args.kv:
        for B, L in shapes:
            M = L // bs
            N = B * M
            g = torch.Generator(device="cuda").manual_seed(0)
            tq = torch.randn(B, H, 1, D, device="cuda", generator=g).to(torch.bfloat16)
            shape = (N, bs, Hkv, D)
            if kvn == "fp8":
                tk = torch.randn(shape, device="cuda", generator=g).mul_(8).to(torch.float8_e4m3fn).view(torch.uint8)
                tv = torch.randn(shape, device="cuda", generator=g).mul_(8).to(torch.float8_e4m3fn).view(torch.uint8)
                kd = "fp8_e4m3"
            else:
                tk = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16).view(torch.int16)
                tv = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16).view(torch.int16)
                kd = "bf16"
            q = pn.tensor(tq.view(torch.int16), dtype="bf16", runtime=rt)
            k = pn.tensor(tk, dtype=kd, runtime=rt)
            v = pn.tensor(tv, dtype=kd, runtime=rt)
            table = np.random.default_rng(0).permutation(N).reshape(B, M).astype(np.int32)
            kv_bytes = 2 * N * bs * Hkv * D * (1 if kvn == "fp8" else 2)

            def call():
                if kvn == "fp8":
                    return pn.paged_attention_fwd_fp8(q, k, v, table, k_scale=0.125, v_scale=0.125)
                return pn.paged_attention_fwd(q, k, v, table)
            print(f"B{B} H{H}/{Hkv} D{D} L{L} {kvn}: {kv_bytes / 1e6:.0f} MB of K/V", flush=True)
            client.decode_mma = False
            ref = call()[0].numpy().astype(np.float32)
            t = kernel_time(torch, call, args.reps, rt.synchronize)
            print(f"  SIMT decode kernel:              {t * 1e6:8.1f} us  {kv_bytes / t / 1e12:5.2f} TB/s", flush=True)
            client.decode_mma = True
            saved = plan.MMA_DECODE_BK, plan.MMA_DECODE_MIN_PT, plan.MMA_DECODE_BLOCKS_PER_SM
            min_rb = plan.MMA_DECODE_MIN_ROW_BLOCKS_PER_SM
            plan.MMA_DECODE_MIN_ROW_BLOCKS_PER_SM = 0      # every shape through the tensor-core decode
            for c in args.mma:
                bk, minpt, bps = (int(x) for x in c.split(","))
                plan.MMA_DECODE_BK, plan.MMA_DECODE_MIN_PT, plan.MMA_DECODE_BLOCKS_PER_SM = bk, minpt, bps
                try:
                    got = call()[0].numpy().astype(np.float32)
                    t = kernel_time(torch, call, args.reps, rt.synchronize)
                    print(f"  mma BK={bk:3d} MINPT={minpt:5d} BPS={bps:3d}: {t * 1e6:8.1f} us  "
                          f"{kv_bytes / t / 1e12:5.2f} TB/s  diff vs SIMT {float(np.abs(got - ref).max()):.2e}",
                          flush=True)
                except Exception as exc:
                    print(f"  mma {c}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                finally:
                    plan.MMA_DECODE_BK, plan.MMA_DECODE_MIN_PT, plan.MMA_DECODE_BLOCKS_PER_SM = saved
            plan.MMA_DECODE_MIN_ROW_BLOCKS_PER_SM = min_rb
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
