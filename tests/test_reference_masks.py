"""Tests of the float64 oracle's ragged batches, sliding window, softcap, ALiBi and merge_state(s)
against an independent scalar attention written from the definitions (one Python loop per query
row, one per key), and of its backward through the tanh by finite differences."""
import math
import zlib

import numpy as np
import pytest

from test_reference import make_case, ref


def brute_row(q, K, V, p, L, *, causal, scale, window_left, softcap, slope):
    """out [D], lse of one query at absolute position p over keys K / V [L, D] (one KV head)."""
    s, keys = [], []
    for j in range(L):
        if causal and j > p:
            continue
        if window_left >= 0 and j < p - window_left:
            continue
        x = scale * float(np.dot(q, K[j]))
        if softcap > 0:
            x = softcap * math.tanh(x / softcap)
        x -= slope * abs(p - j)
        s.append(x)
        keys.append(j)
    if not keys:
        return np.zeros(q.shape[0]), -math.inf
    m = max(s)
    w = [math.exp(x - m) for x in s]
    tot = sum(w)
    return sum(wj * V[j] for wj, j in zip(w, keys)) / tot, m + math.log(tot)


def brute(q, Ks, Vs, lens, qlens, *, causal, scale, window_left=-1, softcap=0.0, slopes=None):
    """Token-major q [T, H, D] with sequence b owning the next qlens[b] rows -> out, lse."""
    T, H, D = q.shape
    out = np.zeros((T, H, D))
    lse = np.full((T, H), -np.inf)
    row = 0
    for b, n in enumerate(qlens):
        L = int(lens[b])
        G = H // Ks[b].shape[1]
        for i in range(n):
            for h in range(H):
                slope = 0.0 if slopes is None else float(slopes[h])
                out[row + i, h], lse[row + i, h] = brute_row(
                    q[row + i, h], Ks[b][:, h // G], Vs[b][:, h // G], L - n + i, L, causal=causal,
                    scale=scale, window_left=window_left, softcap=softcap, slope=slope)
        row += n
    return out, lse


def ragged_case(rng, H, Hkv, D, bs, lens, qlens):
    q4, kp, vp, table, lens, Ks, Vs = make_case(rng, len(lens), H, Hkv, 1, D, bs, lens)
    cu = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    q = rng.standard_normal((int(cu[-1]), H, D))
    return q, kp, vp, table, lens, Ks, Vs, cu


MODS = [dict(), dict(window_left=0), dict(window_left=3), dict(window_left=100), dict(softcap=0.7),
        dict(alibi=True), dict(window_left=2, softcap=1.5, alibi=True)]
MOD_IDS = ["plain", "win0", "win3", "win>=L", "softcap", "alibi", "all"]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mods", MODS, ids=MOD_IDS)
def test_ragged_forward_matches_brute_force(mods, causal):
    rng = np.random.default_rng(zlib.crc32(repr((MOD_IDS[MODS.index(mods)], causal)).encode()))
    H, Hkv, D, bs = 4, 2, 8, 3
    lens, qlens = [9, 0, 5, 12, 4], [1, 0, 5, 3, 6]     # q_len 0, 1, > 4, == L, > L
    q, kp, vp, table, lens, Ks, Vs, cu = ragged_case(rng, H, Hkv, D, bs, lens, qlens)
    slopes = rng.uniform(0.05, 0.5, H) if mods.get("alibi") else None
    kw = dict(window_left=mods.get("window_left", -1), softcap=mods.get("softcap", 0.0))
    out, lse = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_lens=lens, causal=causal, scale=0.6,
                                           cu_seqlens_q=cu, alibi_slopes=slopes, **kw)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    want_out, want_lse = brute(q, Ks, Vs, lens, qlens, causal=causal, scale=0.6, slopes=slopes, **kw)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)


def test_dense_layout_equals_ragged_layout():
    """[B, H, Sq, D] without cu_seqlens_q is the ragged layout with equal q_len per sequence."""
    rng = np.random.default_rng(5)
    q, kp, vp, table, lens, _, _ = make_case(rng, 3, 4, 2, 3, 8, 4, [5, 9, 2])
    kw = dict(seq_lens=lens, causal=True, window_left=2, softcap=2.0, alibi_slopes=[0.1, 0.2, 0.3, 0.4])
    dense = ref.paged_attention_fwd_ref(q, kp, vp, table, **kw)
    qt = np.ascontiguousarray(np.transpose(q, (0, 2, 1, 3)).reshape(9, 4, 8))
    rag = ref.paged_attention_fwd_ref(qt, kp, vp, table, cu_seqlens_q=[0, 3, 6, 9], **kw)
    np.testing.assert_array_equal(np.transpose(dense[0], (0, 2, 1, 3)).reshape(9, 4, 8), rag[0])
    np.testing.assert_array_equal(np.transpose(dense[1], (0, 2, 1)).reshape(9, 4), rag[1])


def test_window_at_least_length_is_no_window():
    rng = np.random.default_rng(6)
    q, kp, vp, table, lens, _, _ = make_case(rng, 2, 2, 1, 4, 8, 4, [10, 3])
    a = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_lens=lens, causal=True, window_left=10)
    b = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_lens=lens, causal=True)
    np.testing.assert_array_equal(a[0], b[0])


def _loss(q, kp, vp, table, lens, dout, cu, kw):
    out, _ = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_lens=lens, cu_seqlens_q=cu, **kw)
    return float(np.sum(out * dout))


@pytest.mark.parametrize("kw", [dict(causal=True, softcap=0.8, scale=1.3),
                                dict(causal=False, window_left=2, alibi_slopes=[0.3, 0.1], softcap=2.0),
                                dict(causal=True, window_left=1)],
                         ids=["softcap", "window-alibi-softcap", "window"])
def test_backward_finite_differences_with_modifiers(kw):
    """dq, dk, dv of the oracle against central differences of sum(out * dout), ragged, with the
    softcap strong enough that the tanh's derivative matters (scores up to ~3x the cap)."""
    rng = np.random.default_rng(zlib.crc32(repr(sorted(kw)).encode()))
    H, Hkv, D, bs = 2, 1, 4, 2
    lens, qlens = [5, 3, 6], [2, 0, 6]
    q, kp, vp, table, lens, _, _, cu = ragged_case(rng, H, Hkv, D, bs, lens, qlens)
    kp, vp = np.nan_to_num(kp), np.nan_to_num(vp)   # finite differences perturb every slot
    q *= 2.0
    dout = rng.standard_normal(q.shape)
    dq, dk, dv = ref.paged_attention_bwd_ref(dout, q, kp, vp, table, seq_lens=lens, cu_seqlens_q=cu, **kw)
    eps = 1e-6
    for name, x, g in (("q", q, dq), ("k", kp, dk), ("v", vp, dv)):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + eps
            hi = _loss(q, kp, vp, table, lens, dout, cu, kw)
            x[idx] = old - eps
            lo = _loss(q, kp, vp, table, lens, dout, cu, kw)
            x[idx] = old
            num[idx] = (hi - lo) / (2 * eps)
        np.testing.assert_allclose(g, num, atol=1e-6, rtol=1e-5, err_msg=name)
        assert np.abs(g).max() > 1e-3, name


def test_softcap_changes_the_gradient():
    """Without the tanh's derivative the gradient would differ: the check above can fail."""
    rng = np.random.default_rng(8)
    q, kp, vp, table, lens, _, _ = make_case(rng, 1, 2, 1, 3, 4, 2, [5])
    q *= 3
    dout = rng.standard_normal(q.shape)
    kw = dict(seq_lens=lens, causal=True)
    capped = ref.paged_attention_bwd_ref(dout, q, kp, vp, table, softcap=0.5, **kw)[0]
    plain = ref.paged_attention_bwd_ref(dout, q, kp, vp, table, **kw)[0]
    assert np.abs(capped - plain).max() > 1e-2


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_with_modifiers_is_dequantized_forward(fmt):
    rng = np.random.default_rng(9)
    q, kp, vp, table, lens, _, _, cu = ragged_case(rng, 2, 1, 8, 4, [7, 6], [1, 6])
    k8, v8 = ref.quantize_fp8(kp, fmt), ref.quantize_fp8(vp, fmt)
    kw = dict(seq_lens=lens, causal=True, cu_seqlens_q=cu, window_left=3, softcap=1.0, alibi_slopes=[0.2, 0.4])
    out, lse = ref.paged_attention_fwd_fp8_ref(q, k8, v8, table, q_scale=0.5, k_scale=2.0, v_scale=1.5,
                                               o_scale=0.25, **kw)
    want = ref.paged_attention_fwd_ref(q * 0.5, ref.to_float64(k8) * 2.0, ref.to_float64(v8) * 1.5, table, **kw)
    np.testing.assert_allclose(out, want[0] / 0.25, rtol=1e-13)
    np.testing.assert_array_equal(lse, want[1])


# ---------------------------------------------------------------- merge_state(s)

def test_merging_two_halves_of_the_keys_equals_the_whole():
    rng = np.random.default_rng(10)
    q, kp, vp, table, lens, _, _ = make_case(rng, 1, 4, 2, 3, 8, 4, [14])
    full = ref.paged_attention_fwd_ref(q, kp, vp, table, seq_lens=lens)
    # Keys 0..7 are logical blocks 0, 1; keys 8..13 are blocks 2, 3.
    a = ref.paged_attention_fwd_ref(q, kp, vp, table[:, :2], seq_lens=[8])
    b = ref.paged_attention_fwd_ref(q, kp, vp, table[:, 2:], seq_lens=[6])
    v, s = ref.merge_state_ref(a[0], a[1], b[0], b[1])
    np.testing.assert_allclose(v, full[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s, full[1], rtol=1e-12)
    vs, ss = ref.merge_states_ref(np.stack([a[0][0].transpose(1, 0, 2), b[0][0].transpose(1, 0, 2)], axis=1),
                                  np.stack([a[1][0].T, b[1][0].T], axis=1))
    np.testing.assert_allclose(vs, full[0][0].transpose(1, 0, 2), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ss, full[1][0].T, rtol=1e-12)


def test_merge_empty_states():
    v = np.full((2, 3), np.nan)          # the value of an empty state is never read
    s = np.array([-np.inf, -np.inf])
    vo, so = ref.merge_state_ref(v, s, np.ones((2, 3)), np.array([-np.inf, 0.5]))
    np.testing.assert_array_equal(vo, [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(so, [-np.inf, 0.5])
    vo, so = ref.merge_states_ref(np.zeros((1, 0, 2, 3)), np.zeros((1, 0, 2)))
    np.testing.assert_array_equal(vo, np.zeros((1, 2, 3)))
    assert np.all(np.isneginf(so))
