"""The tensor-core primitives of ``kernels/cuda/mma.py``, one warp at a time: cp.async (with its
zero fill), ldmatrix x4 (plain and .trans), mma m16n8k16 for BF16 and F16, mma m16n8k8 for TF32
with ``to_tf32`` / ``tf32_split`` (3xTF32), pack2 and the quad reductions, and the two-element
float32 atomic add. On a GPU these are the inline-PTX instructions; on the CUDA simulator their twins --
the same fragment semantics, so the same probe kernel must give the same products."""
from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest

from helpers import RUNTIMES, seed_of

SIM_OK = True

pytestmark = pytest.mark.skipif("cuda" not in RUNTIMES, reason="no CUDA runtime (GPU or simulator)")


if "cuda" in RUNTIMES:
    from numba import cuda, float32, uint16, uint32

    from paged_numba.kernels.cuda.codecs import i2f
    from paged_numba.kernels.cuda.mma import (cp_async16, cp_async_commit, cp_async_wait_all, ldsm_x4,
                                              ldsm_x4_t, mma, pack2, quad_max, quad_sum, red_add2, tf32_split,
                                              to_tf32)


@functools.cache
def _probe(kind):
    @cuda.jit
    def probe(a, bt, bk, out_nt, out_t, packed, red, zero):
        # a [16, 16], bt [16 (n), 16 (k)], bk [16 (k), 16 (n)] as uint16 bits; 8 halves per copy.
        sm = cuda.shared.array(0, uint16)
        lane = cuda.threadIdx.x
        for c in range(lane, 3 * 32, 32):           # 3 matrices x 32 chunks of 16 bytes
            mat = c // 32
            r = (c % 32) // 2
            half = c % 2
            src = a if mat == 0 else (bt if mat == 1 else bk)
            cp_async16(sm, mat * 256 + r * 16 + half * 8, src, r * 16 + half * 8, 16)
        cp_async16(sm, 3 * 256 + lane * 8, a, 0, 0)  # zero fill: 32 lanes x 8 halves
        cp_async_commit()
        cp_async_wait_all()
        cuda.syncthreads()
        fa = cuda.local.array(4, uint32)
        fb = cuda.local.array(4, uint32)
        acc = cuda.local.array(8, float32)
        g = lane // 4
        t = lane % 4
        i = lane // 8
        r = lane % 8
        ldsm_x4(fa, 0, sm, (r + 8 * (i % 2)) * 16 + 8 * (i // 2))
        # B from [n][k] rows (like K): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, ...)
        ldsm_x4(fb, 0, sm, 256 + (r + 8 * (i // 2)) * 16 + 8 * (i % 2))
        for j in range(8):
            acc[j] = 0.0
        mma(kind, acc, 0, fa, 0, fb, 0)
        mma(kind, acc, 4, fa, 0, fb, 2)
        for nt in range(2):
            for j in range(4):
                out_nt[g + 8 * (j // 2), nt * 8 + 2 * t + j % 2] = acc[nt * 4 + j]
        # B from [k][n] rows (like V) through .trans: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), ...
        ldsm_x4_t(fb, 0, sm, 512 + (r + 8 * (i % 2)) * 16 + 8 * (i // 2))
        for j in range(8):
            acc[j] = 1.0                              # accumulates onto C = 1
        mma(kind, acc, 0, fa, 0, fb, 0)
        mma(kind, acc, 4, fa, 0, fb, 2)
        for nt in range(2):
            for j in range(4):
                out_t[g + 8 * (j // 2), nt * 8 + 2 * t + j % 2] = acc[nt * 4 + j]
        packed[lane] = pack2(kind, float32(lane) * float32(0.3), float32(lane) * float32(-1.7))
        red[lane, 0] = quad_max(float32(lane * 7 % 11))
        red[lane, 1] = quad_sum(float32(lane))
        z = 0
        for e in range(8):
            z |= sm[3 * 256 + lane * 8 + e]
        zero[lane] = z

    return probe


@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_cuda_primitives(kind):
    from paged_numba.dtypes import BF16, F16

    npdt = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}[kind]
    code = {"bf16": BF16, "f16": F16}[kind]
    rng = np.random.default_rng(seed_of("mma", kind))
    A = rng.standard_normal((16, 16)).astype(npdt)
    Bm = rng.standard_normal((16, 16)).astype(npdt)          # B [k, n]
    a = A.view(np.uint16).reshape(-1)                        # flat: the primitives index 1-D arrays
    bt = np.ascontiguousarray(Bm.T).view(np.uint16).reshape(-1)   # [n, k]
    bk = np.ascontiguousarray(Bm).view(np.uint16).reshape(-1)     # [k, n]
    out_nt = np.zeros((16, 16), np.float32)
    out_t = np.zeros((16, 16), np.float32)
    packed = np.zeros(32, np.uint32)
    red = np.zeros((32, 2), np.float32)
    zero = np.full(32, 7, np.int64)
    args = [cuda.to_device(x) for x in (a, bt, bk, out_nt, out_t, packed, red, zero)]
    _probe(code)[1, 32, 0, 4 * 256 * 2](*args)
    out_nt, out_t, packed, red, zero = (x.copy_to_host() for x in args[3:])
    ref = A.astype(np.float64) @ Bm.astype(np.float64)
    np.testing.assert_allclose(out_nt, ref, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(out_t, ref + 1.0, atol=1e-4, rtol=1e-5)
    lanes = np.arange(32, dtype=np.float32)
    lo = (lanes * np.float32(0.3)).astype(npdt).view(np.uint16).astype(np.uint32)
    hi = (lanes * np.float32(-1.7)).astype(npdt).view(np.uint16).astype(np.uint32)
    np.testing.assert_array_equal(packed, lo | (hi << 16))
    v = (np.arange(32) * 7 % 11).astype(np.float32).reshape(8, 4)
    np.testing.assert_array_equal(red[:, 0], np.repeat(v.max(axis=1), 4))
    np.testing.assert_array_equal(red[:, 1], np.repeat(lanes.reshape(8, 4).sum(axis=1), 4))
    np.testing.assert_array_equal(zero, 0)


@functools.cache
def _red_probe():
    @cuda.jit
    def probe(acc):
        tid = cuda.threadIdx.x + cuda.blockIdx.x * cuda.blockDim.x
        red_add2(acc, 2 * (tid % 4), float32(tid) * float32(0.5), float32(-tid))

    return probe


def test_cuda_red_add2():
    """``red_add2`` from 3 blocks of 64 threads onto 4 pairs of slots: every pair gets each of its
    threads' two values (sums exact in float32), nothing lands elsewhere (sm_90: one
    red.global.add.v2.f32 per call)."""
    from paged_numba.runtime import get_runtime

    if not get_runtime("cuda").simulator and cuda.get_current_device().compute_capability < (9, 0):
        pytest.skip("red.global.add.v2.f32 needs sm_90")
    acc = cuda.to_device(np.full(10, 1.0, np.float32))
    _red_probe()[3, 64](acc)
    got = acc.copy_to_host()
    tids = np.arange(192)
    want = np.full(10, 1.0)
    for p in range(4):
        sel = tids[tids % 4 == p]
        want[2 * p] += 0.5 * sel.sum()
        want[2 * p + 1] -= sel.sum()
    np.testing.assert_array_equal(got, want)


def _tf32_rna(x):
    """NumPy TF32 rounding of float32 (nearest, ties away from zero), as float32."""
    u = np.asarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


@functools.cache
def _tf32_probe():
    from paged_numba.dtypes import F32

    @cuda.jit
    def probe(a, b, x, rounded, single, triple):
        # a [16, 8] (m x k), b [8, 8] (k x n) float32; fragments read straight from global memory.
        lane = cuda.threadIdx.x
        g = lane // 4
        t = lane % 4
        ah = cuda.local.array(4, uint32)
        al = cuda.local.array(4, uint32)
        bh = cuda.local.array(2, uint32)
        bl = cuda.local.array(2, uint32)
        for j in range(4):
            ah[j], al[j] = tf32_split(a[g + 8 * (j % 2), t + 4 * (j // 2)])
        for j in range(2):
            bh[j], bl[j] = tf32_split(b[t + 4 * j, g])
        acc = cuda.local.array(4, float32)
        for j in range(4):
            acc[j] = 0.0
        mma(F32, acc, 0, ah, 0, bh, 0)          # one TF32 product of the high parts
        for j in range(4):
            single[g + 8 * (j // 2), 2 * t + j % 2] = acc[j]
            acc[j] = 0.5                        # accumulates onto C = 0.5
        mma(F32, acc, 0, al, 0, bh, 0)
        mma(F32, acc, 0, ah, 0, bl, 0)
        mma(F32, acc, 0, ah, 0, bh, 0)
        for j in range(4):
            triple[g + 8 * (j // 2), 2 * t + j % 2] = acc[j]
        for i in range(lane, x.size, 32):
            rounded[i] = i2f(to_tf32(x[i]))

    return probe


def test_cuda_tf32_mma_and_split():
    """``to_tf32`` rounds to nearest with ties away from zero (bit for bit against NumPy, on random
    values and on exact ties); one m16n8k8 TF32 mma of the high parts gives the product of the
    TF32-rounded operands; the 3xTF32 sum (lo hi + hi lo + hi hi, onto C) reaches float32 accuracy."""
    rng = np.random.default_rng(seed_of("mma-tf32"))
    A = rng.standard_normal((16, 8)).astype(np.float32)
    Bm = rng.standard_normal((8, 8)).astype(np.float32)
    ties = (np.arange(1, 65, dtype=np.uint32) << np.uint32(13) | np.uint32(0x1000)).view(np.float32)
    x = np.concatenate([rng.standard_normal(192).astype(np.float32) * 100, ties, -ties])
    rounded = np.zeros_like(x)
    single = np.zeros((16, 8), np.float32)
    triple = np.zeros((16, 8), np.float32)
    args = [cuda.to_device(v) for v in (A, Bm, x, rounded, single, triple)]
    _tf32_probe()[1, 32](*args)
    rounded, single, triple = (v.copy_to_host() for v in args[3:])
    np.testing.assert_array_equal(rounded.view(np.uint32), _tf32_rna(x).view(np.uint32))
    ref_single = _tf32_rna(A).astype(np.float64) @ _tf32_rna(Bm).astype(np.float64)
    np.testing.assert_allclose(single, ref_single, atol=1e-5, rtol=1e-5)
    ref = A.astype(np.float64) @ Bm.astype(np.float64) + 0.5
    err3 = np.abs(triple - ref).max()
    err1 = np.abs(single + 0.5 - ref).max()
    assert err3 < 2e-6, f"3xTF32 error {err3}"
    assert err3 < err1 / 20, f"3xTF32 error {err3} not far below one TF32 product's {err1}"
