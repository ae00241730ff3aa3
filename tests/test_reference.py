"""Tests of the float64 oracle paged_numba/ops/reference.py against an independent dense attention.

The module is loaded by file path so these tests run whether or not the package imports.
"""
import importlib.util
import math
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

_PATH = Path(__file__).resolve().parents[1] / "paged_numba" / "ops" / "reference.py"
_spec = importlib.util.spec_from_file_location("paged_numba_ops_reference", _PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


# ---------------------------------------------------------------- helpers

def make_case(rng, B, H, Hkv, Sq, D, bs, lens, *, spare_blocks=2, share_first=False, poison=np.nan):
    """Random paged case. Returns q, k_pool, v_pool, table, lens, dense Ks, dense Vs.

    Physical blocks come from a random permutation; every unused slot of the pool holds `poison`
    and every unused table entry is -1. With share_first, all sequences use sequence 0's
    first physical block for their first logical block (so their first min(bs, L) keys agree)."""
    lens = np.asarray(lens, dtype=np.int64)
    need = [math.ceil(L / bs) for L in lens]
    M = max(need + [1]) + 1                      # always at least one -1 column
    N = sum(need) + spare_blocks
    perm = iter(rng.permutation(N))
    table = np.full((B, M), -1, dtype=np.int32)
    k_pool = np.full((N, bs, Hkv, D), poison)
    v_pool = np.full((N, bs, Hkv, D), poison)
    Ks, Vs = [], []
    for b in range(B):
        for lb in range(need[b]):
            table[b, lb] = table[0, 0] if (share_first and b > 0 and lb == 0 and need[0]) else next(perm)
        K = rng.standard_normal((lens[b], Hkv, D))
        V = rng.standard_normal((lens[b], Hkv, D))
        for t in range(lens[b]):
            pb, s = table[b, t // bs], t % bs
            if share_first and b > 0 and t // bs == 0 and need[0]:
                if t < lens[0]:                  # key already written by sequence 0: reuse it
                    K[t], V[t] = k_pool[pb, s], v_pool[pb, s]
            k_pool[pb, s], v_pool[pb, s] = K[t], V[t]
        Ks.append(K)
        Vs.append(V)
    q = rng.standard_normal((B, H, Sq, D))
    return q, k_pool, v_pool, table, lens, Ks, Vs


def dense_attention(q, Ks, Vs, lens, causal, scale=None):
    """Plain per-row softmax attention on contiguous K/V, written independently of the oracle."""
    B, H, Sq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = np.zeros((B, H, Sq, D))
    lse = np.full((B, H, Sq), -np.inf)
    for b in range(B):
        L = int(lens[b])
        G = H // Ks[b].shape[1]
        for h in range(H):
            for i in range(Sq):
                keys = [j for j in range(L) if not causal or j <= L - Sq + i]
                if not keys:
                    continue
                s = [scale * float(np.dot(q[b, h, i], Ks[b][j, h // G])) for j in keys]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                tot = sum(w)
                lse[b, h, i] = m + math.log(tot)
                out[b, h, i] = sum(wj * Vs[b][j, h // G] for wj, j in zip(w, keys)) / tot
    return out, lse


def read_mask(pool_shape, table, lens):
    """bool [N, bs]: slots read by some valid token."""
    N, bs = pool_shape[:2]
    mask = np.zeros((N, bs), dtype=bool)
    for b, L in enumerate(lens):
        for t in range(int(L)):
            mask[table[b, t // bs], t % bs] = True
    return mask


def assert_matches_dense(out, lse, q, Ks, Vs, lens, causal, scale=None):
    d_out, d_lse = dense_attention(q, Ks, Vs, lens, causal, scale)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_allclose(out, d_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(d_lse))
    fin = np.isfinite(d_lse)
    np.testing.assert_allclose(lse[fin], d_lse[fin], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bs", [1, 3, 16])
@pytest.mark.parametrize("Sq", [1, 5])
def test_forward_matches_dense(H, Hkv, causal, bs, Sq):
    rng = np.random.default_rng(zlib.crc32(repr((H, Hkv, causal, bs, Sq)).encode()))
    lens = [0, 3, 17, 40]                        # L_b = 0 and Sq > L_b included
    q, kp, vp, table, lens, Ks, Vs = make_case(rng, 4, H, Hkv, Sq, 8, bs, lens)
    out, lse = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_lens=lens, causal=causal)
    assert out.shape == q.shape and out.dtype == np.float64 and lse.shape == q.shape[:3]
    assert_matches_dense(out, lse, q, Ks, Vs, lens, causal)


def test_forward_custom_scale_and_seq_len_k():
    rng = np.random.default_rng(1)
    q, kp, vp, table, lens, Ks, Vs = make_case(rng, 2, 4, 2, 3, 16, 4, [10, 10])
    out, lse = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_len_k=10, causal=True, scale=0.3)
    assert_matches_dense(out, lse, q, Ks, Vs, lens, True, scale=0.3)


def test_forward_full_table_default_length():
    rng = np.random.default_rng(2)
    q, kp, vp, table, lens, Ks, Vs = make_case(rng, 2, 2, 1, 2, 4, 4, [8, 8])
    table = table[:, :2]                         # exactly M * bs = 8 tokens, no padding
    out, lse = ref.paged_attention_fwd_ref(q, kp, vp, table)
    assert_matches_dense(out, lse, q, Ks, Vs, lens, False)
    np.testing.assert_array_equal(ref.key_lengths(2, 2, 4), [8, 8])
    np.testing.assert_array_equal(ref.key_lengths(2, 2, 4, seq_len_k=5), [5, 5])
    np.testing.assert_array_equal(ref.key_lengths(2, 2, 4, np.array([3, 1], np.int16), 5), [3, 1])


def test_three_d_pool_is_hkv_one():
    rng = np.random.default_rng(3)
    q, kp, vp, table, lens, Ks, Vs = make_case(rng, 2, 4, 1, 3, 8, 3, [7, 2])
    a = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_lens=lens, causal=True)
    b = ref.paged_attention_fwd_ref(q, kp[:, :, 0], vp[:, :, 0], table, seq_lens=lens, causal=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert ref.gather_kv(kp[:, :, 0], table, 0, 7).shape == (7, 1, 8)


def test_gather_kv_reads_only_valid_tokens():
    rng = np.random.default_rng(4)
    _, kp, _, table, lens, Ks, _ = make_case(rng, 2, 2, 2, 1, 4, 3, [5, 0])
    table[0, 2:] = 10**6                         # would raise IndexError if read
    np.testing.assert_array_equal(ref.gather_kv(kp, table, 0, 5), Ks[0])
    assert ref.gather_kv(kp, table, 1, 0).shape == (0, 2, 4)


def test_shared_blocks_give_identical_rows():
    rng = np.random.default_rng(5)
    q, kp, vp, table, lens, Ks, Vs = make_case(rng, 2, 4, 2, 4, 8, 3, [11, 0])
    table[1] = table[0]                          # sequence 1 reads sequence 0's blocks
    q[1] = q[0]
    lens = np.array([11, 11])
    for causal in (False, True):
        out, lse = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_lens=lens, causal=causal)
        np.testing.assert_array_equal(out[0], out[1])
        np.testing.assert_array_equal(lse[0], lse[1])
        assert_matches_dense(out, lse, q, [Ks[0], Ks[0]], [Vs[0], Vs[0]], lens, causal)


def test_masked_rows_are_zero_and_neg_inf():
    rng = np.random.default_rng(6)
    q, kp, vp, table, lens, Ks, Vs = make_case(rng, 2, 2, 1, 6, 4, 2, [3, 0])
    out, lse = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_lens=lens, causal=True)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    # sequence 0: p = 3 - 6 + i < 0 for i < 3; sequence 1: L = 0, every row
    assert np.all(out[0, :, :3] == 0) and np.all(np.isneginf(lse[0, :, :3]))
    assert np.all(np.isfinite(lse[0, :, 3:]))
    assert np.all(out[1] == 0) and np.all(np.isneginf(lse[1]))
    out, lse = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_lens=lens, causal=False)
    assert np.all(np.isfinite(lse[0])) and np.all(np.isneginf(lse[1])) and np.all(out[1] == 0)


def test_low_precision_inputs_are_read_exactly():
    rng = np.random.default_rng(7)
    q, kp, vp, table, lens, _, _ = make_case(rng, 2, 4, 2, 3, 8, 4, [9, 4])
    q16 = q.astype(np.float16)
    kb, vb = kp.astype(ml_dtypes.bfloat16), vp.astype(ml_dtypes.bfloat16)
    got = ref.paged_attention_fwd_ref(q16, kb, vb, table.astype(np.int64),
                                      seq_lens=lens.astype(np.int32), causal=True)
    want = ref.paged_attention_fwd_ref(ref.to_float64(q16), ref.to_float64(kb), ref.to_float64(vb),
                                       table, seq_lens=lens, causal=True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert not np.isnan(got[0]).any()
    x = np.array([1.5, -2.0], np.float32)
    assert ref.to_float64(x).dtype == np.float64


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_forward_property(data):
    Hkv = data.draw(st.sampled_from([1, 2]))
    H = Hkv * data.draw(st.sampled_from([1, 2, 3]))
    B = data.draw(st.integers(1, 3))
    bs = data.draw(st.integers(1, 5))
    Sq = data.draw(st.integers(1, 6))
    lens = data.draw(st.lists(st.integers(0, 12), min_size=B, max_size=B))
    causal = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    q, kp, vp, table, lens, Ks, Vs = make_case(rng, B, H, Hkv, Sq, 4, bs, lens)
    out, lse = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_lens=lens, causal=causal)
    assert_matches_dense(out, lse, q, Ks, Vs, lens, causal)


# ---------------------------------------------------------------- backward

def _finite_difference(f, x, eps=1e-5):
    """Central differences of scalar f() over every entry of x (modified in place, restored)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        orig = x[idx]
        if np.isnan(orig):                       # poisoned slot: the loss cannot depend on it
            continue
        x[idx] = orig + eps
        fp = f()
        x[idx] = orig - eps
        fm = f()
        x[idx] = orig
        g[idx] = (fp - fm) / (2 * eps)
    return g


BWD_CASES = [
    # B, H, Hkv, Sq, D, bs, lens, causal, share_first, three_d
    (2, 4, 2, 3, 4, 3, [7, 5], True, True, False),    # GQA, causal, shared first block
    (3, 2, 1, 4, 3, 2, [5, 2, 0], True, False, True),  # MQA, 3-D pool, masked rows, L = 0
    (2, 2, 2, 2, 4, 4, [6, 3], False, True, False),    # MHA, not causal, shared block
]


@pytest.mark.parametrize("case", BWD_CASES, ids=["gqa-causal-shared", "mqa-3d-masked", "mha-shared"])
def test_backward_finite_differences(case):
    B, H, Hkv, Sq, D, bs, lens, causal, share, three_d = case
    rng = np.random.default_rng(sum(lens) + 17 * H)
    q, kp, vp, table, lens, _, _ = make_case(rng, B, H, Hkv, Sq, D, bs, lens, share_first=share)
    if share:
        assert table[1, 0] == table[0, 0]
    if three_d:
        kp, vp = kp[:, :, 0].copy(), vp[:, :, 0].copy()
    dout = rng.standard_normal(q.shape)
    kw = dict(seq_lens=lens, causal=causal, scale=0.7)

    def loss():
        return float(np.sum(ref.paged_attention_fwd_ref(q, kp, vp, table, **kw)[0] * dout))

    dq, dk, dv = ref.paged_attention_bwd_ref(dout, q, kp, vp, table, **kw)
    assert dq.shape == q.shape and dk.shape == kp.shape and dv.shape == vp.shape
    for name, an, x in (("dq", dq, q), ("dk", dk, kp), ("dv", dv, vp)):
        assert not np.isnan(an).any(), name
        fd = _finite_difference(loss, x)
        err = np.linalg.norm(fd - an) / max(np.linalg.norm(an), 1e-30)
        assert err < 1e-6, (name, err)
    unread = ~read_mask(kp.shape, table, lens)
    assert unread.any()
    assert np.all(dk[unread] == 0) and np.all(dv[unread] == 0)


def test_backward_shared_slot_sums_contributions():
    rng = np.random.default_rng(8)
    q, kp, vp, table, lens, _, _ = make_case(rng, 2, 4, 2, 3, 4, 3, [6, 6])
    table[1] = table[0]
    dout = rng.standard_normal(q.shape)
    _, dk, dv = ref.paged_attention_bwd_ref(dout, q, kp, vp, table, seq_lens=lens, causal=True)
    parts = [ref.paged_attention_bwd_ref(dout[b:b + 1], q[b:b + 1], kp, vp, table[b:b + 1],
                                         seq_lens=lens[b:b + 1], causal=True) for b in range(2)]
    np.testing.assert_allclose(dk, parts[0][1] + parts[1][1], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dv, parts[0][2] + parts[1][2], rtol=1e-13, atol=1e-15)


def test_backward_masked_rows_contribute_nothing():
    rng = np.random.default_rng(9)
    q, kp, vp, table, lens, _, _ = make_case(rng, 1, 2, 1, 5, 4, 2, [2])
    dout = rng.standard_normal(q.shape)
    dq, dk, dv = ref.paged_attention_bwd_ref(dout, q, kp, vp, table, seq_lens=lens, causal=True)
    assert np.all(dq[0, :, :3] == 0)             # p = 2 - 5 + i < 0 for i < 3
    dout2 = dout.copy()
    dout2[0, :, :3] = 1e9                        # gradient of masked rows must not matter
    _, dk2, dv2 = ref.paged_attention_bwd_ref(dout2, q, kp, vp, table, seq_lens=lens, causal=True)
    np.testing.assert_array_equal(dk, dk2)
    np.testing.assert_array_equal(dv, dv2)


# ---------------------------------------------------------------- fp8

@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("q_fp8", [False, True])
def test_fp8_matches_dequantized_forward(fmt, q_fp8):
    rng = np.random.default_rng(10 + q_fp8)
    q, kp, vp, table, lens, _, _ = make_case(rng, 3, 4, 2, 3, 8, 4, [9, 0, 14])
    kq, vq = ref.quantize_fp8(kp * 3, fmt), ref.quantize_fp8(vp * 3, fmt)
    assert np.isnan(ref.to_float64(kq)).any()    # poison survived quantization
    qq = ref.quantize_fp8(q * 2, fmt) if q_fp8 else q.astype(np.float32)
    sc = dict(q_scale=0.5, k_scale=0.25, v_scale=2.0, o_scale=4.0)
    out, lse = ref.paged_attention_fwd_fp8_ref(qq, kq, vq, table, seq_lens=lens, causal=True, **sc)
    w_out, w_lse = ref.paged_attention_fwd_ref(
        ref.to_float64(qq) * 0.5, ref.to_float64(kq) * 0.25, ref.to_float64(vq) * 2.0,
        table, seq_lens=lens, causal=True)
    np.testing.assert_allclose(out, w_out / 4.0, rtol=1e-14, atol=0)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(w_lse))
    np.testing.assert_allclose(lse, w_lse, rtol=1e-14)
    assert not np.isnan(out).any() and out.dtype == np.float64
    # raw uint8 codes with fp8_format give the same numbers
    raw = (qq.view(np.uint8) if q_fp8 else qq, kq.view(np.uint8), vq.view(np.uint8))
    out2, lse2 = ref.paged_attention_fwd_fp8_ref(*raw, table, seq_lens=lens, causal=True,
                                                 fp8_format=fmt, **sc)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(lse, lse2)


def test_fp8_raw_uint8_needs_format():
    rng = np.random.default_rng(11)
    q, kp, vp, table, lens, _, _ = make_case(rng, 1, 2, 1, 1, 4, 2, [3])
    k8 = ref.quantize_fp8(kp, "e4m3").view(np.uint8)
    with pytest.raises(ValueError):
        ref.paged_attention_fwd_fp8_ref(q, k8, k8, table, seq_lens=lens)
    with pytest.raises(ValueError):
        ref.to_float64(k8)


def test_quantize_fp8_saturates_and_keeps_nan():
    x = np.array([1e6, -1e6, np.inf, -np.inf, np.nan, 1.0, 0.0], np.float32)
    e4 = ref.quantize_fp8(x, "e4m3")
    assert e4.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(ref.to_float64(e4)[[0, 1, 2, 3, 5, 6]], [448, -448, 448, -448, 1, 0])
    assert np.isnan(ref.to_float64(e4)[4])
    e5 = ref.quantize_fp8(x, "e5m2")
    assert e5.dtype == ml_dtypes.float8_e5m2
    np.testing.assert_array_equal(ref.to_float64(e5)[:4], [57344, -57344, 57344, -57344])
    assert np.isnan(ref.to_float64(e5)[4])
    # round to nearest even: 1.0625 is halfway between 1.0 and 1.125 in e4m3 -> 1.0 (even)
    assert ref.to_float64(ref.quantize_fp8(np.array([1.0625]), "e4m3"))[0] == 1.0
    assert ref.to_float64(ref.quantize_fp8(np.array([1.1875]), "e4m3"))[0] == 1.25
