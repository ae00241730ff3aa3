"""The tensor-core prefill (``kernels/cuda/paged_prefill.py``, F16 / BF16, Sq > 4, head dims that
are multiples of 16) against the float64 oracle, at shapes small enough for the CUDA simulator
(where its mma / ldmatrix / cp.async twins run the same fragment indexing): several row tiles and
key tiles (the double buffer), GQA / MQA / MHA, block sizes 1 / 3 / 16, causal and not, Sq > L,
L = 0, shared blocks, NaN in unused slots, ragged batches, windows, softcap and ALiBi. Each case also checks that the tensor-core kernel is
the one that ran, and matches the SIMT tiled kernel within the dtype's tolerance. F32 (3xTF32):
float32 tolerances, and an error against float64 within 2x of the SIMT kernel's."""
from __future__ import annotations

import numpy as np
import pytest

import paged_numba as pn
from paged_numba.ops.reference import paged_attention_fwd_ref
from helpers import (BF16, F16, F32, OUT_TOL, RUNTIMES, assert_fwd_close, assert_unchanged, make_case, reference,
                     seed_of, snapshot, spy_tensor_core_factory)

SIM_OK = True

pytestmark = pytest.mark.skipif("cuda" not in RUNTIMES, reason="no CUDA runtime (GPU or simulator)")

# (B, H, Hkv, Sq, D, bs, lens, causal, shared)
CASES = [
    (2, 2, 1, 20, 16, 3, [40, 19], True, True),      # GQA 2: 2 row tiles, 3 key tiles, shared blocks
    (1, 3, 3, 9, 32, 16, [33], False, False),         # MHA, D 32, partial last block
    (2, 4, 1, 6, 16, 1, [5, 0], True, False),         # MQA, block size 1, Sq > L, an empty sequence
    (1, 2, 2, 17, 16, 16, [17], True, False),         # causal square: a diagonal tile per row tile
]
IDS = ["gqa-shared", "mha-d32", "mqa-bs1-sq>L", "square"]


@pytest.fixture
def spy(monkeypatch):
    """Count the tensor-core prefill's launches; the split-K decode on tensor cores (the same
    factory with SPLIT) is not counted."""
    return spy_tensor_core_factory(monkeypatch, split=False)


@pytest.fixture(params=["default", "2-warps-mt1"])
def tiles(request, monkeypatch):
    """The client's tiles, and 2 warps of one m-tile each (Q fragments in registers) -- the other
    structure the GPU table uses."""
    if request.param != "default":
        from paged_numba.runtime import cuda as cuda_rt
        sim = pn.get_runtime("cuda").simulator
        monkeypatch.setattr(cuda_rt.plan, "mma_tiles", lambda D, s, *a, **kw: (2, 1, 16) if sim else (4, 1, 64))
    return request.param


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_mma_prefill_parity(spy, tiles, dtype, case):
    B, H, Hkv, Sq, D, bs, lens, causal, shared = case
    rng = np.random.default_rng(seed_of("mma-prefill", str(dtype), IDS[CASES.index(case)]))
    q, k, v, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, dtype, shared=shared)
    before = snapshot(q, k, v, bt, sl)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=causal, runtime="cuda")
    assert_unchanged(before, q, k, v, bt, sl)
    assert len(spy) == 1, "the tensor-core prefill did not run"
    ref_out, ref_lse = reference(q, k, v, bt, seq_lens=sl, causal=causal)
    assert_fwd_close(out, lse, ref_out, ref_lse, dtype)

    client = pn.get_runtime("cuda").client
    client.prefill_mma = False
    try:
        simt_out, simt_lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=causal, runtime="cuda")
    finally:
        client.prefill_mma = True
    assert len(spy) == 1, "prefill_mma = False must select the SIMT kernel"
    atol, rtol = OUT_TOL[dtype]
    np.testing.assert_allclose(out.astype(np.float64), simt_out.astype(np.float64), atol=atol, rtol=rtol)
    np.testing.assert_allclose(lse, simt_lse, atol=1e-5, rtol=1e-5)


def test_cuda_mma_prefill_flags_non_finite_scores(spy):
    """A visible score that overflows float32 raises, as on every other path."""
    rng = np.random.default_rng(seed_of("mma-overflow"))
    q, k, v, bt, sl = make_case(rng, 1, 2, 1, 6, 16, 4, [9], F16)
    with pytest.raises(ValueError, match="not finite"):
        pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=True, scale=1e38, runtime="cuda")
    assert len(spy) == 1


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("qdtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=IDS[:2])
def test_cuda_mma_prefill_fp8_kv(spy, fmt, qdtype, case):
    """FP8 K/V codes staged by cp.async and decoded into q's 16-bit type (exact) on the way into
    the tiles; per-tensor scales folded into the score and output scales."""
    from paged_numba.ops.reference import paged_attention_fwd_fp8_ref, quantize_fp8

    B, H, Hkv, Sq, D, bs, lens, causal, shared = case
    rng = np.random.default_rng(seed_of("mma-fp8", fmt, str(qdtype), IDS[CASES.index(case)]))
    q, k, v, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, np.float32, shared=shared)
    k8, v8 = quantize_fp8(k, fmt), quantize_fp8(v, fmt)   # NaN slots stay NaN codes
    q = q.astype(qdtype)
    kw = dict(seq_lens=sl, causal=causal, q_scale=0.5, k_scale=1.5, v_scale=0.75, o_scale=0.25)
    before = snapshot(q, k8, v8, bt, sl)
    out, lse = pn.paged_attention_fwd_fp8(q, k8, v8, bt, runtime="cuda", **kw)
    assert_unchanged(before, q, k8, v8, bt, sl)
    assert len(spy) == 1, "the tensor-core prefill did not run"
    ref_out, ref_lse = paged_attention_fwd_fp8_ref(q, k8, v8, bt, **kw)
    assert_fwd_close(out, lse, ref_out, ref_lse, qdtype)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("window", [-1, 0, 5, 40], ids=["nowin", "win0", "win5", "win40"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_mma_prefill_ragged_and_window(spy, dtype, window, causal):
    """A ragged batch (token-major q, per-sequence query counts 0, 1, 9, 20 -- only the two with
    more than 4 queries reach the tiled path) with sliding windows smaller than a block, across
    blocks and beyond L: the tensor-core kernel serves the tiled sequences."""
    B, H, Hkv, D, bs = 4, 2, 1, 16, 3
    lens = [5, 7, 23, 40]
    qn = np.array([0, 1, 9, 20])
    rng = np.random.default_rng(seed_of("mma-ragged", str(dtype), window, causal))
    _, k, v, bt, sl = make_case(rng, B, H, Hkv, 1, D, bs, lens, dtype, shared=True)
    cu = np.concatenate([[0], np.cumsum(qn)]).astype(np.int32)
    q = rng.standard_normal((int(cu[-1]), H, D)).astype(dtype)
    kw = dict(seq_lens=sl, causal=causal, cu_seqlens_q=cu, window_left=window)
    before = snapshot(q, k, v, bt, sl, cu)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, runtime="cuda", **kw)
    assert_unchanged(before, q, k, v, bt, sl, cu)
    assert len(spy) == 1, "the tensor-core prefill did not run"
    ref_out, ref_lse = paged_attention_fwd_ref(q, k, v, bt, **kw)
    assert_fwd_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("softcap,alibi", [(4.0, False), (0.0, True), (2.5, True)],
                         ids=["softcap", "alibi", "softcap+alibi"])
@pytest.mark.parametrize("window,fp8", [(-1, None), (6, None), (-1, "e4m3")], ids=["plain", "win6", "fp8"])
def test_cuda_mma_prefill_softcap_alibi(spy, dtype, softcap, alibi, window, fp8):
    """Softcap (scores large enough that the tanh saturates) and ALiBi on the tensor-core kernel,
    over a ragged causal batch, alone, with a window and over FP8 K/V: the modified scores follow
    the reference within the dtype's tolerance, lse included."""
    from paged_numba.ops.reference import paged_attention_fwd_fp8_ref, quantize_fp8

    B, H, Hkv, D, bs = 3, 4, 2, 16, 4
    lens = [9, 30, 21]
    qn = np.array([6, 17, 0])
    rng = np.random.default_rng(seed_of("mma-mods", str(dtype), softcap, alibi, window, fp8))
    _, k, v, bt, sl = make_case(rng, B, H, Hkv, 1, D, bs, lens, np.float32 if fp8 else dtype, shared=True)
    cu = np.concatenate([[0], np.cumsum(qn)]).astype(np.int32)
    q = (3.0 * rng.standard_normal((int(cu[-1]), H, D))).astype(dtype)
    kw = dict(seq_lens=sl, causal=True, cu_seqlens_q=cu, window_left=window, softcap=softcap,
              alibi_slopes=(rng.uniform(0.05, 1.0, H).astype(np.float32) if alibi else None))
    if fp8:
        k, v = quantize_fp8(k, fp8), quantize_fp8(v, fp8)
        kw.update(q_scale=1.0, k_scale=1.25, v_scale=0.5, o_scale=1.0)
    before = snapshot(q, k, v, bt, sl, cu)
    if fp8:
        out, lse = pn.paged_attention_fwd_fp8(q, k, v, bt, runtime="cuda", **kw)
        ref_out, ref_lse = paged_attention_fwd_fp8_ref(q, k, v, bt, **kw)
    else:
        out, lse = pn.paged_attention_fwd(q, k, v, bt, runtime="cuda", **kw)
        ref_out, ref_lse = paged_attention_fwd_ref(q, k, v, bt, **kw)
    assert_unchanged(before, q, k, v, bt, sl, cu)
    assert len(spy) == 1, "the tensor-core prefill did not run"
    assert spy[0][1].get("SOFTCAP") == (softcap > 0) and spy[0][1].get("ALIBI") == alibi
    assert_fwd_close(out, lse, ref_out, ref_lse, dtype)


def _rel_err(out, ref):
    """Largest |out - ref| over the outputs, relative to the largest |ref| (rows with keys)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


F32_CASES = [CASES[0], CASES[2], CASES[3], "ragged-mods"]
F32_IDS = ["gqa-shared", "mqa-bs1-sq>L", "square", "ragged-win-softcap-alibi"]


@pytest.mark.parametrize("case", F32_CASES, ids=F32_IDS)
def test_cuda_mma_prefill_f32_3xtf32(spy, case):
    """F32 q / K / V on tensor cores (3xTF32: each operand a TF32 high part plus a TF32 residual,
    three m16n8k8 products per step): float32 tolerances against the float64 oracle, and an error
    within 2x of the SIMT kernel's on the same inputs (floor: one float32 ulp, 2**-24)."""
    rng = np.random.default_rng(seed_of("mma-f32", F32_IDS[F32_CASES.index(case)]))
    if case == "ragged-mods":
        B, H, Hkv, D, bs = 3, 4, 2, 16, 4
        lens, qn = [9, 30, 21], np.array([6, 17, 0])
        _, k, v, bt, sl = make_case(rng, B, H, Hkv, 1, D, bs, lens, F32, shared=True)
        cu = np.concatenate([[0], np.cumsum(qn)]).astype(np.int32)
        q = (2.0 * rng.standard_normal((int(cu[-1]), H, D))).astype(F32)
        kw = dict(seq_lens=sl, causal=True, cu_seqlens_q=cu, window_left=11, softcap=5.0,
                  alibi_slopes=rng.uniform(0.05, 1.0, H).astype(np.float32))
        arrays = (q, k, v, bt, sl, cu)
    else:
        B, H, Hkv, Sq, D, bs, lens, causal, shared = case
        q, k, v, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, F32, shared=shared)
        kw = dict(seq_lens=sl, causal=causal)
        arrays = (q, k, v, bt, sl)
    before = snapshot(*arrays)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, runtime="cuda", **kw)
    assert_unchanged(before, *arrays)
    assert len(spy) == 1, "the tensor-core prefill did not run"
    ref_out, ref_lse = paged_attention_fwd_ref(q, k, v, bt, **kw)
    assert_fwd_close(out, lse, ref_out, ref_lse, F32)

    client = pn.get_runtime("cuda").client
    client.prefill_mma = False
    try:
        simt_out, _ = pn.paged_attention_fwd(q, k, v, bt, runtime="cuda", **kw)
    finally:
        client.prefill_mma = True
    assert len(spy) == 1, "prefill_mma = False must select the SIMT kernel"
    err, err_simt = _rel_err(out, ref_out), _rel_err(simt_out, ref_out)
    assert err <= 2 * max(err_simt, 2.0 ** -24), f"3xTF32 error {err:.2e}, SIMT {err_simt:.2e}"
