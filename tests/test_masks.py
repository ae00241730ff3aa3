"""Ragged batches (cu_seqlens_q), sliding windows, softcap and ALiBi through the three ops, and
merge_state / merge_states, for every runtime -- at tiny shapes, so the CUDA simulator runs them.

Parity with the float64 oracle on fresh random inputs with NaN in every unused slot; windows
smaller than a block, spanning blocks and >= L; softcaps far below the scores; ragged batches
mixing q_len 0, 1, > 4 and == L (decode and tiled kernels in one call); FP8; the backward through
each. Keys no query can see because of the window are NaN-poisoned too: the kernels must skip
them, not read and mask them. Hypothesis properties: a ragged call equals the per-sequence calls,
a window >= L equals none, merging the states of two halves of the keys equals the whole.

Every case runs on every runtime, the backward included.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import paged_numba as pn
from helpers import (BF16, DTYPE_IDS, F16, F32, assert_fwd_close, assert_unchanged, is_sim, make_case,
                     seed_of, snapshot)
from paged_numba.ops.reference import (merge_state_ref, merge_states_ref, paged_attention_bwd_ref,
                                       paged_attention_fwd_fp8_ref, paged_attention_fwd_ref, quantize_fp8)
from test_backward import assert_grad_close, read_mask

SIM_OK = True  # every case here is small enough for the CUDA simulator

GRAD_TOL_FLOOR = 1e-3   # gradients with softcap / ALiBi: compare relative to max |ref| (>= this)


@pytest.fixture
def rt(runtime_name):
    """The runtime under test (every case of this module runs on each)."""
    return runtime_name


def ragged_case(rng, H, Hkv, D, bs, lens, qlens, dtype, *, shared=False):
    """make_case's pools and table with a token-major q [T, H, D]: sequence b owns the next
    qlens[b] rows. -> (q, k, v, table, seq_lens, cu_seqlens_q)."""
    _, k, v, bt, sl = make_case(rng, len(lens), H, Hkv, 1, D, bs, lens, dtype, shared=shared)
    cu = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    q = rng.standard_normal((int(cu[-1]), H, D)).astype(dtype)
    return q, k, v, bt, sl, cu


def poison_outside_window(k, v, bt, sl, qlens, window_left):
    """NaN into the K/V of tokens that no query of their sequence can see through the window (the
    kernels must not read them). Needs unshared blocks."""
    k, v = k.copy(), v.copy()
    bs = k.shape[1]
    for b, (L, n) in enumerate(zip(sl, qlens)):
        for t in range(max(0, int(L) - int(n) - window_left)):
            k[bt[b, t // bs], t % bs] = np.nan
            v[bt[b, t // bs], t % bs] = np.nan
    return k, v


def slopes_for(H, rng):
    return rng.uniform(0.05, 0.6, H).astype(np.float32)


# (H, Hkv, Sq, D, bs, lens, causal)
DENSE = [(4, 2, 1, 16, 4, [11, 0, 6], True),        # decode, GQA
         (2, 1, 3, 8, 3, [9, 4], False),            # decode, several queries, non-causal
         (2, 2, 6, 16, 4, [13, 6], True),           # tiled
         (2, 1, 7, 8, 5, [12, 9], False),           # tiled, non-causal
         (2, 1, 2, 8, 4, [45, 21], True)]           # decode over several split-K partitions
DENSE_IDS = ["decode", "decode-sq3-full", "tiled", "tiled-full", "decode-long"]
# window_left, softcap, alibi
MODS = [(2, 0.0, False),      # a window smaller than a block
        (6, 0.0, False),      # a window spanning blocks
        (40, 0.0, False),     # a window >= L
        (0, 0.0, False),      # the diagonal only
        (-1, 0.3, False),     # a softcap far below the scores
        (-1, 0.0, True),      # ALiBi
        (3, 2.0, True),       # all three
        (20, 0.0, False)]     # a window spanning partitions (decode-long: partitions of 16 keys on
                              # the simulator; the first partition starts at L - Sq - 20)
MOD_IDS = ["win2", "win6", "win>=L", "win0", "softcap", "alibi", "all", "win20"]


def _kw(mods, H, rng):
    wl, cap, alibi = mods
    return dict(window_left=wl, softcap=cap, alibi_slopes=slopes_for(H, rng) if alibi else None)


@pytest.mark.parametrize("mods", MODS, ids=MOD_IDS)
@pytest.mark.parametrize("case", DENSE, ids=DENSE_IDS)
def test_forward_modifiers(rt, case, mods):
    H, Hkv, Sq, D, bs, lens, causal = case
    i = DENSE.index(case) + MODS.index(mods)
    dtype = (F32, BF16, F16)[i % 3]
    rng = np.random.default_rng(seed_of("fwd-mods", DENSE_IDS[DENSE.index(case)], MOD_IDS[MODS.index(mods)]))
    q, k, v, bt, sl = make_case(rng, len(lens), H, Hkv, Sq, D, bs, lens, dtype)
    if mods[1]:
        q = (q.astype(np.float32) * 4).astype(dtype)      # scores well past the cap
    kw = _kw(mods, H, rng)
    if mods[0] >= 0:
        k, v = poison_outside_window(k, v, bt, sl, [Sq] * len(lens), mods[0])
    before = snapshot(q, k, v, bt, sl)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=causal, runtime=rt, **kw)
    assert_unchanged(before, q, k, v, bt, sl)
    ref = paged_attention_fwd_ref(q, k, v, bt, seq_lens=sl, causal=causal, **kw)
    assert_fwd_close(out, lse, *ref, dtype)


def test_window_at_least_length_equals_none(rt):
    rng = np.random.default_rng(7)
    q, k, v, bt, sl = make_case(rng, 2, 2, 1, 6, 8, 4, [10, 7], F32)
    a = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=True, window_left=10, runtime=rt)
    b = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=True, runtime=rt)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# lens, qlens: q_len 0, 1, > 4 (tiled) and == L in one batch; a long decode sequence too.
RAGGED = [([9, 5, 12, 6, 3], [1, 0, 6, 6, 2]),
          ([7, 14], [7, 1])]
RAGGED_IDS = ["mixed", "prefill==L+decode"]


@pytest.mark.parametrize("mods", [(-1, 0.0, False), MODS[1], MODS[6]], ids=["plain", "win6", "all"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", RAGGED, ids=RAGGED_IDS)
def test_ragged_forward(rt, case, dtype, mods):
    lens, qlens = case
    H, Hkv, D, bs = 4, 2, 16, 4
    rng = np.random.default_rng(seed_of("ragged", RAGGED_IDS[RAGGED.index(case)], str(dtype), mods))
    q, k, v, bt, sl, cu = ragged_case(rng, H, Hkv, D, bs, lens, qlens, dtype)
    kw = _kw(mods, H, rng)
    if mods[0] >= 0:
        k, v = poison_outside_window(k, v, bt, sl, qlens, mods[0])
    before = snapshot(q, k, v, bt, sl, cu)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=True, cu_seqlens_q=cu, runtime=rt, **kw)
    assert_unchanged(before, q, k, v, bt, sl, cu)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    ref = paged_attention_fwd_ref(q, k, v, bt, seq_lens=sl, causal=True, cu_seqlens_q=cu, **kw)
    assert_fwd_close(out, lse, *ref, dtype)


def test_ragged_tensors_in_tensors_out(rt):
    rng = np.random.default_rng(11)
    q, k, v, bt, sl, cu = ragged_case(rng, 2, 1, 8, 4, [6, 9], [1, 5], F32)
    tq, tk, tv = (pn.tensor(x, runtime=rt) for x in (q, k, v))
    out, lse = pn.paged_attention_fwd(tq, tk, tv, bt, seq_lens=sl, causal=True, cu_seqlens_q=cu, softcap=1.0)
    assert isinstance(out, pn.Tensor) and out.shape == (6, 2, 8) and lse.shape == (6, 2)
    ref = paged_attention_fwd_ref(q, k, v, bt, seq_lens=sl, causal=True, cu_seqlens_q=cu, softcap=1.0)
    assert_fwd_close(out.numpy(), lse.numpy(), *ref, F32)


@pytest.mark.parametrize("fmt,qkind", [("e4m3", "bf16"), ("e5m2", "fp8"), ("e4m3", "f32")])
def test_fp8_ragged_with_modifiers(rt, fmt, qkind):
    rng = np.random.default_rng(seed_of("fp8", fmt, qkind))
    lens, qlens = [9, 6, 4], [1, 6, 0]
    q, k, v, bt, sl, cu = ragged_case(rng, 2, 1, 16, 4, lens, qlens, F32)
    k8, v8 = quantize_fp8(k, fmt), quantize_fp8(v, fmt)
    qq = {"f32": q, "bf16": q.astype(ml_dtypes.bfloat16), "fp8": quantize_fp8(q, fmt)}[qkind]
    kw = dict(seq_lens=sl, causal=True, cu_seqlens_q=cu, q_scale=0.5, k_scale=1.5, v_scale=0.75, o_scale=0.5,
              window_left=4, softcap=1.5, alibi_slopes=np.array([0.25, 0.5], np.float32))
    out, lse = pn.paged_attention_fwd_fp8(qq, k8, v8, bt, runtime=rt, **kw)
    ref_out, ref_lse = paged_attention_fwd_fp8_ref(qq, k8, v8, bt, **kw)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    got = out.astype(np.float64)
    if qkind == "fp8":
        want = quantize_fp8(ref_out, fmt).astype(np.float64)
        step = np.abs(want) * 2.0 ** -2 + 2.0 ** -9
        assert np.all(np.abs(got - want) <= step + 1e-12)
    else:
        tol = 1e-5 if qkind == "f32" else 2e-2
        np.testing.assert_allclose(got, ref_out, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------- backward

def check_bwd(rt, q, k, v, bt, sl, dtype, causal, kw):
    rng = np.random.default_rng(int(q.size) + 5)
    dout = rng.standard_normal(q.shape).astype(dtype)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=causal, runtime=rt, **kw)
    before = snapshot(dout, q, k, v, out, lse, bt, sl)
    grads = pn.paged_attention_bwd(dout, q, k, v, out, lse, bt, seq_lens=sl, causal=causal, runtime=rt, **kw)
    assert_unchanged(before, dout, q, k, v, out, lse, bt, sl)
    refs = paged_attention_bwd_ref(dout, q, k, v, bt, seq_lens=sl, causal=causal, **kw)
    for name, g, r, like in zip(("dq", "dk_blocks", "dv_blocks"), grads, refs, (q, k, k)):
        assert g.dtype == like.dtype and g.shape == like.shape, name
        floor = GRAD_TOL_FLOOR * np.abs(r).max(initial=0.0) if name != "dv_blocks" else 0.0
        assert_grad_close(g, r, np.dtype(dtype), name, floor)
    read = read_mask(bt, sl, k.shape)
    for name, g in (("dk_blocks", grads[1]), ("dv_blocks", grads[2])):
        assert np.all(np.asarray(g).astype(np.float64)[~read] == 0.0), name


@pytest.mark.parametrize("mods", [MODS[0], MODS[1], MODS[4], MODS[5], MODS[6]],
                         ids=["win2", "win6", "softcap", "alibi", "all"])
@pytest.mark.parametrize("case", [DENSE[0], DENSE[2], DENSE[3], DENSE[4]],
                         ids=["decode", "tiled", "tiled-full", "decode-long"])
def test_backward_modifiers(rt, case, mods):
    H, Hkv, Sq, D, bs, lens, causal = case
    dtype = F32 if mods != MODS[6] else BF16
    rng = np.random.default_rng(seed_of("bwd-mods", case, mods))
    q, k, v, bt, sl = make_case(rng, len(lens), H, Hkv, Sq, D, bs, lens, dtype)
    if mods[1]:
        q = (q.astype(np.float32) * 3).astype(dtype)
    check_bwd(rt, q, k, v, bt, sl, dtype, causal, _kw(mods, H, rng))


@pytest.mark.parametrize("mods", [(-1, 0.0, False), MODS[6]], ids=["plain", "all"])
def test_backward_ragged(rt, mods):
    rng = np.random.default_rng(seed_of("bwd-ragged", mods))
    q, k, v, bt, sl, cu = ragged_case(rng, 4, 2, 8, 3, [9, 5, 7, 4], [1, 0, 7, 3], F32, shared=True)
    check_bwd(rt, q, k, v, bt, sl, F32, True, dict(cu_seqlens_q=cu, **_kw(mods, 4, rng)))


@pytest.mark.parametrize("case", [(2, 2, 6, 16, 4, [13, 6], 2),        # loop path, window < block
                                  (2, 1, 2, 8, 4, [45, 21], 6),        # decode, window spanning blocks
                                  (2, 1, 12, 16, 16, [40, 24], 9)],    # GEMM path (bs, D multiples of 16)
                         ids=["tiled-win2", "decode-win6", "gemm-win9"])
def test_backward_never_reads_keys_outside_the_window(rt, case):
    """NaN in every K / V token that no query's window reaches: the backward neither reads them
    (finite gradients equal to those of clean pools) nor writes their slots (zero)."""
    H, Hkv, Sq, D, bs, lens, wl = case
    rng = np.random.default_rng(seed_of("bwd-window-poison", case))
    q, k, v, bt, sl = make_case(rng, len(lens), H, Hkv, Sq, D, bs, lens, F32)
    kw = dict(window_left=wl, causal=True, seq_lens=sl)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, runtime=rt, **kw)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    kp, vp = poison_outside_window(k, v, bt, sl, [Sq] * len(lens), wl)
    assert np.isnan(kp).sum() > np.isnan(k).sum()          # the case hides some keys
    got = pn.paged_attention_bwd(dout, q, kp, vp, out, lse, bt, runtime=rt, **kw)
    clean = pn.paged_attention_bwd(dout, q, k, v, out, lse, bt, runtime=rt, **kw)
    hidden = np.isnan(kp) & ~np.isnan(k)
    for name, g, c in zip(("dq", "dk_blocks", "dv_blocks"), got, clean):
        assert np.isfinite(g).all(), name
        np.testing.assert_array_equal(g, c, err_msg=name)
    assert not got[1][hidden].any() and not got[2][hidden].any()
    refs = paged_attention_bwd_ref(dout, q, k, v, bt, **kw)
    for g, r in zip(got, refs):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------------------------- merge_state(s)

@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_merge_state_matches_reference(runtime_name, dtype):
    rng = np.random.default_rng(seed_of("merge", str(dtype)))
    va = rng.standard_normal((3, 2, 24)).astype(dtype)
    vb = rng.standard_normal((3, 2, 24)).astype(dtype)
    sa = rng.standard_normal((3, 2)).astype(np.float32) * 3
    sb = rng.standard_normal((3, 2)).astype(np.float32) * 3
    sa[0, 0] = sb[0, 0] = -np.inf          # an empty row
    sa[1, 1] = -np.inf                     # one empty side
    va[0, 0] = va[1, 1] = np.nan           # the value of an empty state is never read
    before = snapshot(va, sa, vb, sb)
    v, s = pn.merge_state(va, sa, vb, sb, runtime=runtime_name)
    assert_unchanged(before, va, sa, vb, sb)
    rv, rs = merge_state_ref(va, sa, vb, sb)
    assert v.dtype == np.dtype(dtype) and s.dtype == np.float32 and v.shape == va.shape
    assert not np.isnan(v.astype(np.float64)).any()
    np.testing.assert_array_equal(np.isneginf(s), np.isneginf(rs))
    fin = np.isfinite(rs)
    np.testing.assert_allclose(s[fin], rs[fin], rtol=1e-6, atol=1e-6)
    tol = {F32: 1e-6, BF16: 1e-2, F16: 2e-3}[np.dtype(dtype)]
    np.testing.assert_allclose(v.astype(np.float64), rv, rtol=tol, atol=tol)
    assert np.all(v[0, 0].astype(np.float64) == 0.0)


def test_merge_states_matches_reference(runtime_name):
    rng = np.random.default_rng(12)
    v = rng.standard_normal((3, 4, 2, 8)).astype(np.float32)
    s = (rng.standard_normal((3, 4, 2)) * 2).astype(np.float32)
    s[0, :, 1] = -np.inf
    s[2, 1:, 0] = -np.inf
    v[2, 1:, 0] = np.nan
    vo, so = pn.merge_states(v, s, runtime=runtime_name)
    rv, rs = merge_states_ref(v, s)
    assert vo.shape == (3, 2, 8) and so.shape == (3, 2)
    np.testing.assert_array_equal(np.isneginf(so), np.isneginf(rs))
    np.testing.assert_allclose(vo, rv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(so[np.isfinite(rs)], rs[np.isfinite(rs)], rtol=1e-6)
    assert np.all(vo[0, 1] == 0.0)


def _split_halves(bt, sl, bs, cut_blocks):
    """(prefix table, lens), (suffix table, lens): the first ``cut_blocks`` blocks of each sequence
    and the rest (its keys shifted to start at 0)."""
    cut = np.minimum(sl, cut_blocks * bs).astype(np.int32)
    return (bt[:, :cut_blocks], cut), (np.ascontiguousarray(bt[:, cut_blocks:]), (sl - cut).astype(np.int32))


def test_merging_two_halves_equals_the_whole(runtime_name):
    """Shared-prefix (cascade) attention: non-causal attention over the first blocks and over the
    rest, merged, equals attention over all keys."""
    rng = np.random.default_rng(13)
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 1, 16, 4, [13, 10], F32, extra_cols=1)
    (pt, pl), (st_, sl2) = _split_halves(bt, sl, 4, 2)
    whole = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime=runtime_name)
    a = pn.paged_attention_fwd(q, k, v, pt, seq_lens=pl, runtime=runtime_name)
    b = pn.paged_attention_fwd(q, k, v, st_, seq_lens=sl2, runtime=runtime_name)
    vm, sm = pn.merge_state(a[0], a[1], b[0], b[1], runtime=runtime_name)
    np.testing.assert_allclose(vm, whole[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(sm, whole[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- properties

_PROP = settings(max_examples=4, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_PROP
@given(data=st.data())
def test_property_ragged_equals_per_sequence_calls(rt, data):
    """One ragged call gives, row for row, what a call per sequence gives."""
    B = data.draw(st.integers(1, 3), label="B")
    lens = data.draw(st.lists(st.integers(0, 10), min_size=B, max_size=B), label="lens")
    qlens = [data.draw(st.integers(0, L if L <= 6 else 6), label=f"q_len{b}") for b, L in enumerate(lens)]
    wl = data.draw(st.sampled_from([-1, 0, 3]), label="window_left")
    cap = data.draw(st.sampled_from([0.0, 1.0]), label="softcap")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    rng = np.random.default_rng(seed)
    q, k, v, bt, sl, cu = ragged_case(rng, 2, 1, 8, 3, lens, qlens, F32)
    kw = dict(causal=True, window_left=wl, softcap=cap)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, cu_seqlens_q=cu, runtime=rt, **kw)
    for b in range(B):
        n = qlens[b]
        if n == 0:
            continue
        qb = np.ascontiguousarray(np.transpose(q[cu[b]:cu[b + 1]], (1, 0, 2))[None])   # [1, H, n, D]
        ob, lb = pn.paged_attention_fwd(qb, k, v, bt[b:b + 1], seq_lens=sl[b:b + 1], runtime=rt, **kw)
        np.testing.assert_allclose(out[cu[b]:cu[b + 1]], np.transpose(ob[0], (1, 0, 2)), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(lse[cu[b]:cu[b + 1]], lb[0].T, rtol=1e-6, atol=1e-6)


@_PROP
@given(data=st.data())
def test_property_window_at_least_length_equals_none(rt, data):
    L = data.draw(st.integers(0, 12), label="L")
    Sq = data.draw(st.sampled_from([1, 2, 5]), label="Sq")
    extra = data.draw(st.integers(0, 5), label="window - L")
    causal = data.draw(st.booleans(), label="causal")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    q, k, v, bt, sl = make_case(rng, 1, 2, 2, Sq, 8, 4, [L], F32)
    a = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=causal, window_left=L + extra, runtime=rt)
    b = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=causal, runtime=rt)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6, atol=1e-6)


@_PROP
@given(data=st.data())
def test_property_merge_halves_equals_whole(runtime_name, data):
    L = data.draw(st.integers(1, 14), label="L")
    cut = data.draw(st.integers(0, (L + 3) // 4), label="cut blocks")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    q, k, v, bt, sl = make_case(rng, 1, 2, 1, 2, 8, 4, [L], F32)
    (pt, pl), (st_, sl2) = _split_halves(bt, sl, 4, cut)
    whole = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime=runtime_name)
    a = pn.paged_attention_fwd(q, k, v, pt, seq_lens=pl, runtime=runtime_name)
    b = pn.paged_attention_fwd(q, k, v, st_, seq_lens=sl2, runtime=runtime_name)
    vm, sm = pn.merge_state(a[0], a[1], b[0], b[1], runtime=runtime_name)
    np.testing.assert_allclose(vm, whole[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(sm, whole[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- PagedKVCache

def test_cache_attention_mixed_batch(rt):
    """Prefill appends and decodes of different sequences in one cache.attention call equal the
    per-sequence calls they replace."""
    rng = np.random.default_rng(21)
    H, Hkv, D = 4, 2, 8
    cache = pn.PagedKVCache(16, 4, Hkv, D, runtime=rt)
    old, new, idle = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    for sid, n in ((old, 9), (idle, 5)):
        cache.append(sid, rng.standard_normal((n, Hkv, D)), rng.standard_normal((n, Hkv, D)))
    # This step: old decodes 1 token, new prefills a 7-token prompt, idle has no query.
    cache.append(old, rng.standard_normal((1, Hkv, D)), rng.standard_normal((1, Hkv, D)))
    cache.append(new, rng.standard_normal((7, Hkv, D)), rng.standard_normal((7, Hkv, D)))
    qlens = [1, 7, 0]
    cu = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    q = rng.standard_normal((8, H, D)).astype(np.float32)
    out, lse = cache.attention(q, [old, new, idle], cu_seqlens_q=cu, window_left=5)
    assert out.shape == (8, H, D) and lse.shape == (8, H)
    for b, sid in enumerate([old, new]):
        qb = np.ascontiguousarray(np.transpose(q[cu[b]:cu[b + 1]], (1, 0, 2))[None])
        ob, lb = cache.attention(qb, [sid], window_left=5)
        np.testing.assert_allclose(out[cu[b]:cu[b + 1]], np.transpose(ob[0], (1, 0, 2)), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(lse[cu[b]:cu[b + 1]], lb[0].T, rtol=1e-6, atol=1e-6)
    table, lens = cache.block_table([old, new, idle])
    ref = paged_attention_fwd_ref(q, cache.k_blocks.numpy(), cache.v_blocks.numpy(), table, seq_lens=lens,
                                  causal=True, cu_seqlens_q=cu, window_left=5)
    assert_fwd_close(out, lse, *ref, F32)


def test_cache_attention_ragged_q_shape_error():
    cache = pn.PagedKVCache(4, 4, 1, 8)
    a = cache.add_sequence()
    cache.append(a, np.ones((2, 1, 8)), np.ones((2, 1, 8)))
    with pytest.raises(ValueError, match=r"\[T, H, D=8\]"):
        cache.attention(np.ones((1, 2, 1, 8), np.float32), [a], cu_seqlens_q=[0, 1])
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        cache.attention(np.ones((3, 2, 8), np.float32), [a], cu_seqlens_q=[0, 3])   # 3 queries > 2 keys


def test_cuda_decode_partitions_start_at_the_window(runtime_name, monkeypatch):
    """The split-K decode spreads only the keys the window lets in over its partitions: with a
    window of 20 over 45 keys (2 queries) the partitions cover 22 keys, not 45."""
    if runtime_name != "cuda":
        pytest.skip("the CUDA client's partitioning")
    client = pn.get_runtime("cuda").client
    spans = []
    real = type(client)._partition
    monkeypatch.setattr(type(client), "_partition", lambda self, span, rb: spans.append(span) or real(self, span, rb))
    rng = np.random.default_rng(17)
    q, k, v, bt, sl = make_case(rng, 2, 2, 1, 2, 8, 4, [45, 21], F32)
    pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=True, window_left=20, runtime="cuda")
    pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=True, runtime="cuda")
    assert spans == [22, 45]
