"""Parity of ``pn.paged_attention_fwd_fp8`` with the float64 oracle ``paged_attention_fwd_fp8_ref``,
per runtime.

K / V are FP8 (E4M3 or E5M2), given as ml_dtypes arrays or as raw ``uint8`` codes with
``fp8_format``; q is F32, F16, BF16 or FP8 of the same format. Every scale dequantizes by
multiplication and the stored output is o / o_scale in q's dtype, so:

- float q: out (q's dtype) against the oracle with helpers.py's per-dtype tolerances;
- FP8 q: out is an ml_dtypes FP8 array; its decoded values must be one of the two FP8 neighbours of
  the oracle's value (saturated to +-max), and equal ``quantize_fp8(ref)`` unless the reference sits
  on a rounding tie (float32 accumulation may land on either side of it);
- lse float32 against the oracle's, 1e-5.

Unused slots hold NaN codes (0x7F / 0xFF for E4M3; 0x7D-0x7F, 0xFD-0xFF and +-inf for E5M2).
"""
import itertools
import warnings

import ml_dtypes
import numpy as np
import pytest

import paged_numba as pn
from helpers import (BF16, F16, F32, assert_fwd_close, assert_unchanged, is_sim, make_case,
                      skip_if_too_big_for_sim, snapshot)
from paged_numba.ops.reference import paged_attention_fwd_fp8_ref, quantize_fp8

FORMATS = ["e4m3", "e5m2"]
ML = {"e4m3": np.dtype(ml_dtypes.float8_e4m3fn), "e5m2": np.dtype(ml_dtypes.float8_e5m2)}
PN_DTYPE = {"e4m3": pn.DType.FP8_E4M3, "e5m2": pn.DType.FP8_E5M2}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
POISON = {"e4m3": [0x7F, 0xFF], "e5m2": [0x7E, 0x7F, 0xFE, 0xFF, 0x7D, 0x7C, 0xFC]}
Q_KINDS = ["f32", "f16", "bf16", "fp8"]
Q_FLOAT = {"f32": F32, "f16": F16, "bf16": BF16}
HEADS = [(4, 4), (8, 2), (6, 1)]          # (H, Hkv): MHA, GQA (G = 4), MQA (G = 6)
HEAD_IDS = ["mha", "gqa", "mqa"]
SCALES = dict(q_scale=0.75, k_scale=1.5, v_scale=0.5, o_scale=0.25)


def to_codes(x, fmt) -> np.ndarray:
    """uint8 codes of float values, by ml_dtypes (saturating)."""
    m = FP8_MAX[fmt]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.clip(np.asarray(x, np.float32), -m, m).astype(ML[fmt]).view(np.uint8)


def make_fp8_case(rng, B, H, Hkv, Sq, D, bs, lens, fmt, q_kind, *, raw=False, shared=False,
                  kv3d=False, mag=2.0):
    """(q, k_blocks, v_blocks, block_table, seq_lens, fp8_format) -- make_case's layout with FP8
    K / V (ml_dtypes, or raw uint8 when ``raw``) whose unread slots hold NaN / inf codes; q of
    ``q_kind`` (FP8 q: same format, raw like K / V). ``fp8_format`` is the argument to pass."""
    q32, k32, v32, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, F32, shared=shared, kv3d=kv3d)
    unread = np.isnan(k32)
    kc, vc = to_codes(k32 * mag, fmt), to_codes(v32 * mag, fmt)
    for c in (kc, vc):
        c[unread] = rng.choice(POISON[fmt], size=int(unread.sum()))
    if q_kind == "fp8":
        q = to_codes(q32 * mag, fmt)
        q = q if raw else q.view(ML[fmt])
    else:
        q = q32.astype(Q_FLOAT[q_kind])
    if not raw:
        kc, vc = kc.view(ML[fmt]), vc.view(ML[fmt])
    return q, kc, vc, bt, sl, (fmt if raw else None)


def fp8_grid(fmt) -> np.ndarray:
    """Sorted float64 finite values of the format, both signs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v = np.arange(256, dtype=np.uint8).view(ML[fmt]).astype(np.float64)
    return np.unique(v[np.isfinite(v)])


def assert_fp8_out_close(got, ref, fmt):
    """``got`` (decoded FP8) is one of the two FP8 neighbours of ``ref`` (saturated to +-max), and
    equals quantize_fp8(ref) wherever ref is not within 1e-4 (relative) of a rounding tie."""
    grid = fp8_grid(fmt)
    m = FP8_MAX[fmt]
    r = np.clip(ref, -m, m)
    idx = np.searchsorted(grid, r, side="right")
    lo = grid[np.clip(idx - 1, 0, grid.size - 1)]
    hi = grid[np.clip(idx, 0, grid.size - 1)]
    ok = (got == lo) | (got == hi)
    if not ok.all():
        i = np.flatnonzero(~ok.reshape(-1))[:6]
        raise AssertionError(f"{(~ok).sum()} FP8 outputs are not a neighbour of the reference: "
                             f"got {got.reshape(-1)[i]}, ref {ref.reshape(-1)[i]}")
    want = quantize_fp8(ref, fmt).astype(np.float64)
    near_tie = np.abs(r - (lo + hi) / 2) <= 1e-4 * np.abs(r)
    bad = (got != want) & ~near_tie
    assert not bad.any(), (f"FP8 out differs from quantize_fp8(ref) off a tie: got {got[bad][:6]}, "
                           f"want {want[bad][:6]}, ref {ref[bad][:6]}")


def check_fp8(out, lse, ref_out, ref_lse, q, fmt):
    out, lse = np.asarray(out), np.asarray(lse)
    if np.dtype(q.dtype) in (F32, F16, BF16):
        assert_fwd_close(out, lse, ref_out, ref_lse, q.dtype)
        return
    assert out.dtype == ML[fmt], f"FP8 q must give an ml_dtypes {ML[fmt]} out, got {out.dtype}"
    assert lse.dtype == np.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    got = out.astype(np.float64)
    assert not np.isnan(got).any() and not np.isinf(got).any(), "NaN / inf in FP8 out"
    assert not np.isnan(lse).any(), "NaN in lse"
    empty = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty, err_msg="lse = -inf rows differ")
    assert np.all(got[empty] == 0.0)
    assert_fp8_out_close(got, ref_out, fmt)
    np.testing.assert_allclose(lse[~empty].astype(np.float64), ref_lse[~empty], rtol=1e-5, atol=1e-5,
                               err_msg="lse")


def run_and_check(runtime_name, rng, B, H, Hkv, Sq, D, bs, lens, fmt, q_kind, causal, *, raw=False,
                  shared=False, kv3d=False, scale=None, scales=SCALES, mag=2.0):
    q, k, v, bt, sl, fp8_format = make_fp8_case(rng, B, H, Hkv, Sq, D, bs, lens, fmt, q_kind, raw=raw,
                                                shared=shared, kv3d=kv3d, mag=mag)
    skip_if_too_big_for_sim(runtime_name, q.shape, int(sl.max(initial=0)))
    before = snapshot(q, k, v, bt, sl)
    out, lse = pn.paged_attention_fwd_fp8(q, k, v, bt, causal=causal, seq_lens=sl, scale=scale,
                                          fp8_format=fp8_format, runtime=runtime_name, **scales)
    assert_unchanged(before, q, k, v, bt, sl)
    assert type(out) is np.ndarray and type(lse) is np.ndarray
    ref_out, ref_lse = paged_attention_fwd_fp8_ref(q, k, v, bt, seq_lens=sl, causal=causal, scale=scale,
                                                   fp8_format=fmt, **scales)
    check_fp8(out, lse, ref_out, ref_lse, q, fmt)
    return (q, k, v, bt, sl, fp8_format), (out, lse), (ref_out, ref_lse)


# ------------------------------------------------------------------------------- parity

_KIND_CASES = [(f, qk, raw, i) for i, (f, qk, raw) in
               enumerate(itertools.product(FORMATS, Q_KINDS, [False, True]))]


@pytest.mark.parametrize("fmt,q_kind,raw,i", _KIND_CASES,
                         ids=[f"{f}-q{qk}-{'u8' if raw else 'ml'}" for f, qk, raw, _ in _KIND_CASES])
def test_fp8_parity_formats_and_q_dtypes(runtime_name, fmt, q_kind, raw, i):
    """Both formats x every q dtype x ml_dtypes / raw uint8 K/V; heads, block size, causal, Sq
    and D rotate across cases; L_b = 0, L_b < Sq and partial blocks in every case."""
    H, Hkv = HEADS[i % 3]
    bs = (1, 3, 16)[i % 3]
    causal = i % 2 == 0
    Sq = (1, 4, 7)[i % 3]
    D = (16, 40, 64, 128)[i % 4]
    rng = np.random.default_rng(100 + i)
    lens = [0, 2, 2 * bs + 1, 37]
    run_and_check(runtime_name, rng, 4, H, Hkv, Sq, D, bs, lens, fmt, q_kind, causal, raw=raw)


_BS_CASES = [(f, bs, c, i) for i, (f, bs, c) in enumerate(itertools.product(FORMATS, [1, 3, 16],
                                                                              [False, True]))]


@pytest.mark.parametrize("fmt,bs,causal,i", _BS_CASES,
                         ids=[f"{f}-bs{bs}-{'causal' if c else 'full'}" for f, bs, c, _ in _BS_CASES])
def test_fp8_parity_block_sizes(runtime_name, fmt, bs, causal, i):
    """Block sizes 1 / 3 / 16, causal and not; lengths on and around block edges; q dtype rotates."""
    H, Hkv = HEADS[i % 3]
    Sq = 1 if i % 4 < 2 else 5
    rng = np.random.default_rng(200 + i)
    lens = [bs, bs + 1, 3 * bs - 1, 4, 0]
    run_and_check(runtime_name, rng, 5, H, Hkv, Sq, 32, bs, lens, fmt, Q_KINDS[i % 4], causal)


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("Sq", [1, 9])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_kind", ["f32", "fp8"])
def test_fp8_parity_gqa_sq(runtime_name, heads, Sq, causal, q_kind):
    """MHA / GQA / MQA x Sq (1, and 9 > some L_b) x causal, E4M3 K/V, f32 and FP8 q."""
    H, Hkv = heads
    rng = np.random.default_rng(300 + H * 100 + Hkv * 10 + Sq + causal)
    run_and_check(runtime_name, rng, 4, H, Hkv, Sq, 24, 4, [9, 5, 23, 0], "e4m3", q_kind, causal)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("q_kind", ["bf16", "fp8"])
def test_fp8_parity_shared_blocks(runtime_name, fmt, q_kind):
    rng = np.random.default_rng(400 + len(q_kind))
    (q, k, v, bt, sl, _), _, _ = run_and_check(runtime_name, rng, 5, 8, 2, 3, 32, 4, [13, 16, 9, 2, 21],
                                               fmt, q_kind, True, shared=True)
    read = [int(bt[b, j]) for b in range(5) for j in range(-(-int(sl[b]) // 4))]
    assert len(set(read)) < len(read), "make_case(shared=True) did not share any block"


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_parity_kv3d(runtime_name, fmt):
    """A 3-D [N, bs, D] FP8 pool is Hkv = 1 and gives what the 4-D [N, bs, 1, D] pool gives."""
    rng = np.random.default_rng(500)
    (q, k, v, bt, sl, f), (out, lse), _ = run_and_check(
        runtime_name, rng, 3, 4, 1, 2, 16, 3, [7, 1, 12], fmt, "fp8", True, kv3d=True)
    assert k.ndim == 3
    out4, lse4 = pn.paged_attention_fwd_fp8(q, k[:, :, None, :], v[:, :, None, :], bt, causal=True,
                                            seq_lens=sl, runtime=runtime_name, **SCALES)
    np.testing.assert_array_equal(out4.view(np.uint8), out.view(np.uint8))
    np.testing.assert_array_equal(lse4, lse)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale", [None, 0.3, -1.1])
def test_fp8_parity_custom_scale_and_unit_scales(runtime_name, fmt, scale):
    rng = np.random.default_rng(600)
    unit = dict(q_scale=1.0, k_scale=1.0, v_scale=1.0, o_scale=1.0)
    run_and_check(runtime_name, rng, 2, 4, 2, 3, 16, 4, [10, 7], fmt, "f32", True, scale=scale,
                  scales=unit)
    run_and_check(runtime_name, rng, 2, 4, 2, 3, 16, 4, [10, 7], fmt, "fp8", False, scale=scale,
                  scales=dict(q_scale=0.02, k_scale=3.0, v_scale=7.0, o_scale=0.5), mag=1.0)


def test_fp8_prefill_many_query_tiles(runtime_name):
    if is_sim(runtime_name):
        pytest.skip("prefill shapes are too large for the CUDA simulator")
    rng = np.random.default_rng(650)
    run_and_check(runtime_name, rng, 3, 4, 2, 70, 64, 16, [70, 60, 115], "e4m3", "fp8", True)
    run_and_check(runtime_name, rng, 2, 4, 1, 40, 64, 16, [300, 41], "e5m2", "f16", True)


# ------------------------------------------------------------------------------- semantics

@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_matches_float_forward_on_decoded_values(runtime_name, fmt):
    """Unit scales, f32 q: the FP8 op equals the float op on K / V decoded to float32."""
    rng = np.random.default_rng(700)
    q, k, v, bt, sl, _ = make_fp8_case(rng, 3, 4, 2, 5, 32, 4, [9, 14, 3], fmt, "f32")
    out, lse = pn.paged_attention_fwd_fp8(q, k, v, bt, causal=True, seq_lens=sl, runtime=runtime_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kf, vf = k.astype(np.float32), v.astype(np.float32)
    out_f, lse_f = pn.paged_attention_fwd(q, kf, vf, bt, causal=True, seq_lens=sl, runtime=runtime_name)
    np.testing.assert_allclose(out, out_f, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse, lse_f, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_scales_multiply(runtime_name, fmt):
    """Real value = code x scale: doubling k_scale doubles the scores (= doubling ``scale``);
    doubling v_scale or halving o_scale doubles the output."""
    rng = np.random.default_rng(710)
    q, k, v, bt, sl, _ = make_fp8_case(rng, 2, 4, 2, 3, 16, 4, [9, 6], fmt, "f32")
    kw = dict(causal=True, seq_lens=sl, runtime=runtime_name)
    base, lse = pn.paged_attention_fwd_fp8(q, k, v, bt, **kw)
    a, la = pn.paged_attention_fwd_fp8(q, k, v, bt, k_scale=2.0, **kw)
    b, lb = pn.paged_attention_fwd_fp8(q, k, v, bt, scale=2.0 / 4.0, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(la, lb, rtol=1e-6, atol=1e-6)
    c, lc = pn.paged_attention_fwd_fp8(q, k, v, bt, v_scale=2.0, **kw)
    d, ld = pn.paged_attention_fwd_fp8(q, k, v, bt, o_scale=0.5, **kw)
    np.testing.assert_allclose(c, 2 * base, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d, 2 * base, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(lc, lse)
    np.testing.assert_array_equal(ld, lse)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("raw", [False, True], ids=["ml", "u8"])
def test_fp8_output_saturates(runtime_name, fmt, raw):
    """A tiny o_scale pushes o / o_scale past the FP8 range: outputs saturate to +-max, never
    NaN or inf, and still follow the reference's rounding."""
    rng = np.random.default_rng(800 + raw)
    o_scale = {"e4m3": 1e-3, "e5m2": 1e-5}[fmt]
    scales = dict(q_scale=0.5, k_scale=0.5, v_scale=1.0, o_scale=o_scale)
    (q, k, v, bt, sl, f), (out, lse), (ref_out, _) = run_and_check(
        runtime_name, rng, 3, 4, 2, 4, 16, 4, [9, 16, 5], fmt, "fp8", True, raw=raw, scales=scales)
    got = out.astype(np.float64)
    m = FP8_MAX[fmt]
    over = np.abs(ref_out) > m
    assert over.mean() > 0.5, "the case should mostly overflow"
    np.testing.assert_array_equal(got[over], np.sign(ref_out[over]) * m)
    assert np.abs(got).max() == m and not np.isnan(got).any()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("q_kind", ["f32", "fp8"])
def test_fp8_poison_codes_never_leak(runtime_name, fmt, q_kind):
    """Unread slots holding any code (every NaN code, +-inf, max, 0) give bit-identical results."""
    rng = np.random.default_rng(900)
    q, k, v, bt, sl, _ = make_fp8_case(rng, 3, 4, 2, 4, 16, 4, [5, 2, 0], fmt, q_kind, shared=True)
    kw = dict(causal=True, seq_lens=sl, runtime=runtime_name, **SCALES)
    out, lse = pn.paged_attention_fwd_fp8(q, k, v, bt, **kw)
    unread = np.isnan(k.astype(np.float32)) | np.isinf(k.astype(np.float32))
    assert unread.any()
    for junk in POISON[fmt] + [0x7E, 0xFE, 0x00]:
        kj, vj = k.view(np.uint8).copy(), v.view(np.uint8).copy()
        kj[unread], vj[unread] = junk, junk
        out2, lse2 = pn.paged_attention_fwd_fp8(q, kj.view(ML[fmt]), vj.view(ML[fmt]), bt, **kw)
        np.testing.assert_array_equal(np.asarray(out2).view(np.uint8 if q_kind == "fp8" else np.uint32),
                                      np.asarray(out).view(np.uint8 if q_kind == "fp8" else np.uint32))
        np.testing.assert_array_equal(lse2, lse)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_rows_without_keys(runtime_name, fmt):
    """L_b = 0 and causal rows with p < 0: out exactly 0 (FP8 code 0 or -0), lse -inf."""
    rng = np.random.default_rng(950)
    q, k, v, bt, sl, _ = make_fp8_case(rng, 3, 4, 2, 6, 16, 4, [0, 2, 11], fmt, "fp8")
    out, lse = pn.paged_attention_fwd_fp8(q, k, v, bt, causal=True, seq_lens=sl, runtime=runtime_name,
                                          **SCALES)
    got = out.astype(np.float64)
    assert np.all(got[0] == 0) and np.all(np.isneginf(lse[0]))
    assert np.all(got[1, :, :4] == 0) and np.all(np.isneginf(lse[1, :, :4]))
    assert np.all(np.isfinite(lse[1, :, 4:])) and np.all(np.isfinite(lse[2]))


# ------------------------------------------------------------------------------- API surface

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("q_kind", Q_KINDS)
def test_fp8_output_dtype_is_q_dtype(runtime_name, fmt, q_kind):
    rng = np.random.default_rng(1000)
    for raw in (False, True):
        q, k, v, bt, sl, f = make_fp8_case(rng, 2, 2, 1, 3, 8, 4, [5, 8], fmt, q_kind, raw=raw)
        out, lse = pn.paged_attention_fwd_fp8(q, k, v, bt, seq_lens=sl, fp8_format=f,
                                              runtime=runtime_name)
        want = ML[fmt] if q_kind == "fp8" else Q_FLOAT[q_kind]
        assert out.dtype == want and out.shape == q.shape
        assert lse.dtype == np.float32 and lse.shape == q.shape[:3]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("q_kind", ["f16", "fp8"])
def test_fp8_tensor_in_tensor_out(runtime_name, fmt, q_kind):
    rng = np.random.default_rng(1100)
    q, k, v, bt, sl, _ = make_fp8_case(rng, 2, 4, 2, 3, 16, 4, [6, 9], fmt, q_kind)
    kw = dict(causal=True, seq_lens=sl, **SCALES)
    out, lse = pn.paged_attention_fwd_fp8(q, k, v, bt, runtime=runtime_name, **kw)
    rt = pn.get_runtime(runtime_name)
    tq, tk, tv = (pn.tensor(x, runtime=rt) for x in (q, k, v))
    assert tk.dtype == PN_DTYPE[fmt]
    tbefore = snapshot(tq.numpy(), tk.numpy(), tv.numpy())
    tout, tlse = pn.paged_attention_fwd_fp8(tq, tk, tv, bt, **kw)
    assert_unchanged(tbefore, tq.numpy(), tk.numpy(), tv.numpy())
    assert isinstance(tout, pn.Tensor) and isinstance(tlse, pn.Tensor)
    assert tout.runtime is rt and tlse.runtime is rt
    assert tout.dtype == tq.dtype and tlse.dtype == pn.DType.F32
    assert tout.shape == q.shape and tlse.shape == q.shape[:3]
    assert tout.numpy().dtype == out.dtype
    np.testing.assert_array_equal(tout.numpy().view(np.uint8), out.view(np.uint8))
    np.testing.assert_array_equal(tlse.numpy(), lse)
    # Raw uint8 codes as Tensors: dtype names the format.
    tk8 = pn.tensor(k.view(np.uint8), runtime=rt, dtype=PN_DTYPE[fmt].value)
    tv8 = pn.tensor(v.view(np.uint8), runtime=rt, dtype=PN_DTYPE[fmt].value)
    tout8, _ = pn.paged_attention_fwd_fp8(tq, tk8, tv8, bt, **kw)
    np.testing.assert_array_equal(tout8.numpy().view(np.uint8), out.view(np.uint8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_raw_and_ml_dtypes_inputs_agree(runtime_name, fmt):
    rng = np.random.default_rng(1200)
    q, k, v, bt, sl, _ = make_fp8_case(rng, 2, 4, 2, 3, 16, 4, [6, 9], fmt, "fp8")
    kw = dict(causal=True, seq_lens=sl, runtime=runtime_name, **SCALES)
    out, lse = pn.paged_attention_fwd_fp8(q, k, v, bt, **kw)
    for f in (fmt, {"e4m3": "e4m3fn", "e5m2": "E5M2"}[fmt]):
        out2, lse2 = pn.paged_attention_fwd_fp8(q.view(np.uint8), k.view(np.uint8), v.view(np.uint8),
                                                bt, fp8_format=f, **kw)
        assert out2.dtype == ML[fmt]
        np.testing.assert_array_equal(out2.view(np.uint8), out.view(np.uint8))
        np.testing.assert_array_equal(lse2, lse)
    # Mixed: ml_dtypes q with raw K / V, and fp8_format given alongside ml_dtypes arrays.
    out3, _ = pn.paged_attention_fwd_fp8(q, k.view(np.uint8), v.view(np.uint8), bt, fp8_format=fmt, **kw)
    out4, _ = pn.paged_attention_fwd_fp8(q, k, v, bt, fp8_format=fmt, **kw)
    np.testing.assert_array_equal(out3.view(np.uint8), out.view(np.uint8))
    np.testing.assert_array_equal(out4.view(np.uint8), out.view(np.uint8))


def test_fp8_redundant_params_and_positional_scales(runtime_name):
    rng = np.random.default_rng(1300)
    H, Hkv, Sq, D, bs = 4, 2, 3, 16, 4
    q, k, v, bt, sl, _ = make_fp8_case(rng, 2, H, Hkv, Sq, D, bs, [9, 5], "e4m3", "f32")
    base, base_lse = pn.paged_attention_fwd_fp8(q, k, v, bt, causal=True, seq_lens=sl,
                                                runtime=runtime_name, **SCALES)
    got, got_lse = pn.paged_attention_fwd_fp8(q, k, v, bt, H, Hkv, Sq, 9, D, bs, True, 0.75, 1.5, 0.5,
                                              0.25, seq_lens=sl, runtime=runtime_name)
    np.testing.assert_array_equal(got, base)
    np.testing.assert_array_equal(got_lse, base_lse)
    client = pn.get_runtime(runtime_name).client
    got, _ = client.paged_attention_fwd_fp8(q, k, v, bt, np.int64(H), np.int32(Hkv), Sq, None, D, bs,
                                            True, np.float32(0.75), 1.5, 0.5, 0.25, seq_lens=sl)
    np.testing.assert_array_equal(np.asarray(got), base)
