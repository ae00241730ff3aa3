"""Compile every CUDA kernel specialization the CUDA client can launch, for sm_90 (and sm_80), with
no GPU, and print registers, spills, stack frame and shared memory per kernel.

    python scripts/cuda_compile_check.py [--cc 90 80] [--quick] [--pt 2048 64] [--jobs N] [--json PATH]
                                         [--only KERNEL ...] [--head-dims D ...]

Exit status: 0 when every specialization compiled and linked, 1 when any failed (the table says
which, the details follow it), 2 when the NVIDIA compiler libraries (NVVM, NVRTC, nvJitLink: the
``[cuda13]`` extra's wheels) cannot be loaded.

What is enumerated (``specializations``), with the geometry ``CudaClient._forward`` picks on a real
GPU: for head dims 16, 40, 64, 80, 128, 256 crossed with the (q, kv, out) dtype triples below,
``decode_kernel`` (Sq <= ``plan.DECODE_MAX_SQ``: the geometry of ``decode_geometry`` for GQA groups of
4 rows at partition sizes PT 2048 and 64, the two ends of ``plan.partition`` (2048 only with --quick),
and for one row per KV head at 2048; words of ``plan.word_dtype``) and ``tiled_kernel`` (longer Sq:
``plan.tile_shape(D, sim=False)``); ``merge_kernel`` for each head dim and output dtype; and the
backward's kernels (``kernels/cuda/paged_attention_bwd.py``: delta, dK/dV, dQ for each head dim and
F32 / F16 / BF16 with the tiles of ``plan.bwd_tiles(D, sim=False)``, the zero fill, the 16-bit encode) and
the tensor-core backward (``paged_backward_mma.py``, "bwd_mma": F16 / BF16 and F32 (3xTF32, uint32
views), head dims multiples of 16 up to 128, tiles of ``plan.mma_bwd_tiles``; "bwd_mma+window" for
BF16 / F32 at ``MOD_HEAD_DIMS`` <= 128; on sm_90 with vector reductions, ``VRED``, below without). Signatures
are the numba types of the arguments the client passes: C-contiguous device arrays, Python floats
(float64) and a Python bool (boolean).
``write_kv_kernel`` (``CudaClient.run_write_kv``) is enumerated once per (pool, rows) dtype pair of
``WRITE_KV_PAIRS``; its scales are passed as NumPy float32. The score modifiers (softcap and ALiBi
on: "decode+mods", "tiled+mods", "bwd_dkdv+mods", "bwd_dq+mods") are enumerated for
``MOD_HEAD_DIMS`` x ``MOD_DTYPE_TRIPLES`` (the backward: f32 / bf16), and ``merge_state.py``'s
two kernels ("merge_pair", "merge_states") per head dim and F32 / F16 / BF16.

How (no GPU, no driver): numba compiles the Python function once per specialization; NVVM turns the
same LLVM IR into PTX for each requested compute capability, and nvJitLink (cuda.core's Linker,
verbose) links the PTX to a cubin, whose info log gives the figures. ``cuda.compile`` builds the IR
anew for every cc; numba's lowering differs by cc only below sm_60 (float64 atomics) and sm_75
(fast tanh), so ccs on the same side of those lines share one front end. Device functions are
compiled against a stand-in device of the target cc (numba asks the driver for the current device
there), so a non-inlined device function is not reported as a failure.

The figures are those of this toolchain (NVVM and nvJitLink of the installed wheels); a GPU's own
toolchain can allocate registers differently (on an H200 with the device image's numba-cuda, ten
launched kernels used from 20 registers fewer to 2 more than this check reports), so read the
register column as a guide and the spill columns as the alarm. Static shared memory matched.

Run it in a process without ``NUMBA_ENABLE_CUDASIM`` (``cuda.compile`` does not work in a simulator
process); run as a script, it clears the variable itself.
"""
from __future__ import annotations

import argparse
import itertools
import contextlib
import json
import os
import re
import sys
import time
import types as _pytypes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEAD_DIMS = (16, 40, 64, 80, 128, 256)
# (q, kv, out) dtype names; the client always writes out in q's dtype.
DTYPE_TRIPLES = (
    ("f32", "f32", "f32"),
    ("f16", "f16", "f16"),
    ("bf16", "bf16", "bf16"),
    ("f32", "e4m3", "f32"),
    ("bf16", "e4m3", "bf16"),
    ("e4m3", "e4m3", "e4m3"),
    ("bf16", "e5m2", "bf16"),
    ("e5m2", "e5m2", "e5m2"),
)
# write_kv (pool, rows) dtype pairs: float pools take their own dtype, FP8 pools f32 / f16 / bf16.
WRITE_KV_PAIRS = (("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"),
                  ("e4m3", "f32"), ("e4m3", "f16"), ("e4m3", "bf16"),
                  ("e5m2", "f32"), ("e5m2", "f16"), ("e5m2", "bf16"))
# The score-modifier (softcap + ALiBi) specializations: a subset of head dims and dtype triples.
MOD_HEAD_DIMS = (64, 128, 256)
MOD_DTYPE_TRIPLES = (("f32", "f32", "f32"), ("bf16", "bf16", "bf16"), ("bf16", "e4m3", "bf16"))
PARTITIONS = (2048, 64)
QUICK_PARTITIONS = (2048,)
DEFAULT_CCS = ((9, 0), (8, 0))
NVIDIA_LIBS = ("nvvm", "nvrtc", "nvJitLink")


# ------------------------------------------------------------------------------ enumeration

def _dtypes():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from paged_numba.dtypes import DType
    return {"f32": DType.F32, "f16": DType.F16, "bf16": DType.BF16, "e4m3": DType.FP8_E4M3,
            "e5m2": DType.FP8_E5M2}


def _merge_threads(D: int) -> int:
    from paged_numba.runtime.cuda import plan

    return plan.merge_threads(D, False)


def _hw_convert_variants(kvn: str):
    """(HWCVT, cc bounds) of the decode and prefill kernels for K/V ``kvn``: E4M3 uses the FP8 pair
    converter from sm_89 (``plan.fp8_hw_convert``) and the integer decode below; other K/V have one
    variant."""
    if kvn != "e4m3":
        return [(False, {})]
    return [(True, dict(min_cc=(8, 9))), (False, dict(below_cc=(8, 9)))]


def _tf32_variants(plan, D: int):
    """(cc, cc bounds) of the 3xTF32 prefill at head dim D: one variant where ``plan.mma_tiles``
    picks the same tiles on sm_80 and sm_90, else one per side of 9.0."""
    if plan.mma_tiles(D, False, tf32=True, cc=(8, 0)) == plan.mma_tiles(D, False, tf32=True, cc=(9, 0)):
        return [((9, 0), {})]
    return [((9, 0), dict(min_cc=(9, 0))), ((8, 0), dict(below_cc=(9, 0)))]


def specializations(quick: bool = False, partitions=None) -> list:
    """The kernel specializations the client can launch on a GPU: one dict per kernel, with
    ``kernel`` ("decode" / "tiled" / "merge"), ``spec`` (a label), ``factory`` (the factory's
    keyword arguments) and the argument dtypes. Imports neither numba nor numba.cuda."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from paged_numba.runtime.cuda import plan
    from paged_numba.runtime.cuda.plan import tile_shape

    dts = _dtypes()
    pts = tuple(partitions) if partitions else (QUICK_PARTITIONS if quick else PARTITIONS)
    specs = []
    for kernel in ("decode", "tiled"):
        for D in HEAD_DIMS:
            for qn, kvn, on in DTYPE_TRIPLES:
                q, kv, out = dts[qn], dts[kvn], dts[on]
                wdt = plan.word_dtype(D * kv.itemsize)
                W = D * kv.itemsize // wdt.itemsize
                common = dict(D=D, q_code=q.code, kv_code=kv.code, out_code=out.code,
                              word_bits=wdt.itemsize * 8)
                base = dict(kernel=kernel, D=D, q=qn, kv=kvn, out=on, q_storage=q.storage.name,
                            word=wdt.name, out_storage=out.storage.name)
                label = f"D={D} q={qn} kv={kvn} out={on} {wdt.name}"
                if kernel == "tiled":
                    BQ, BK, NTT = tile_shape(D, False)
                    specs.append(dict(base, PT=None, factory=dict(common, BQ=BQ, BK=BK, NT=NTT),
                                      spec=f"{label} BQ={BQ} BK={BK} NT={NTT}"))
                    continue
                # GQA groups (rows = 4) at both partition ends; one query row per KV head (MHA).
                for rows, PT in [(4, PT) for PT in pts] + [(1, pts[0])]:
                    geo = plan.decode_geometry(D, kv.itemsize, wdt.itemsize, rows, PT, False)
                    for cvt, ccs in _hw_convert_variants(kvn):
                        specs.append(dict(base, PT=PT, factory=dict(common, PT=PT, **geo, HWCVT=cvt), **ccs,
                                          spec=f"{label} " + " ".join(f"{k}={v}" for k, v in geo.items())
                                          + f" PT={PT}" + (" hwcvt" if cvt else "")))
    for D in HEAD_DIMS:   # the tensor-core prefill: F16 / BF16, head dims that are multiples of 16
        if D % 16:
            continue
        for name in ("f16", "bf16"):      # K/V of q's dtype, or FP8 codes decoded into it
            dt = dts[name]
            for kvn in (name, "e4m3", "e5m2"):
                NW, MT, BK = plan.mma_tiles(D, False, kvn != name)
                for cvt, ccs in _hw_convert_variants(kvn):
                    specs.append(dict(kernel="prefill_mma", D=D, q=name, kv=kvn, out=name, PT=None, **ccs,
                                      factory=dict(D=D, kind=dt.code, NW=NW, BK=BK, MT=MT, kv_code=dts[kvn].code,
                                                   HWCVT=cvt),
                                      kv_storage=dts[kvn].storage.name,
                                      spec=f"D={D} q={name} kv={kvn} NW={NW} MT={MT} BK={BK}"
                                      + (" hwcvt" if cvt else "")))
        for name in ("f16", "bf16") if D <= 128 else ():     # the split-K decode on tensor cores (SPLIT)
            NW, MT, BK = plan.mma_decode_tiles(D, False)
            specs.append(dict(kernel="decode_mma", D=D, q=name, kv=name, out=name, PT=None,
                              factory=dict(D=D, kind=dts[name].code, NW=NW, BK=BK, MT=MT, kv_code=dts[name].code,
                                           SPLIT=True),
                              kv_storage=dts[name].storage.name,
                              spec=f"D={D} q={name} kv={name} NW={NW} MT={MT} BK={BK} split"))
        if D > 128:
            continue
        for cc, ccs in _tf32_variants(plan, D):     # F32: 3xTF32 over float32 tiles (uint32 views)
            NW, MT, BK = plan.mma_tiles(D, False, tf32=True, cc=cc)
            specs.append(dict(kernel="prefill_mma", D=D, q="f32", kv="f32", out="f32", PT=None, q_storage="uint32",
                              factory=dict(D=D, kind=dts["f32"].code, NW=NW, BK=BK, MT=MT), kv_storage="uint32",
                              **ccs, spec=f"D={D} q=f32 kv=f32 NW={NW} MT={MT} BK={BK} 3xtf32"))
    # Score modifiers on (softcap and ALiBi: the kernels' SOFTCAP / ALIBI flags), for a few head dims
    # and dtypes: "decode+mods" / "tiled+mods" (window and ragged layouts are runtime arguments).
    for kernel in ("decode", "tiled"):
        for D in MOD_HEAD_DIMS:
            for qn, kvn, on in MOD_DTYPE_TRIPLES:
                q, kv, out = dts[qn], dts[kvn], dts[on]
                wdt = plan.word_dtype(D * kv.itemsize)
                common = dict(D=D, q_code=q.code, kv_code=kv.code, out_code=out.code,
                              word_bits=wdt.itemsize * 8, SOFTCAP=True, ALIBI=True)
                base = dict(kernel=kernel + "+mods", D=D, q=qn, kv=kvn, out=on, q_storage=q.storage.name,
                            word=wdt.name, out_storage=out.storage.name)
                label = f"D={D} q={qn} kv={kvn} out={on} {wdt.name} softcap+alibi"
                if kernel == "tiled":
                    BQ, BK, NTT = tile_shape(D, False)
                    specs.append(dict(base, PT=None, factory=dict(common, BQ=BQ, BK=BK, NT=NTT),
                                      spec=f"{label} BQ={BQ} BK={BK} NT={NTT}"))
                    continue
                geo = plan.decode_geometry(D, kv.itemsize, wdt.itemsize, 4, pts[0], False)
                for cvt, ccs in _hw_convert_variants(kvn):
                    specs.append(dict(base, PT=pts[0], factory=dict(common, PT=pts[0], **geo, HWCVT=cvt), **ccs,
                                      spec=f"{label} " + " ".join(f"{k}={v}" for k, v in geo.items())
                                      + f" PT={pts[0]}" + (" hwcvt" if cvt else "")))
    for D in HEAD_DIMS:      # merge_state / merge_states (CudaClient.run_merge_state(s))
        for name in BWD_DTYPES:
            dt = dts[name]
            MT = _merge_threads(D)
            for kernel in ("merge_pair", "merge_states"):
                specs.append(dict(kernel=kernel, D=D, out=name, PT=None, out_storage=dt.storage.name,
                                  factory=dict(D=D, code=dt.code, NT=MT), spec=f"D={D} {name} NT={MT}"))
    for D in MOD_HEAD_DIMS:   # the tensor-core prefill with a sliding window, or with softcap + ALiBi
        for qn, kvn, _ in MOD_DTYPE_TRIPLES:
            tf32 = qn == "f32"
            if qn not in ("f16", "bf16") and not (tf32 and kvn == "f32" and D <= 128):
                continue
            for (window, mods), (cc, tccs) in itertools.product(((True, False), (False, True)),
                                                                _tf32_variants(plan, D) if tf32 else [((9, 0), {})]):
                NW, MT, BK = plan.mma_tiles(D, False, kvn != qn, window, mods, tf32, cc)
                storage = dict(q_storage="uint32", kv_storage="uint32") if tf32 else dict(
                    kv_storage=dts[kvn].storage.name)
                tag = "window" if window else "mods"
                for cvt, ccs in (_hw_convert_variants(kvn) if not tf32 else [(False, tccs)]):
                    specs.append(dict(kernel=f"prefill_mma+{tag}", D=D, q=qn, kv=kvn, out=qn, PT=None, **ccs,
                                      factory=dict(D=D, kind=dts[qn].code, NW=NW, BK=BK, MT=MT, kv_code=dts[kvn].code,
                                                   WINDOW=window, SOFTCAP=mods, ALIBI=mods, HWCVT=cvt),
                                      **storage,
                                      spec=f"D={D} q={qn} kv={kvn} NW={NW} MT={MT} BK={BK} {tag}"
                                      + (" hwcvt" if cvt else "")))
                    if tf32 or D > 128 or kvn != qn:
                        continue
                    NW, MT, BK = plan.mma_decode_tiles(D, False)   # ... and the decode's
                    specs.append(dict(kernel=f"decode_mma+{tag}", D=D, q=qn, kv=kvn, out=qn, PT=None, **ccs,
                                      factory=dict(D=D, kind=dts[qn].code, NW=NW, BK=BK, MT=MT, kv_code=dts[kvn].code,
                                                   WINDOW=window, SOFTCAP=mods, ALIBI=mods, HWCVT=cvt, SPLIT=True),
                                      **storage,
                                      spec=f"D={D} q={qn} kv={kvn} NW={NW} MT={MT} BK={BK} split {tag}"
                                      + (" hwcvt" if cvt else "")))
                    NW, MT, BK = plan.mma_tiles(D, False, kvn != qn, window, mods, tf32, cc)
    outs = []
    for _, _, on in DTYPE_TRIPLES:
        if on not in outs:
            outs.append(on)
    for D in HEAD_DIMS:
        for on in outs:
            out = dts[on]
            MT = _merge_threads(D)
            specs.append(dict(kernel="merge", D=D, out=on, PT=None, factory=dict(D=D, out_code=out.code, NT=MT),
                              out_storage=out.storage.name, spec=f"D={D} out={on} NT={MT}"))
    for pn_, sn in WRITE_KV_PAIRS:  # no head_dim or geometry constants: one kernel per dtype pair
        pool, src = dts[pn_], dts[sn]
        specs.append(dict(kernel="write_kv", D=None, pool=pn_, src=sn, PT=None,
                          factory=dict(pool_code=pool.code, src_code=src.code),
                          pool_storage=pool.storage.name, src_storage=src.storage.name,
                          spec=f"pool={pn_} rows={sn}"))
    specs += _backward_specializations(dts)
    return specs


BWD_DTYPES = ("f32", "f16", "bf16")


def _backward_specializations(dts) -> list:
    """The backward's kernels (``CudaClient.run_bwd``): delta, dK/dV and dQ per head dim and dtype
    with the tiles of ``plan.bwd_tiles(D, sim=False)``; the zero fill; the float32 -> 16-bit encode."""
    from paged_numba.runtime.cuda.plan import bwd_tiles, delta_lanes
    specs = []
    for D in HEAD_DIMS:
        BQ, BK, TY = bwd_tiles(D, False)
        for name in BWD_DTYPES:
            dt = dts[name]
            base = dict(D=D, q=name, kv=name, out=name, PT=None, q_storage=dt.storage.name,
                        out_storage=dt.storage.name)
            TX = delta_lanes(False)
            specs.append(dict(base, kernel="bwd_delta", factory=dict(D=D, code=dt.code, TX=TX),
                              spec=f"D={D} {name} TX={TX}"))
            for kernel in ("bwd_dkdv", "bwd_dq"):
                specs.append(dict(base, kernel=kernel, factory=dict(D=D, code=dt.code, BQ=BQ, BK=BK, TY=TY),
                                  spec=f"D={D} {name} BQ={BQ} BK={BK} NT={8 * TY}"))
                if D in MOD_HEAD_DIMS and name != "f16":
                    specs.append(dict(base, kernel=kernel + "+mods",
                                      factory=dict(D=D, code=dt.code, BQ=BQ, BK=BK, TY=TY, SOFTCAP=True, ALIBI=True),
                                      spec=f"D={D} {name} BQ={BQ} BK={BK} NT={8 * TY} softcap+alibi"))
    from paged_numba.runtime.cuda.plan import mma_bwd_tiles
    for D in HEAD_DIMS:   # the tensor-core backward: F16 / BF16, F32 (3xTF32), head dims multiples of 16 up to 128
        if D % 16 or D > 128:
            continue
        for name in BWD_DTYPES:
            dt = dts[name]
            tf32 = name == "f32"    # float32 arrays passed as uint32 views
            base = dict(D=D, q=name, kv=name, out=name, PT=None, q_storage="uint32" if tf32 else dt.storage.name,
                        out_storage=dt.storage.name)
            for window in (False, True):
                if window and (D not in MOD_HEAD_DIMS or name == "f16"):
                    continue
                # sm_90 and later: pairs of gradients by one red.global.add.v2.f32 (VRED); below, two atomics
                for vred, ccs in ((True, dict(min_cc=(9, 0))), (False, dict(below_cc=(9, 0)))):
                    NW, BQ, MAXREG = mma_bwd_tiles(D, False, window, vred, tf32=tf32, cc=(9, 0) if vred else (8, 0))
                    specs.append(dict(base, kernel="bwd_mma+window" if window else "bwd_mma", **ccs,
                                      factory=dict(D=D, kind=dt.code, NW=NW, BQ=BQ, WINDOW=window, VRED=vred,
                                                   MAXREG=MAXREG),
                                      spec=f"D={D} {name} NW={NW} BQ={BQ} maxreg={MAXREG}"
                                      + (" window" if window else "")
                                      + (" vred" if vred else "")))
    specs.append(dict(kernel="bwd_fill", D=None, q=None, kv=None, out="f32", PT=None, factory={},
                      out_storage="float32", spec="float32"))
    for name in BWD_DTYPES[1:]:
        dt = dts[name]
        specs.append(dict(kernel="bwd_encode", D=None, q=None, kv=None, out=name, PT=None,
                          factory=dict(code=dt.code), out_storage=dt.storage.name, spec=name))
    return specs


def _signature(spec):
    """numba signature of the client's launch (q, out as [rows, D], lse [rows]; ``work`` int32
    [4, B]; ``slopes`` float32 [H]): (q, k, v, table, seq_lens, work, bs, Hkv, H, stride_h, stride_i,
    qk_scale, out_scale, causal, window, softcap, slopes, out, lse, po, pml, flag) for decode (k, v
    as flat word arrays), (q, k, v, table, seq_lens, work, H, stride_h, stride_i, qk_scale, out_scale,
    causal, window, softcap, slopes, out, lse, flag) for the tiled kernel, (po, pml, work, stride_h,
    stride_i, out_scale, out, lse) for merge; merge_pair (v_a, s_a, v_b, s_b, out, lse) 2-D / 1-D,
    merge_states (v [T, K, H, D], s [T, K, H], out [T, H, D], lse [T, H])."""
    from numba import types as nt

    def arr(dtype_name, ndim):
        return nt.Array(getattr(nt, dtype_name), ndim, "C")

    f32 = "float32"
    kind = spec["kernel"].removesuffix("+mods").removesuffix("+window")
    if kind.startswith("bwd_"):
        return _backward_signature(spec, arr)
    if kind == "write_kv":  # (k_pool, v_pool, k, v, slots, k_scale, v_scale)
        pool, src = arr(spec["pool_storage"], 4), arr(spec["src_storage"], 3)
        return nt.void(pool, pool, src, src, arr("int64", 1), nt.float32, nt.float32)
    if kind == "merge_pair":
        v = arr(spec["out_storage"], 2)
        return nt.void(v, arr(f32, 1), v, arr(f32, 1), v, arr(f32, 1))
    if kind == "merge_states":
        return nt.void(arr(spec["out_storage"], 4), arr(f32, 3), arr(spec["out_storage"], 3), arr(f32, 2))
    work = arr("int32", 2)
    if kind in ("prefill_mma", "decode_mma"):  # flat uint16 q (F32: uint32), flat k / v storage, out as
        # uint32 words, flat lse; the split-K partition length and partial states (placeholders for the prefill)
        qa, kv = arr(spec.get("q_storage", "uint16"), 1), arr(spec["kv_storage"], 1)
        return nt.void(qa, kv, kv, arr("int32", 2), arr("int32", 1), work, nt.int64, nt.int64, nt.int64,
                       nt.int64, nt.int64, nt.float64, nt.float64, nt.boolean, nt.int64, nt.float64,
                       arr(f32, 1), arr("uint32", 1), arr(f32, 1), arr("int32", 1), nt.int64, arr(f32, 5),
                       arr(f32, 5))
    if kind == "merge":
        return nt.void(arr(f32, 5), arr(f32, 5), work, nt.int64, nt.int64, nt.float64,
                       arr(spec["out_storage"], 2), arr(f32, 1))
    q, word, table, lens = arr(spec["q_storage"], 2), spec["word"], arr("int32", 2), arr("int32", 1)
    mid = (nt.float64, nt.float64, nt.boolean, nt.int64, nt.float64, arr(f32, 1))
    tail = (arr(spec["out_storage"], 2), arr(f32, 1))
    if kind == "tiled":
        return nt.void(q, arr(word, 4), arr(word, 4), table, lens, work, nt.int64, nt.int64, nt.int64, *mid,
                       *tail, arr("int32", 1))
    return nt.void(q, arr(word, 1), arr(word, 1), table, lens, work, nt.int64, nt.int64, nt.int64, nt.int64,
                   nt.int64, *mid, *tail, arr(f32, 5), arr(f32, 5), arr("int32", 1))


def _backward_signature(spec, arr):
    """The launches of ``CudaClient.run_bwd``: delta (dout, out [rows, D], lse, delta, lse2 [rows]);
    dK/dV (q, dout, k, v, table, seq_lens, work, bs, H, stride_h, stride_i, scale, causal, window,
    softcap, slopes, delta, lse2, dk, dv) with k, v, dk, dv as [N * bs, Hkv, D]; dQ the same with
    dq [rows, D] in place of dk, dv; fill (a); encode (src, out), 1-D."""
    from numba import types as nt

    f32 = "float32"
    kind = spec["kernel"].removesuffix("+mods").removesuffix("+window")
    if kind == "bwd_fill":
        return nt.void(arr(f32, 1))
    if kind == "bwd_encode":
        return nt.void(arr(f32, 1), arr(spec["out_storage"], 1))
    st = spec["q_storage"]
    if kind == "bwd_delta":
        return nt.void(arr(st, 2), arr(st, 2), arr(f32, 1), arr(f32, 1), arr(f32, 1))
    head = (arr(st, 2), arr(st, 2), arr(st, 3), arr(st, 3), arr("int32", 2), arr("int32", 1), arr("int32", 2),
            nt.int64, nt.int64, nt.int64, nt.int64, nt.float64, nt.boolean, nt.int64, nt.float64, arr(f32, 1),
            arr(f32, 1), arr(f32, 1))
    if kind == "bwd_dkdv":
        return nt.void(*head, arr(f32, 3), arr(f32, 3))
    if kind == "bwd_mma":   # flat uint16 (F32: uint32) q, dout, k, v; flat float32 lse2, delta, dk, dv, dq
        u16, f = arr(spec["q_storage"], 1), arr(f32, 1)
        return nt.void(u16, u16, u16, u16, arr("int32", 2), arr("int32", 1), arr("int32", 2), nt.int64, nt.int64,
                       nt.int64, nt.int64, nt.int64, nt.float64, nt.boolean, nt.int64, f, f, f, f, f)
    return nt.void(*head, arr(st, 2))


# ------------------------------------------------------------------------------ compiling

def missing_libraries() -> list:
    """Names of the NVIDIA compiler libraries that cannot be loaded (empty when all can)."""
    from cuda.pathfinder import DynamicLibNotFoundError, load_nvidia_dynamic_lib
    missing = []
    for name in NVIDIA_LIBS:
        try:
            load_nvidia_dynamic_lib(name)
        except DynamicLibNotFoundError:
            missing.append(name)
    return missing


@contextlib.contextmanager
def _stand_in_device(cc):
    """numba compiles a non-inlined device function for ``get_current_device()``'s cc, which asks
    the driver; answer with a stand-in of the target cc while compiling."""
    import numba.cuda.dispatcher as disp
    saved = getattr(disp, "get_current_device", None)
    if saved is None:
        yield
        return
    disp.get_current_device = lambda: _pytypes.SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        disp.get_current_device = saved


def _lowering_class(cc):
    # numba-cuda lowers differently only at sm_60 (float64 atomic add) and sm_75 (fast tanh).
    return (tuple(cc) >= (6, 0), tuple(cc) >= (7, 5))


def _ptx_by_cc(pyfunc, sig, ccs):
    """{cc: PTX text}; one numba front end per lowering class, NVVM per cc."""
    from numba import cuda
    try:
        from numba.cuda.compiler import _compile_pyfunc_with_fixup
    except ImportError:
        _compile_pyfunc_with_fixup = None
    out = {}
    libs = {}
    for cc in ccs:
        with _stand_in_device(cc):
            if _compile_pyfunc_with_fixup is None:
                out[cc] = cuda.compile(pyfunc, sig, device=False, abi="numba", output="ptx", cc=cc)[0]
                continue
            key = _lowering_class(cc)
            if key not in libs:
                libs[key] = _compile_pyfunc_with_fixup(pyfunc, sig, device=False, abi="numba", cc=cc)[0]
            ptxes = libs[key].get_asm_strs(cc=cc)
            if len(ptxes) != 1:
                raise RuntimeError(f"expected one PTX module, got {len(ptxes)}")
            out[cc] = ptxes[0]
    return out


def _link(ptx: str, cc, max_registers=None):
    """(cubin bytes, info log) of ``ptx`` linked for ``cc`` by nvJitLink (with the kernel's
    ``max_registers``, which numba passes to the linker too)."""
    from cuda.core import Linker, LinkerOptions, ObjectCode
    linker = Linker(ObjectCode.from_ptx(ptx.encode()),
                    options=LinkerOptions(arch=f"sm_{cc[0]}{cc[1]}", verbose=True,
                                          max_register_count=max_registers))
    code = linker.link("cubin").code
    return bytes(code), linker.get_info_log()


def parse_link_log(log: str) -> dict:
    """Registers, spills, stack frame and static shared memory of the entry kernel in an
    nvJitLink / ptxas verbose log."""
    entry = re.search(r"Compiling entry function '([^']+)'", log)
    name = re.escape(entry.group(1)) if entry else r"\S+"
    res = {}
    # ptxas: "Function properties for NAME" / "N bytes stack frame, N bytes spill stores, ..." /
    # "Used N registers" (helper functions of their own may precede or follow the kernel's block)
    m = re.search(r"Function properties for " + name + r"\s*\n[^\n]*?(\d+) bytes stack frame, "
                  r"(\d+) bytes spill stores, (\d+) bytes spill loads\s*\n[^\n]*?Used (\d+) registers", log)
    if m:
        res.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)),
                   registers=int(m.group(4)))
    # nvJitLink's summary of the linked kernel: "Function properties for 'NAME':" / "used N registers,
    # ..., N bytes smem, ..."
    m = re.search(r"Function properties for '" + name + r"':\s*\n[^\n]*?used (\d+) registers[^\n]*", log)
    if m:
        res.setdefault("registers", int(m.group(1)))
        sm = re.search(r"(\d+) bytes smem", m.group(0))
        res["smem"] = int(sm.group(1)) if sm else 0
    for key in ("registers", "spill_stores", "spill_loads", "stack_frame"):
        if key not in res:
            raise ValueError(f"cannot read {key} from the link log:\n{log}")
    res.setdefault("smem", 0)
    return res


def _error_text(exc) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    text = re.sub(r" at 0x[0-9a-f]+>", ">", text)  # object addresses differ between processes
    where = _error_location(exc)
    head = f"{type(exc).__name__}: {text}"
    return f"{head}\n(at {where})" if where and where not in text else head


def _error_location(exc):
    """Source line of a numba typing error (numba-cuda 0.30 drops it from the message): the
    ``loc`` of the innermost compiler frame that holds one in the kernel's own files."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        for obj in (tb.tb_frame.f_locals.get("self"), tb.tb_frame.f_locals.get("inst")):
            loc = getattr(obj, "loc", None)
            if getattr(loc, "filename", None) and getattr(loc, "line", None):
                if "paged_numba" in loc.filename:
                    found = f"{os.path.relpath(loc.filename, ROOT)}:{loc.line}"
        tb = tb.tb_next
    return found


def _factory(spec):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    kind = spec["kernel"].removesuffix("+mods").removesuffix("+window")
    if kind in ("merge_pair", "merge_states"):
        from paged_numba.kernels.cuda.merge_state import pair_kernel, states_kernel
        return (pair_kernel if kind == "merge_pair" else states_kernel)(**spec["factory"])
    if kind == "tiled":
        from paged_numba.kernels.cuda.paged_attention import tiled_kernel
        return tiled_kernel(**spec["factory"])
    if kind in ("prefill_mma", "decode_mma"):
        from paged_numba.kernels.cuda.paged_prefill import prefill_kernel
        return prefill_kernel(**spec["factory"])
    if kind.startswith("bwd_"):
        from paged_numba.kernels.cuda import paged_attention_bwd as bwd
        from paged_numba.kernels.cuda import paged_backward_mma as bwd_mma
        factory = {"bwd_delta": bwd.delta_kernel, "bwd_dkdv": bwd.dkdv_kernel, "bwd_dq": bwd.dq_kernel,
                   "bwd_fill": bwd.fill_kernel, "bwd_encode": bwd.encode_kernel,
                   "bwd_mma": bwd_mma.dkdvq_kernel}[kind]
        return factory(**spec["factory"])
    if spec["kernel"] == "write_kv":
        from paged_numba.kernels.cuda.write_kv import write_kv_kernel
        return write_kv_kernel(**spec["factory"])
    from paged_numba.kernels.cuda.paged_decode import decode_kernel, merge_kernel
    return (decode_kernel if kind == "decode" else merge_kernel)(**spec["factory"])


def compile_one(spec, ccs) -> list:
    """One result dict per cc for ``spec``: ok, error, registers, spill_stores, spill_loads,
    stack_frame, smem, cubin_bytes, seconds."""
    base = {k: v for k, v in spec.items() if k != "factory"}
    # a specialization the client launches only from (min_cc) or below (below_cc) a compute capability
    ccs = [c for c in ccs if tuple(spec.get("min_cc", (0, 0))) <= c < tuple(spec.get("below_cc", (99, 0)))]
    if not ccs:
        return []
    rows = []
    t0 = time.perf_counter()
    try:
        kern = _factory(spec)
        maxreg = kern.targetoptions.get("max_registers")
        ptx = _ptx_by_cc(kern.py_func, _signature(spec), ccs)
    except Exception as exc:  # report and go on: every specialization gets its line
        err = _error_text(exc)
        dt = time.perf_counter() - t0
        return [dict(base, cc=f"sm_{c[0]}{c[1]}", ok=False, stage="compile", error=err, seconds=dt)
                for c in ccs]
    front = (time.perf_counter() - t0) / len(ccs)
    for cc in ccs:
        t1 = time.perf_counter()
        row = dict(base, cc=f"sm_{cc[0]}{cc[1]}")
        try:
            cubin, log = _link(ptx[cc], cc, maxreg)
            row.update(ok=True, stage=None, error=None, cubin_bytes=len(cubin), **parse_link_log(log))
        except Exception as exc:
            row.update(ok=False, stage="link", error=_error_text(exc))
        row["seconds"] = front + time.perf_counter() - t1
        rows.append(row)
    return rows


def _worker(args):
    spec, ccs = args
    return compile_one(spec, ccs)


def _cost(spec):
    # Rough compile cost, to hand the big kernels out first.
    return (spec["kernel"] not in ("merge", "write_kv", "merge_pair", "merge_states"), spec["D"] or 0)


def check(ccs=DEFAULT_CCS, quick: bool = False, partitions=None, jobs: int = 1, progress=None,
          only=None, head_dims=None) -> list:
    """Compile every specialization for every cc in ``ccs`` (tuples like (9, 0) or ints like 90);
    returns one dict per (specialization, cc), in enumeration order. Never raises for a kernel
    that fails to compile: its dict has ok=False and the error. ``jobs`` > 1 compiles in that many
    worker processes. ``only`` (kernel names, e.g. "decode+mods") and ``head_dims`` narrow the set."""
    import numba
    if numba.config.ENABLE_CUDASIM:
        raise RuntimeError("cuda_compile_check: NUMBA_ENABLE_CUDASIM is set in this process; "
                           "cuda.compile does not work under the simulator: run the check in a "
                           "process without it (python scripts/cuda_compile_check.py clears it)")
    ccs = tuple(_as_cc(c) for c in ccs)
    specs = specializations(quick, partitions)
    if only:
        specs = [sp for sp in specs if sp["kernel"] in only]
    if head_dims:
        specs = [sp for sp in specs if sp["D"] in head_dims]
    order = sorted(range(len(specs)), key=lambda i: _cost(specs[i]), reverse=True)
    results = [None] * len(specs)
    if jobs <= 1:
        for n, i in enumerate(order):
            results[i] = compile_one(specs[i], ccs)
            if progress:
                progress(n + 1, len(specs), results[i])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        here = os.path.dirname(os.path.abspath(__file__))
        if here not in sys.path:  # spawned workers import this module by name
            sys.path.insert(0, here)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_worker, (specs[i], ccs)): i for i in order}
            for n, fut in enumerate(as_completed(futures)):
                i = futures[fut]
                results[i] = fut.result()
                if progress:
                    progress(n + 1, len(specs), results[i])
    return [row for rows in results for row in rows]


def _as_cc(c):
    if isinstance(c, (tuple, list)):
        return (int(c[0]), int(c[1]))
    c = int(c)
    return (c // 10, c % 10)


# ------------------------------------------------------------------------------ report

def format_table(rows) -> str:
    head = ("kernel", "specialization", "cc", "regs", "spill st", "spill ld", "stack", "smem", "s")
    lines = []
    for r in rows:
        if r["ok"]:
            lines.append((r["kernel"], r["spec"], r["cc"], str(r["registers"]), str(r["spill_stores"]),
                          str(r["spill_loads"]), str(r["stack_frame"]), str(r["smem"]), f"{r['seconds']:.1f}"))
        else:
            lines.append((r["kernel"], r["spec"], r["cc"], f"FAILED ({r['stage']})", "", "", "", "",
                          f"{r['seconds']:.1f}"))
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    left = (True, True, True, False, False, False, False, False, False)

    def fmt(cells):
        return "  ".join(c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(cells, widths, left)).rstrip()
    out = [fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def format_summary(rows) -> str:
    out = []
    for kernel in ("decode", "decode+mods", "tiled", "tiled+mods", "merge", "write_kv", "bwd_delta", "bwd_dkdv",
                   "bwd_dkdv+mods", "bwd_dq", "bwd_dq+mods", "bwd_mma", "bwd_mma+window", "bwd_fill", "bwd_encode",
                   "prefill_mma", "prefill_mma+window", "prefill_mma+mods", "decode_mma", "decode_mma+window",
                   "decode_mma+mods", "merge_pair", "merge_states"):
        for cc in sorted({r["cc"] for r in rows}, reverse=True):
            sel = [r for r in rows if r["kernel"] == kernel and r["cc"] == cc]
            good = [r for r in sel if r["ok"]]
            if not sel:
                continue
            line = f"{kernel:10s} {cc}: {len(good)}/{len(sel)} compiled"
            if good:
                top = max(good, key=lambda r: r["registers"])
                spills = [r for r in good if r["spill_stores"] or r["spill_loads"]]
                stacks = sorted({r["stack_frame"] for r in good})
                line += (f"; max {top['registers']} registers ({top['spec']}); "
                         f"{len(spills)} with spills; stack frames {stacks} bytes; "
                         f"max smem {max(r['smem'] for r in good)} bytes")
            out.append(line)
    return "\n".join(out)


def format_failures(rows) -> str:
    """Each distinct error once, with the specializations (and ccs) it hit."""
    groups = {}
    for r in rows:
        if not r["ok"]:
            groups.setdefault(r["error"], []).append(f"{r['kernel']} {r['spec']} {r['cc']}")
    out = []
    for err, where in groups.items():
        out.append(f"{len(where)} compile(s) failed with:\n  " + err.replace("\n", "\n  "))
        shown = where if len(where) <= 8 else where[:8] + [f"... and {len(where) - 8} more"]
        out.append("  in: " + "\n      ".join(shown))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", nargs="+", type=int, default=[90, 80],
                    help="compute capabilities as integers (default: 90 80)")
    ap.add_argument("--quick", action="store_true", help="PT 2048 only")
    ap.add_argument("--pt", nargs="+", type=int, default=None,
                    help="decode partition sizes (default 2048 64; 2048 with --quick)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="worker processes (default: the CPUs this process may use)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--only", nargs="+", default=None,
                    help="compile only these kernels (decode, decode+mods, tiled, tiled+mods, merge, write_kv, "
                         "bwd_delta, bwd_dkdv, bwd_dkdv+mods, bwd_dq, bwd_dq+mods, bwd_mma, bwd_mma+window, "
                         "bwd_fill, bwd_encode, prefill_mma, prefill_mma+window, prefill_mma+mods, decode_mma, "
                         "decode_mma+window, decode_mma+mods, merge_pair, merge_states)")
    ap.add_argument("--head-dims", nargs="+", type=int, default=None, help="compile only these head dims")
    args = ap.parse_args(argv)

    missing = missing_libraries()
    if missing:
        print(f"cuda_compile_check: cannot load the NVIDIA compiler libraries {', '.join(missing)}; "
              f"install them with pip install -e '.[cuda13]' (numba-cuda[cu13])", file=sys.stderr)
        return 2
    jobs = args.jobs or len(os.sched_getaffinity(0))
    ccs = [_as_cc(c) for c in args.cc]
    t0 = time.perf_counter()

    def progress(n, total, rows):
        if not rows:        # a specialization for other compute capabilities only
            return
        r = rows[0]
        status = "ok" if all(x["ok"] for x in rows) else "FAILED"
        print(f"[{n:3d}/{total}] {r['kernel']:6s} {r['spec']}  {status}  {time.perf_counter() - t0:6.1f} s",
              file=sys.stderr, flush=True)

    rows = check(ccs, args.quick, args.pt, jobs=jobs, progress=progress, only=args.only, head_dims=args.head_dims)
    wall = time.perf_counter() - t0
    import numba
    import numba_cuda
    print(format_table(rows))
    print()
    print(f"numba {numba.__version__}, numba-cuda {numba_cuda.__version__}; {len(rows)} compiles "
          f"({len({(r['kernel'], r['spec']) for r in rows})} specializations x {len(ccs)} cc) in "
          f"{wall:.0f} s with {jobs} process(es). regs/spill/stack from ptxas via nvJitLink; smem is "
          f"static shared memory per block as nvJitLink reports it (on sm_90 it includes 1 KB the "
          f"system reserves); s = compile + link seconds.")
    print(format_summary(rows))
    failed = [r for r in rows if not r["ok"]]
    if failed:
        print()
        print(format_failures(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    # cuda.compile does not work in a simulator process; numba reads the variable at import.
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    sys.exit(main())
