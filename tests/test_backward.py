"""Parity of ``pn.paged_attention_bwd`` with the float64 oracle ``paged_attention_bwd_ref``, per
runtime.

The op gets ``output`` / ``lse`` from ``pn.paged_attention_fwd`` on the same arguments (as SPEC
says); the oracle recomputes the forward in float64 on the same low-precision inputs. Each of dq,
dk_blocks, dv_blocks is compared with its error normalized by the reference's max abs (f32 1e-5,
f16 3e-3, bf16 2e-2), floored at a tenth of the size of the terms that cancel in dq and dk
(``grad_floors``: a row attending to a single key has dq = dk = 0, and float32 noise remains).
Every case also checks: dq has q's dtype, dk / dv have k's dtype and shape (3-D pools stay 3-D),
no NaN anywhere, and every slot no valid token reads -- NaN-poisoned by ``make_case`` -- is
exactly 0.

A covering set rather than the Cartesian product (each new dtype compiles the backward kernels):
head dims x dtypes, block sizes x causal x dtypes, MHA / GQA / MQA x Sq (Sq > L_b included), L_b = 0,
shared blocks (the shared slot's gradient is the sum over the sequences reading it), rows with
lse = -inf, prefill-sized Sq; then the API surface, a finite-difference check of the whole
forward / backward chain in float32, and a hypothesis property test.
"""
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import paged_numba as pn
from helpers import (BF16, DTYPE_IDS, F16, F32, FLOAT_DTYPES, RUNTIMES, assert_unchanged, is_sim, make_case,
                      seed_of, skip_if_too_big_for_sim, snapshot)
from paged_numba.ops.reference import gather_kv, paged_attention_bwd_ref, to_float64

HEADS = [(4, 4), (8, 2), (6, 1)]          # (H, Hkv): MHA, GQA (G = 4), MQA (G = 6)
HEAD_IDS = ["mha", "gqa", "mqa"]
BLOCK_SIZES = [1, 3, 16]
HEAD_DIMS = [16, 40, 64, 128]
# Max abs error / max abs of the reference, per gradient.
GRAD_TOL = {F32: 1e-5, F16: 3e-3, BF16: 2e-2}


def read_mask(bt, sl, pool_shape) -> np.ndarray:
    """bool [N, bs]: slots some valid token reads."""
    N, bs = pool_shape[:2]
    read = np.zeros((N, bs), bool)
    for b in range(bt.shape[0]):
        t = np.arange(int(sl[b]))
        read[bt[b, t // bs], t % bs] = True
    return read


def forward_backward(runtime_name, q, k, v, bt, sl, dout, causal, scale=None):
    """(out, lse, dq, dk, dv) through the library, checking that no input is modified."""
    out, lse = pn.paged_attention_fwd(q, k, v, bt, causal=causal, seq_lens=sl, scale=scale,
                                      runtime=runtime_name)
    before = snapshot(dout, q, k, v, out, lse, bt, sl)
    dq, dk, dv = pn.paged_attention_bwd(dout, q, k, v, out, lse, bt, causal=causal, seq_lens=sl,
                                        scale=scale, runtime=runtime_name)
    assert_unchanged(before, dout, q, k, v, out, lse, bt, sl)
    return out, lse, dq, dk, dv


def grad_floors(q, k, v, dout, bt, sl, causal, scale):
    """Floors for the error normalization of (dq, dk, dv): 1/10 of the largest element of the same
    float64 sums with every term made non-negative (|dS| <= P (|dout| . |v| + |dout| . |out|),
    dq <= scale |dS| |k|, dk <= scale |dS|^T |q|). Float32 rounding is a few eps times these
    sums, which can be far above max |ref| when the terms cancel: a row attending to one key (or to
    copies of one slot) has dq = dk = 0 exactly, a nearly one-hot row nearly so. Where the floor
    wins, f32 still allows only 1e-6 x the terms' size -- far below what a wrong formula, a lost
    contribution or a wrong scale gives. dv = P^T dout does not cancel: no floor."""
    q64, do64 = to_float64(q), to_float64(dout)
    B, H, Sq, D = q64.shape
    pool_shape = (k.shape[0], k.shape[1], 1 if k.ndim == 3 else k.shape[2])
    Hkv = pool_shape[2]
    heads = np.arange(H) // (H // Hkv)
    sc = 1.0 / np.sqrt(D) if scale is None else float(scale)
    bq = 0.0
    bk = np.zeros(pool_shape)
    for b in range(B):
        L = int(sl[b])
        if L == 0:
            continue
        kh = np.transpose(gather_kv(k, bt, b, L)[:, heads], (1, 0, 2))      # [H, L, D]
        vh = np.transpose(gather_kv(v, bt, b, L)[:, heads], (1, 0, 2))
        vis = np.ones((Sq, L), bool) if not causal else \
            np.arange(L)[None, :] <= (L - Sq + np.arange(Sq))[:, None]
        s = np.where(vis, sc * np.einsum("hqd,hkd->hqk", q64[b], kh), -np.inf)
        m = s.max(axis=-1, keepdims=True)
        e = np.where(vis, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
        p = e / np.maximum(e.sum(axis=-1, keepdims=True), 1e-300)
        out = np.einsum("hqk,hkd->hqd", p, vh)
        ds = p * (np.einsum("hqd,hkd->hqk", np.abs(do64[b]), np.abs(vh))
                  + np.abs(do64[b] * out).sum(axis=-1)[..., None])
        bq = max(bq, abs(sc) * np.einsum("hqk,hkd->hqd", ds, np.abs(kh)).max(initial=0.0))
        dk_tok = abs(sc) * np.einsum("hqk,hqd->hkd", ds, np.abs(q64[b])).max(axis=-1)   # [H, L]
        t = np.arange(L)
        for h in range(H):
            np.add.at(bk, (bt[b, t // pool_shape[1]], t % pool_shape[1], heads[h]), dk_tok[h])
    return 0.1 * bq, 0.1 * bk.max(initial=0.0), 0.0


def assert_grad_close(got, want, dtype, name, floor=0.0):
    got64 = np.asarray(got).astype(np.float64)
    assert not np.isnan(got64).any(), f"NaN in {name}"
    assert not np.isinf(got64).any(), f"inf in {name}"
    peak = np.abs(want).max(initial=0.0)
    denom = max(peak, floor)
    if denom == 0.0:
        assert np.all(got64 == 0.0), f"{name}: reference is all zero, got max |{name}| {np.abs(got64).max()}"
        return
    err = np.abs(got64 - want).max() / denom
    assert err <= GRAD_TOL[dtype], (f"{name}: max |got - ref| / max(max |ref|, floor) = {err:.3g} > "
                                    f"{GRAD_TOL[dtype]:g} (max |ref| = {peak:.3g}, floor {floor:.3g})")


def check_grads(grads, refs, q, k, v, dout, bt, sl, dtype, causal, scale=None):
    dq, dk, dv = grads
    for name, g, like in (("dq", dq, q), ("dk_blocks", dk, k), ("dv_blocks", dv, k)):
        assert type(g) is np.ndarray, f"{name}: NumPy in must give NumPy out, got {type(g).__name__}"
        assert g.dtype == like.dtype, f"{name} dtype {g.dtype}, expected {like.dtype}"
        assert g.shape == like.shape, f"{name} shape {g.shape}, expected {like.shape}"
    read = read_mask(bt, sl, k.shape)
    floors = grad_floors(q, k, v, dout, bt, sl, causal, scale)
    for name, g, r, m in zip(("dq", "dk_blocks", "dv_blocks"), grads, refs, floors):
        assert_grad_close(g, r, dtype, name, m)
    for name, g in (("dk_blocks", dk), ("dv_blocks", dv)):
        vals = np.asarray(g).astype(np.float64)[~read]
        assert np.all(vals == 0.0), f"{name}: slots no valid token reads must be exactly 0"


def run_and_check(runtime_name, rng, B, H, Hkv, Sq, D, bs, lens, dtype, causal, *, shared=False,
                  kv3d=False, scale=None):
    q, k, v, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, dtype, shared=shared, kv3d=kv3d)
    skip_if_too_big_for_sim(runtime_name, q.shape, int(sl.max(initial=0)))
    dout = rng.standard_normal(q.shape).astype(dtype)
    out, lse, dq, dk, dv = forward_backward(runtime_name, q, k, v, bt, sl, dout, causal, scale)
    refs = paged_attention_bwd_ref(dout, q, k, v, bt, seq_lens=sl, causal=causal, scale=scale)
    check_grads((dq, dk, dv), refs, q, k, v, dout, bt, sl, dtype, causal, scale)
    return (q, k, v, bt, sl, dout), (out, lse), (dq, dk, dv), refs


# ------------------------------------------------------------------------- parity: covering set

_HEAD_DIM_CASES = [(dt, D, i) for i, (dt, D) in enumerate(itertools.product(FLOAT_DTYPES, HEAD_DIMS))]


@pytest.mark.parametrize("dtype,D,i", _HEAD_DIM_CASES,
                         ids=[f"{DTYPE_IDS[dt]}-D{D}" for dt, D, _ in _HEAD_DIM_CASES])
def test_bwd_parity_head_dims(runtime_name, dtype, D, i):
    """Every head dim with every dtype; heads, block size, causal and Sq rotate across cases."""
    H, Hkv = HEADS[i % 3]
    bs = BLOCK_SIZES[i % 3]
    causal = i % 2 == 0
    Sq = (1, 4, 7)[i % 3]
    rng = np.random.default_rng(10_000 + i)
    lens = [0, 2, 2 * bs + 1, 37]              # L_b = 0, L_b < Sq (when Sq > 2), partial blocks
    run_and_check(runtime_name, rng, 4, H, Hkv, Sq, D, bs, lens, dtype, causal)


_BS_CASES = [(dt, bs, c, i) for i, (dt, bs, c) in
             enumerate(itertools.product(FLOAT_DTYPES, BLOCK_SIZES, [False, True]))]


@pytest.mark.parametrize("dtype,bs,causal,i", _BS_CASES,
                         ids=[f"{DTYPE_IDS[dt]}-bs{bs}-{'causal' if c else 'full'}"
                              for dt, bs, c, _ in _BS_CASES])
def test_bwd_parity_block_sizes(runtime_name, dtype, bs, causal, i):
    """Every block size, causal and not, in every dtype; lengths on and around block edges."""
    H, Hkv = HEADS[i % 3]
    Sq = 1 if i % 4 < 2 else 5
    rng = np.random.default_rng(11_000 + i)
    lens = [bs, bs + 1, 3 * bs - 1, 4, 0]
    run_and_check(runtime_name, rng, 5, H, Hkv, Sq, 32, bs, lens, dtype, causal)


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("Sq", [1, 3, 9])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_parity_gqa_sq(runtime_name, heads, Sq, causal):
    """MHA / GQA / MQA x Sq (1, 3, and 9 > some L_b) x causal, f32."""
    H, Hkv = heads
    rng = np.random.default_rng(12_000 + H * 100 + Hkv * 10 + Sq + causal)
    lens = [9, 5, 23, 0]                       # Sq == L_b, Sq > L_b, Sq < L_b, L_b = 0
    run_and_check(runtime_name, rng, 4, H, Hkv, Sq, 24, 4, lens, F32, causal)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("Sq", [70, 130])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_parity_many_query_tiles(runtime_name, dtype, Sq, causal):
    """Prefill-sized Sq: several query tiles in the dq pass and several query chunks per block in
    the dk / dv pass; L_b below, equal to and above Sq."""
    if is_sim(runtime_name):
        pytest.skip("prefill shapes are too large for the CUDA simulator")
    rng = np.random.default_rng(13_000 + Sq + causal)
    run_and_check(runtime_name, rng, 3, 4, 2, Sq, 16, 16, [Sq, Sq - 10, Sq + 45], dtype, causal)


def test_bwd_parity_long_context_decode(runtime_name):
    if is_sim(runtime_name):
        pytest.skip("long contexts are too large for the CUDA simulator")
    rng = np.random.default_rng(13_500)
    run_and_check(runtime_name, rng, 3, 8, 2, 1, 64, 16, [1500, 777, 1024], F16, True)


@pytest.mark.parametrize("scale", [0.37, -0.8, 0.0])
def test_bwd_custom_scale(runtime_name, scale):
    rng = np.random.default_rng(13_700)
    run_and_check(runtime_name, rng, 2, 4, 2, 3, 16, 4, [10, 7], F32, True, scale=scale)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_kv3d(runtime_name, dtype, causal):
    """A 3-D [N, bs, D] pool: dk / dv stay 3-D and equal the 4-D [N, bs, 1, D] pool's."""
    rng = np.random.default_rng(14_000 + causal)
    (q, k, v, bt, sl, dout), (out, lse), (dq, dk, dv), _ = run_and_check(
        runtime_name, rng, 3, 4, 1, 2, 16, 3, [7, 1, 12], dtype, causal, kv3d=True)
    assert k.ndim == 3 and dk.ndim == 3 and dv.ndim == 3
    dq4, dk4, dv4 = pn.paged_attention_bwd(dout, q, k[:, :, None], v[:, :, None], out, lse, bt,
                                           causal=causal, seq_lens=sl, runtime=runtime_name)
    assert dk4.shape == k[:, :, None].shape
    np.testing.assert_array_equal(dq4, dq)
    np.testing.assert_array_equal(dk4[:, :, 0], dk)
    np.testing.assert_array_equal(dv4[:, :, 0], dv)


# ------------------------------------------------------------------------------- shared blocks

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_shared_blocks_parity(runtime_name, dtype, causal):
    rng = np.random.default_rng(15_000 + causal)
    (q, k, v, bt, sl, _), _, _, _ = run_and_check(runtime_name, rng, 5, 8, 2, 3, 32, 4,
                                                  [13, 16, 9, 2, 21], dtype, causal, shared=True)
    read = [int(bt[b, j]) for b in range(5) for j in range(-(-int(sl[b]) // 4))]
    assert len(set(read)) < len(read), "make_case(shared=True) did not share any block"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)], ids=["gqa", "mha"])
def test_bwd_shared_slot_gradient_is_the_sum(runtime_name, causal, heads):
    """Three sequences read one physical block (two of them at different logical positions):
    the pool gradient equals the sum of the gradients of each sequence run alone, and dq of each
    sequence is what it is alone."""
    H, Hkv = heads
    rng = np.random.default_rng(15_500 + causal + H)
    bs, D, Sq = 4, 16, 3
    N = 6
    k = np.full((N, bs, Hkv, D), np.nan, np.float32)
    v = np.full((N, bs, Hkv, D), np.nan, np.float32)
    # Block 2 is logical block 0 of sequences 0 and 1 and logical block 1 of sequence 2.
    bt = np.array([[2, 0, -1], [2, 1, 4], [3, 2, -1]], np.int32)
    sl = np.array([7, 10, 6], np.int32)
    read = read_mask(bt, sl, k.shape)
    k[read] = rng.standard_normal((int(read.sum()), Hkv, D))
    v[read] = rng.standard_normal((int(read.sum()), Hkv, D))
    q = rng.standard_normal((3, H, Sq, D)).astype(np.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    _, _, dq, dk, dv = forward_backward(runtime_name, q, k, v, bt, sl, dout, causal)
    parts = [forward_backward(runtime_name, q[b:b + 1], k, v, bt[b:b + 1], sl[b:b + 1],
                              dout[b:b + 1], causal)[2:] for b in range(3)]
    dk_sum = sum(p[1].astype(np.float64) for p in parts)
    dv_sum = sum(p[2].astype(np.float64) for p in parts)
    for got, want, name in ((dk, dk_sum, "dk"), (dv, dv_sum, "dv")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)
        # The shared block really gets three non-zero contributions.
        contrib = [np.abs(p[1 if name == "dk" else 2][2]).max() for p in parts]
        assert min(contrib) > 0, f"{name}: each sequence must contribute to the shared block"
        np.testing.assert_array_equal(np.asarray(got)[~read], 0.0)
    for b in range(3):
        np.testing.assert_allclose(dq[b:b + 1], parts[b][0], rtol=1e-6, atol=1e-6)
    refs = paged_attention_bwd_ref(dout, q, k, v, bt, seq_lens=sl, causal=causal)
    check_grads((dq, dk, dv), refs, q, k, v, dout, bt, sl, F32, causal)


def test_bwd_same_block_twice_in_one_sequence(runtime_name):
    """A table may name one physical block at two logical positions of one sequence: its slots get
    both contributions."""
    rng = np.random.default_rng(15_800)
    k = rng.standard_normal((3, 4, 2, 16)).astype(np.float32)
    v = rng.standard_normal((3, 4, 2, 16)).astype(np.float32)
    bt = np.array([[1, 1, 0], [1, 2, 2]], np.int32)
    sl = np.array([11, 12], np.int32)
    q = rng.standard_normal((2, 4, 5, 16)).astype(np.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    for causal in (False, True):
        _, _, dq, dk, dv = forward_backward(runtime_name, q, k, v, bt, sl, dout, causal)
        refs = paged_attention_bwd_ref(dout, q, k, v, bt, seq_lens=sl, causal=causal)
        check_grads((dq, dk, dv), refs, q, k, v, dout, bt, sl, F32, causal)


# ------------------------------------------------------------------------------- semantics

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_bwd_rows_without_keys_contribute_nothing(runtime_name, dtype):
    """Causal with Sq > L_b, and L_b = 0: rows with lse = -inf get dq = 0, and changing their q or
    dout changes no gradient (bit for bit)."""
    rng = np.random.default_rng(16_000)
    Sq = 6
    q, k, v, bt, sl = make_case(rng, 3, 4, 2, Sq, 16, 4, [0, 2, 11], dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    out, lse, dq, dk, dv = forward_backward(runtime_name, q, k, v, bt, sl, dout, True)
    empty = np.isneginf(lse)
    assert empty[0].all() and empty[1, :, :4].all() and not empty[1, :, 4:].any()
    assert not empty[2].any()
    assert np.all(dq.astype(np.float64)[empty] == 0.0)
    q2, dout2 = q.copy(), dout.copy()
    q2[empty] = (rng.standard_normal((int(empty.sum()), 16)) * 5).astype(dtype)
    dout2[empty] = (rng.standard_normal((int(empty.sum()), 16)) * 5).astype(dtype)
    dq2, dk2, dv2 = pn.paged_attention_bwd(dout2, q2, k, v, out, lse, bt, causal=True, seq_lens=sl,
                                           runtime=runtime_name)
    for a, b in ((dq2, dq), (dk2, dk), (dv2, dv)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    refs = paged_attention_bwd_ref(dout, q, k, v, bt, seq_lens=sl, causal=True)
    check_grads((dq, dk, dv), refs, q, k, v, dout, bt, sl, dtype, True)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_bwd_all_sequences_empty(runtime_name, dtype):
    rng = np.random.default_rng(16_100)
    q, k, v, bt, sl = make_case(rng, 2, 2, 1, 3, 8, 4, [0, 0], dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    _, lse, dq, dk, dv = forward_backward(runtime_name, q, k, v, bt, sl, dout, False)
    assert np.isneginf(lse).all()
    assert dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    assert dk.shape == k.shape and dv.shape == v.shape
    for g in (dq, dk, dv):
        assert np.all(g.astype(np.float64) == 0.0)


def test_bwd_unread_slots_may_hold_anything(runtime_name):
    """inf / huge values in unread slots (not only NaN) change nothing, and those slots get 0."""
    rng = np.random.default_rng(16_200)
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 2, 16, 4, [5, 2], F32, extra_cols=2)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out, lse, dq, dk, dv = forward_backward(runtime_name, q, k, v, bt, sl, dout, False)
    read = read_mask(bt, sl, k.shape)
    junk_bt = bt.copy()
    junk_bt[junk_bt == -1] = 10**6
    for junk in (np.inf, -np.inf, 3e38):
        kj, vj = k.copy(), v.copy()
        kj[~read], vj[~read] = junk, junk
        dq2, dk2, dv2 = pn.paged_attention_bwd(dout, q, kj, vj, out, lse, junk_bt, seq_lens=sl,
                                               runtime=runtime_name)
        np.testing.assert_array_equal(dq2, dq)
        np.testing.assert_array_equal(dk2, dk)
        np.testing.assert_array_equal(dv2, dv)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_finite_difference_f32(runtime_name, causal):
    """The whole chain in float32: d/d eps of loss = sum(out * dout) along a random direction of
    q, k_blocks and v_blocks (central difference of the library's forward, eps 1e-2, loss summed in
    float64) matches <grad, direction> from the backward within 1e-2 relative."""
    rng = np.random.default_rng(17_000 + causal)
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 3, 16, 4, [9, 6], F32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    _, _, dq, dk, dv = forward_backward(runtime_name, q, k, v, bt, sl, dout, causal)
    read = read_mask(bt, sl, k.shape)

    def loss(qx, kx, vx):
        out, _ = pn.paged_attention_fwd(qx, kx, vx, bt, causal=causal, seq_lens=sl, runtime=runtime_name)
        return float(np.sum(out.astype(np.float64) * dout.astype(np.float64)))

    eps = 1e-2
    dirs = [rng.standard_normal(q.shape)] + [np.where(read[:, :, None, None],
                                                      rng.standard_normal(k.shape), 0.0) for _ in range(2)]
    grads = (dq, dk, dv)
    for which in range(3):
        d = dirs[which]
        plus = [q, k, v]
        minus = [q, k, v]
        plus[which] = (plus[which] + eps * d).astype(np.float32)
        minus[which] = (minus[which] - eps * d).astype(np.float32)
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        an = float(np.sum(grads[which].astype(np.float64) * d))
        assert abs(fd - an) <= 1e-2 * max(abs(an), abs(fd)) + 1e-4, \
            f"{['q', 'k_blocks', 'v_blocks'][which]}: finite difference {fd:.6g} vs backward {an:.6g}"


# ------------------------------------------------------------------------------- API surface

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_bwd_tensor_in_tensor_out(runtime_name, dtype):
    rng = np.random.default_rng(18_000)
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 3, 16, 4, [6, 9], dtype, shared=True)
    dout = rng.standard_normal(q.shape).astype(dtype)
    out, lse, dq, dk, dv = forward_backward(runtime_name, q, k, v, bt, sl, dout, True)
    rt = pn.get_runtime(runtime_name)
    ts = [pn.tensor(x, runtime=rt) for x in (dout, q, k, v, out, lse)]
    tbefore = snapshot(*(t.numpy() for t in ts))
    tdq, tdk, tdv = pn.paged_attention_bwd(*ts, bt, causal=True, seq_lens=sl)
    assert_unchanged(tbefore, *(t.numpy() for t in ts))
    for t, ref, like in ((tdq, dq, ts[1]), (tdk, dk, ts[2]), (tdv, dv, ts[3])):
        assert isinstance(t, pn.Tensor) and t.runtime is rt
        assert t.dtype == like.dtype and t.shape == like.shape
        assert t.numpy().dtype == dtype
        np.testing.assert_array_equal(t.numpy(), ref)
    # Tensor outputs of the forward feed the backward directly.
    tout, tlse = pn.paged_attention_fwd(ts[1], ts[2], ts[3], bt, causal=True, seq_lens=sl)
    tdq2, _, _ = pn.paged_attention_bwd(ts[0], ts[1], ts[2], ts[3], tout, tlse, bt, causal=True,
                                        seq_lens=sl)
    np.testing.assert_array_equal(tdq2.numpy(), dq)


@pytest.mark.parametrize("kv3d", [False, True], ids=["4d", "3d"])
def test_bwd_redundant_params_given_correctly(runtime_name, kv3d):
    rng = np.random.default_rng(18_100 + kv3d)
    H, Hkv, Sq, D, bs = 4, (1 if kv3d else 2), 3, 16, 4
    q, k, v, bt, sl = make_case(rng, 2, H, Hkv, Sq, D, bs, [9, 5], F32, kv3d=kv3d)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out, lse, dq, dk, dv = forward_backward(runtime_name, q, k, v, bt, sl, dout, True)
    got = pn.paged_attention_bwd(dout, q, k, v, out, lse, bt, H, Hkv, Sq, 9, D, bs, True, seq_lens=sl,
                                 runtime=runtime_name)
    for a, b in zip(got, (dq, dk, dv)):
        np.testing.assert_array_equal(a, b)
    got = pn.paged_attention_bwd(dout, q, k, v, out, lse, bt, num_heads=np.int64(H),
                                 num_kv_heads=np.int32(Hkv), seq_len_q=np.uint8(Sq),
                                 seq_len_k=np.int16(12), head_dim=np.int64(D),
                                 block_size=np.int64(bs), causal=True, seq_lens=sl,
                                 runtime=runtime_name)
    for a, b in zip(got, (dq, dk, dv)):
        np.testing.assert_array_equal(a, b)
    client = pn.get_runtime(runtime_name).client
    got = client.paged_attention_bwd(dout, q, k, v, out, lse, bt, H, Hkv, Sq, None, D, bs, True,
                                     seq_lens=sl)
    for a, b in zip(got, (dq, dk, dv)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_seq_len_k_without_seq_lens(runtime_name, causal):
    rng = np.random.default_rng(18_200 + causal)
    L = 10
    q, k, v, bt, sl = make_case(rng, 3, 4, 2, 4, 16, 4, [L, L, L], F32, extra_cols=2)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_len_k=L, causal=causal, runtime=runtime_name)
    grads = pn.paged_attention_bwd(dout, q, k, v, out, lse, bt, seq_len_k=L, causal=causal,
                                   runtime=runtime_name)
    refs = paged_attention_bwd_ref(dout, q, k, v, bt, seq_len_k=L, causal=causal)
    check_grads(grads, refs, q, k, v, dout, bt, sl, F32, causal)


def test_bwd_non_contiguous_inputs(runtime_name):
    rng = np.random.default_rng(18_300)
    q, k, v, bt, sl = make_case(rng, 3, 4, 2, 5, 16, 4, [9, 3, 14], BF16)
    dout = rng.standard_normal(q.shape).astype(BF16)
    out, lse, dq, dk, dv = forward_backward(runtime_name, q, k, v, bt, sl, dout, True)
    qv = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    dov = np.ascontiguousarray(dout.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    kv = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    lsev = np.asfortranarray(lse)
    assert not (qv.flags.c_contiguous or kv.flags.c_contiguous or lsev.flags.c_contiguous)
    before = snapshot(qv, dov, kv, lsev)
    got = pn.paged_attention_bwd(dov, qv, kv, v, out, lsev, np.asfortranarray(bt), causal=True,
                                 seq_lens=sl, runtime=runtime_name)
    assert_unchanged(before, qv, dov, kv, lsev)
    for a, b in zip(got, (dq, dk, dv)):
        np.testing.assert_array_equal(a, b)
        assert a.flags.c_contiguous


# ------------------------------------------------------------------------------- property

@st.composite
def small_cases(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.integers(1, 3))
    Sq = draw(st.integers(1, 6))
    D = draw(st.sampled_from([8, 16, 24]))
    bs = draw(st.sampled_from([1, 2, 4, 5]))
    lens = draw(st.lists(st.integers(0, 13), min_size=B, max_size=B))
    causal = draw(st.booleans())
    shared = draw(st.booleans())
    kv3d = Hkv == 1 and draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return B, Hkv * G, Hkv, Sq, D, bs, lens, causal, shared, kv3d, seed


# runtime_name is a plain string fixture, so sharing it across examples is safe.
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=small_cases())
# One visible key (or copies of one slot) per row: dq and dk are analytically 0; float32 noise remains.
@example(case=(1, 1, 1, 1, 24, 1, [1], False, False, False, 0))
@example(case=(2, 2, 1, 4, 8, 2, [1, 0], True, False, True, 1))
@example(case=(2, 6, 2, 3, 16, 1, [0, 4], True, True, False, 1770 + 7919 * 2))
def test_bwd_property_matches_reference_f32(runtime_name, case):
    B, H, Hkv, Sq, D, bs, lens, causal, shared, kv3d, seed = case
    rng = np.random.default_rng(seed)
    run_and_check(runtime_name, rng, B, H, Hkv, Sq, D, bs, lens, F32, causal, shared=shared, kv3d=kv3d)


@pytest.mark.skipif("cuda" not in RUNTIMES, reason="no CUDA runtime (GPU or simulator)")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=[DTYPE_IDS[d] for d in FLOAT_DTYPES])
@pytest.mark.parametrize("D,rows", [(16, 1), (40, 37), (128, 300)], ids=["d16-1row", "d40-37rows", "d128-300rows"])
def test_cuda_delta_kernel_rowsums(dtype, D, rows):
    """The backward's delta kernel at the client's geometry (a warp per row on a GPU, one thread on
    the simulator): delta = rowsum(dout * out) in float32 against float64, lse2 = lse * log2 e, for
    head dims below, across and above a warp and row counts that leave a partial block."""
    from numba import cuda

    from paged_numba.dtypes import DType
    from paged_numba.kernels.cuda.paged_attention_bwd import delta_kernel
    from paged_numba.runtime.cuda import plan

    code = {F32: DType.F32, F16: DType.F16, BF16: DType.BF16}[dtype]
    pn.get_runtime("cuda")
    sim = is_sim("cuda")
    rng = np.random.default_rng(seed_of("delta-kernel", D, rows, str(dtype)))
    dout = rng.standard_normal((rows, D)).astype(dtype)
    out = rng.standard_normal((rows, D)).astype(dtype)
    lse = rng.standard_normal(rows).astype(np.float32)
    storage = code.storage
    d_dout, d_out = (cuda.to_device(np.ascontiguousarray(x).view(storage)) for x in (dout, out))
    delta = cuda.device_array(rows, np.float32)
    lse2 = cuda.device_array(rows, np.float32)
    TX, ET = plan.delta_lanes(sim), plan.elementwise_threads(sim)
    delta_kernel(D, code.code, TX)[-(-rows * TX // ET), ET](d_dout, d_out, cuda.to_device(lse), delta, lse2)
    want = (dout.astype(np.float64) * out.astype(np.float64)).sum(axis=1)
    scale = (np.abs(dout.astype(np.float64) * out.astype(np.float64))).sum(axis=1)
    assert np.all(np.abs(delta.copy_to_host() - want) <= 1e-6 * scale + 1e-30)
    np.testing.assert_allclose(lse2.copy_to_host(), lse * np.float32(1.4426950408889634), rtol=1e-6)
