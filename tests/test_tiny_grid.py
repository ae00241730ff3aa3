"""The parity grid at tiny shapes, for every runtime -- including the CUDA simulator, where each
case costs seconds. Covers both CUDA kernels (decode for Sq <= 4, tiled for Sq > 4), every dtype,
GQA / MQA / MHA, odd block sizes and head dims, causal and not, L_b = 0, shared blocks, NaN in
unused slots, 3-D pools and FP8 caches, and the backward (its three kernels, shared blocks summed
through atomics). The larger grids live in test_forward.py / test_fp8.py / test_backward.py."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import paged_numba as pn
from helpers import (BF16, DTYPE_IDS, F16, F32, assert_fwd_close, assert_unchanged, make_case, reference,
                     seed_of, snapshot)
from paged_numba.ops.reference import paged_attention_fwd_fp8_ref, quantize_fp8
from test_backward import run_and_check

SIM_OK = True  # every case here is small enough for the CUDA simulator

# (B, H, Hkv, Sq, D, bs, lens, causal, shared, kv3d)
CASES = [
    (2, 4, 2, 1, 16, 4, [11, 0], False, True, False),    # decode, GQA 2, an empty sequence
    (2, 3, 1, 2, 8, 3, [7, 5], True, False, True),        # decode, MQA, 3-D pool, Sq 2 causal
    (1, 2, 2, 4, 24, 5, [3], True, False, False),          # decode kernel with Sq > L (empty rows)
    (2, 2, 1, 7, 16, 4, [9, 13], True, True, False),       # tiled, GQA, shared blocks
    (1, 2, 2, 9, 40, 3, [6], True, False, False),          # tiled, Sq > L, D 40
    (1, 1, 1, 6, 8, 1, [10], False, False, False),         # tiled, block size 1, non-causal
]
IDS = ["decode-gqa", "decode-mqa-3d", "decode-sq>L", "tiled-shared", "tiled-sq>L", "tiled-bs1"]


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tiny_forward(runtime_name, dtype, case):
    B, H, Hkv, Sq, D, bs, lens, causal, shared, kv3d = case
    rng = np.random.default_rng(seed_of(str(dtype), IDS[CASES.index(case)]))
    q, k, v, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, dtype, shared=shared, kv3d=kv3d)
    before = snapshot(q, k, v, bt, sl)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=causal, runtime=runtime_name)
    assert_unchanged(before, q, k, v, bt, sl)
    ref_out, ref_lse = reference(q, k, v, bt, seq_lens=sl, causal=causal)
    assert_fwd_close(out, lse, ref_out, ref_lse, dtype)


FP8 = {"e4m3": np.dtype(ml_dtypes.float8_e4m3fn), "e5m2": np.dtype(ml_dtypes.float8_e5m2)}


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("qkind", ["f32", "bf16", "fp8"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["decode", "tiled"])
def test_tiny_forward_fp8(runtime_name, fmt, qkind, case):
    B, H, Hkv, Sq, D, bs, lens, causal, shared, kv3d = case
    rng = np.random.default_rng(len(fmt) * 7 + len(qkind) + Sq)
    q, k, v, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, F32, shared=shared)
    k8, v8 = quantize_fp8(k, fmt), quantize_fp8(v, fmt)   # NaN slots stay NaN codes
    qq = {"f32": q, "bf16": q.astype(ml_dtypes.bfloat16), "fp8": quantize_fp8(q, fmt)}[qkind]
    kw = dict(seq_lens=sl, causal=causal, q_scale=0.5, k_scale=1.5, v_scale=0.75, o_scale=0.25)
    out, lse = pn.paged_attention_fwd_fp8(qq, k8, v8, bt, runtime=runtime_name, **kw)
    ref_out, ref_lse = paged_attention_fwd_fp8_ref(qq, k8, v8, bt, **kw)
    assert lse.dtype == np.float32 and not np.isnan(lse).any()
    empty = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=1e-5, atol=1e-5)
    got = out.astype(np.float64)
    assert not np.isnan(got).any()
    if qkind == "fp8":
        assert out.dtype == FP8[fmt]
        # Within one FP8 step of the exact value: the quantized reference or a neighbour.
        want = quantize_fp8(ref_out, fmt).astype(np.float64)
        step = np.abs(want) * (2.0 ** -(3 if fmt == "e4m3" else 2)) + 2.0 ** -9
        assert np.all(np.abs(got - want) <= step + 1e-12)
    else:
        tol = 1e-5 if qkind == "f32" else 2e-2
        np.testing.assert_allclose(got, ref_out, rtol=tol, atol=tol)


BWD_CASES = [(c, F32) for c in CASES] + [(CASES[0], BF16), (CASES[3], F16), (CASES[1], BF16)]


@pytest.mark.parametrize("case,dtype", BWD_CASES,
                         ids=[f"{IDS[CASES.index(c)]}-{DTYPE_IDS[d]}" for c, d in BWD_CASES])
def test_tiny_backward(runtime_name, case, dtype):
    B, H, Hkv, Sq, D, bs, lens, causal, shared, kv3d = case
    rng = np.random.default_rng(seed_of("bwd", str(dtype), IDS[CASES.index(case)]))
    run_and_check(runtime_name, rng, B, H, Hkv, Sq, D, bs, lens, dtype, causal, shared=shared, kv3d=kv3d)
