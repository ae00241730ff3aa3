"""Parity of ``pn.paged_attention_fwd`` with the float64 oracle ``ops/reference.py``, per runtime.

A covering set rather than the Cartesian product (every new dtype compiles a kernel): each head
dim with each dtype, each block size with causal and non-causal in each dtype, MHA / GQA / MQA,
Sq = 1 and Sq > 1 (Sq > L_b and several query tiles included), L_b = 0, shared blocks, 3-D pools;
then the API surface (NumPy / Tensor in and out, scale, seq_len_k, defaults, redundant params,
non-contiguous inputs, table dtypes) and a hypothesis property test.
"""
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import paged_numba as pn
from helpers import (BF16, DTYPE_IDS, F16, F32, FLOAT_DTYPES, assert_fwd_close, assert_unchanged,
                      is_sim, make_case, reference, skip_if_too_big_for_sim, snapshot)

HEADS = [(4, 4), (8, 2), (6, 1)]          # (H, Hkv): MHA, GQA (G = 4), MQA (G = 6)
HEAD_IDS = ["mha", "gqa", "mqa"]
BLOCK_SIZES = [1, 3, 16, 32]
HEAD_DIMS = [16, 40, 64, 80, 128, 256]


def run_and_check(runtime_name, rng, B, H, Hkv, Sq, D, bs, lens, dtype, causal, *, shared=False,
                  kv3d=False, scale=None):
    q, k, v, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, dtype, shared=shared, kv3d=kv3d)
    skip_if_too_big_for_sim(runtime_name, q.shape, int(sl.max(initial=0)))
    before = snapshot(q, k, v, bt, sl)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, causal=causal, seq_lens=sl, scale=scale,
                                      runtime=runtime_name)
    assert_unchanged(before, q, k, v, bt, sl)
    ref_out, ref_lse = reference(q, k, v, bt, seq_lens=sl, causal=causal, scale=scale)
    assert_fwd_close(out, lse, ref_out, ref_lse, dtype)
    return (q, k, v, bt, sl), (out, lse), (ref_out, ref_lse)


# ------------------------------------------------------------------------- parity: covering set

_HEAD_DIM_CASES = [(dt, D, i) for i, (dt, D) in enumerate(itertools.product(FLOAT_DTYPES, HEAD_DIMS))]


@pytest.mark.parametrize("dtype,D,i", _HEAD_DIM_CASES,
                         ids=[f"{DTYPE_IDS[dt]}-D{D}" for dt, D, _ in _HEAD_DIM_CASES])
def test_parity_head_dims(runtime_name, dtype, D, i):
    """Every head dim with every dtype; heads, block size, causal and Sq rotate across cases."""
    H, Hkv = HEADS[i % 3]
    bs = BLOCK_SIZES[i % 4]
    causal = i % 2 == 0
    Sq = (1, 4, 7)[i % 3]
    rng = np.random.default_rng(1000 + i)
    lens = [0, 2, 2 * bs + 1, 37]              # L_b = 0, L_b < Sq (when Sq > 2), partial blocks
    run_and_check(runtime_name, rng, 4, H, Hkv, Sq, D, bs, lens, dtype, causal)


_BS_CASES = [(dt, bs, c, i) for i, (dt, bs, c) in
             enumerate(itertools.product(FLOAT_DTYPES, BLOCK_SIZES, [False, True]))]


@pytest.mark.parametrize("dtype,bs,causal,i", _BS_CASES,
                         ids=[f"{DTYPE_IDS[dt]}-bs{bs}-{'causal' if c else 'full'}"
                              for dt, bs, c, _ in _BS_CASES])
def test_parity_block_sizes(runtime_name, dtype, bs, causal, i):
    """Every block size, causal and not, in every dtype; lengths on and around block edges."""
    H, Hkv = HEADS[i % 3]
    Sq = 1 if i % 4 < 2 else 5
    rng = np.random.default_rng(2000 + i)
    lens = [bs, bs + 1, 3 * bs - 1, 4, 0]
    run_and_check(runtime_name, rng, 5, H, Hkv, Sq, 32, bs, lens, dtype, causal)


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("Sq", [1, 3, 9])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parity_gqa_sq(runtime_name, heads, Sq, causal):
    """MHA / GQA / MQA x Sq (1, 3, and 9 > some L_b) x causal, f32."""
    H, Hkv = heads
    rng = np.random.default_rng(3000 + H * 100 + Hkv * 10 + Sq + causal)
    lens = [9, 5, 23, 0]                       # Sq == L_b, Sq > L_b, Sq < L_b, L_b = 0
    run_and_check(runtime_name, rng, 4, H, Hkv, Sq, 24, 4, lens, F32, causal)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("Sq", [33, 64, 70, 100])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parity_many_query_tiles(runtime_name, dtype, Sq, causal):
    """Prefill-sized Sq (several query tiles per sequence), L_b below, equal to and above Sq."""
    if is_sim(runtime_name):
        pytest.skip("prefill shapes are too large for the CUDA simulator")
    rng = np.random.default_rng(4000 + Sq + causal)
    lens = [Sq, Sq - 10, Sq + 45]
    run_and_check(runtime_name, rng, 3, 4, 2, Sq, 16, 16, lens, dtype, causal)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_parity_long_context_decode(runtime_name, dtype):
    """Decode (Sq = 1) and a short chunk over ~1-2k keys: long online-softmax chains."""
    if is_sim(runtime_name):
        pytest.skip("long contexts are too large for the CUDA simulator")
    rng = np.random.default_rng(4500)
    run_and_check(runtime_name, rng, 3, 8, 2, 1, 64, 16, [1500, 777, 2048], dtype, True)
    run_and_check(runtime_name, rng, 2, 4, 4, 3, 128, 32, [1201, 999], dtype, True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parity_shared_blocks(runtime_name, dtype, causal):
    rng = np.random.default_rng(5000 + causal)
    (q, k, v, bt, sl), _, _ = run_and_check(runtime_name, rng, 5, 8, 2, 3, 32, 4,
                                            [13, 16, 9, 2, 21], dtype, causal, shared=True)
    read = [int(bt[b, j]) for b in range(5) for j in range(-(-int(sl[b]) // 4))]
    assert len(set(read)) < len(read), "make_case(shared=True) did not share any block"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_parity_kv3d(runtime_name, dtype, causal):
    """A 3-D [N, bs, D] pool is Hkv = 1 and gives exactly what the 4-D [N, bs, 1, D] pool gives."""
    rng = np.random.default_rng(6000 + causal)
    (q, k, v, bt, sl), (out, lse), _ = run_and_check(
        runtime_name, rng, 3, 4, 1, 2, 16, 3, [7, 1, 12], dtype, causal, kv3d=True)
    assert k.ndim == 3
    out4, lse4 = pn.paged_attention_fwd(q, k[:, :, None, :], v[:, :, None, :], bt, causal=causal,
                                        seq_lens=sl, runtime=runtime_name)
    np.testing.assert_array_equal(out4, out)
    np.testing.assert_array_equal(lse4, lse)


# ------------------------------------------------------------------------------- semantics

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_rows_without_keys_are_zero_and_neg_inf(runtime_name, dtype):
    """L_b = 0 rows, and causal rows with p = L_b - Sq + i < 0: out exactly 0, lse -inf, no NaN —
    with every unused slot NaN."""
    rng = np.random.default_rng(7000)
    Sq = 6
    q, k, v, bt, sl = make_case(rng, 3, 4, 2, Sq, 16, 4, [0, 2, 11], dtype)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, causal=True, seq_lens=sl, runtime=runtime_name)
    out = np.asarray(out).astype(np.float64)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert np.all(out[0] == 0.0) and np.all(np.isneginf(lse[0]))          # L_b = 0
    assert np.all(out[1, :, :4] == 0.0) and np.all(np.isneginf(lse[1, :, :4]))  # p < 0
    assert np.all(np.isfinite(lse[1, :, 4:])) and np.all(np.isfinite(lse[2]))
    assert np.all(np.abs(out[1, :, 4:]).sum(axis=-1) > 0)
    # Query i = 4 of sequence 1 sees exactly key 0: lse = its score, out = its value.
    s0 = (q[1, :, 4].astype(np.float64) * k[bt[1, 0], 0, [0, 0, 1, 1]].astype(np.float64)).sum(-1) / 4.0
    np.testing.assert_allclose(lse[1, :, 4], s0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1, :, 4], v[bt[1, 0], 0, [0, 0, 1, 1]].astype(np.float64),
                               rtol=1e-6, atol=0)
    # Not causal: only L_b = 0 is empty.
    out, lse = pn.paged_attention_fwd(q, k, v, bt, causal=False, seq_lens=sl, runtime=runtime_name)
    assert np.all(np.isneginf(lse[0])) and np.all(np.isfinite(lse[1:]))
    assert np.all(np.asarray(out).astype(np.float64)[0] == 0.0)


def test_all_sequences_empty(runtime_name):
    rng = np.random.default_rng(7100)
    q, k, v, bt, sl = make_case(rng, 2, 2, 1, 3, 8, 4, [0, 0], F16)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime=runtime_name)
    assert out.dtype == F16 and np.all(out == 0) and np.all(np.isneginf(lse))


def test_causal_is_bottom_right_aligned(runtime_name):
    """The last query of every sequence sees all L_b keys, causal or not; the first of Sq sees
    L_b - Sq + 1 keys."""
    rng = np.random.default_rng(7200)
    q, k, v, bt, sl = make_case(rng, 2, 2, 2, 4, 16, 4, [6, 13], F32)
    full, lse_full = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime=runtime_name)
    cau, lse_cau = pn.paged_attention_fwd(q, k, v, bt, causal=True, seq_lens=sl, runtime=runtime_name)
    np.testing.assert_allclose(cau[:, :, -1], full[:, :, -1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(cau[:, :, 0], full[:, :, 0], atol=1e-3)
    # First query of sequence 0 sees keys 0..2 = attention over a 3-token sequence.
    sub, _ = pn.paged_attention_fwd(q[:1, :, :1], k, v, bt[:1], seq_lens=np.array([3]),
                                    runtime=runtime_name)
    np.testing.assert_allclose(cau[0, :, 0], sub[0, :, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_inputs_untouched_bytes(runtime_name, dtype):
    """NumPy and Tensor inputs keep every byte, NaN payloads included."""
    rng = np.random.default_rng(7300)
    q, k, v, bt, sl = make_case(rng, 3, 4, 2, 5, 16, 4, [3, 9, 0], dtype, shared=True)
    assert np.isnan(k.astype(np.float32)).any()
    before = snapshot(q, k, v, bt, sl)
    pn.paged_attention_fwd(q, k, v, bt, causal=True, seq_lens=sl, runtime=runtime_name)
    assert_unchanged(before, q, k, v, bt, sl)
    tq, tk, tv = (pn.tensor(x, runtime=runtime_name) for x in (q, k, v))
    tbefore = snapshot(tq.numpy(), tk.numpy(), tv.numpy())
    pn.paged_attention_fwd(tq, tk, tv, bt, causal=True, seq_lens=sl)
    assert_unchanged(tbefore, tq.numpy(), tk.numpy(), tv.numpy())
    assert_unchanged(before, q, k, v, bt, sl)


def test_nan_poison_does_not_leak_even_with_huge_garbage(runtime_name):
    """Unused slots holding inf / huge values (not only NaN) never reach a result either."""
    rng = np.random.default_rng(7400)
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 2, 16, 4, [5, 2], F32)
    ref_out, ref_lse = reference(q, k, v, bt, seq_lens=sl)
    read = np.zeros(k.shape[:2], bool)
    for b in range(2):
        for t in range(sl[b]):
            read[bt[b, t // 4], t % 4] = True
    for junk in (np.inf, -np.inf, 3e38):
        kj, vj = k.copy(), v.copy()
        kj[~read], vj[~read] = junk, junk
        out, lse = pn.paged_attention_fwd(q, kj, vj, bt, seq_lens=sl, runtime=runtime_name)
        assert_fwd_close(out, lse, ref_out, ref_lse, F32)


# ------------------------------------------------------------------------------- API surface

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_numpy_in_numpy_out(runtime_name, dtype):
    rng = np.random.default_rng(8000)
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 3, 16, 4, [6, 9], dtype)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime=runtime_name)
    assert type(out) is np.ndarray and type(lse) is np.ndarray
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == q.shape[:3]
    assert out.flags.c_contiguous and lse.flags.c_contiguous


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_tensor_in_tensor_out(runtime_name, dtype):
    rng = np.random.default_rng(8100)
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 3, 16, 4, [6, 9], dtype)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, causal=True, seq_lens=sl, runtime=runtime_name)
    rt = pn.get_runtime(runtime_name)
    tq, tk, tv = (pn.tensor(x, runtime=rt) for x in (q, k, v))
    tout, tlse = pn.paged_attention_fwd(tq, tk, tv, bt, causal=True, seq_lens=sl)
    assert isinstance(tout, pn.Tensor) and isinstance(tlse, pn.Tensor)
    assert tout.runtime is rt and tlse.runtime is rt
    assert tout.dtype == pn.tensor(q, runtime=rt).dtype and tlse.dtype == pn.DType.F32
    assert tout.shape == q.shape and tlse.shape == q.shape[:3]
    np.testing.assert_array_equal(tout.numpy(), out)
    assert tout.numpy().dtype == dtype
    np.testing.assert_array_equal(tlse.numpy(), lse)
    # block_table / seq_lens may be Tensors too (host metadata).
    tout2, _ = pn.paged_attention_fwd(tq, tk, tv, pn.tensor(bt, runtime=rt), causal=True,
                                      seq_lens=pn.tensor(sl, runtime=rt))
    np.testing.assert_array_equal(tout2.numpy(), out)


def test_runtime_object_or_name(runtime_name):
    rng = np.random.default_rng(8200)
    q, k, v, bt, sl = make_case(rng, 2, 2, 1, 2, 8, 2, [3, 4], F32)
    a, la = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime=pn.get_runtime(runtime_name))
    b, lb = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime=runtime_name)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)


def test_client_method_has_the_module_signature(runtime_name):
    """SPEC: the ops are module-level functions *and* methods of ``runtime.client`` with the same
    signature."""
    rng = np.random.default_rng(8250)
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 3, 8, 2, [3, 4], F32)
    a, la = pn.paged_attention_fwd(q, k, v, bt, causal=True, seq_lens=sl, runtime=runtime_name)
    client = pn.get_runtime(runtime_name).client
    b, lb = client.paged_attention_fwd(q, k, v, bt, 4, 2, 3, None, 8, 2, True, seq_lens=sl)
    np.testing.assert_array_equal(np.asarray(b), a)
    np.testing.assert_array_equal(np.asarray(lb), la)


@pytest.mark.parametrize("scale", [0.0, 0.37, 2.5, -0.8])
def test_custom_scale(runtime_name, scale):
    rng = np.random.default_rng(8300)
    run_and_check(runtime_name, rng, 2, 4, 2, 3, 16, 4, [10, 7], F32, True, scale=scale)


@pytest.mark.parametrize("scale", [1e37, 1e39])
def test_scores_overflowing_float32_are_not_empty_rows(runtime_name, scale):
    """A finite scale whose scores overflow float32 must either be rejected (ValueError naming
    scale) or still attend: a row with visible keys never reports lse = -inf / out = 0 (that is
    reserved for rows with no visible key)."""
    rng = np.random.default_rng(8320)
    q, k, v, bt, sl = make_case(rng, 1, 2, 1, 2, 8, 4, [4], F32)
    q, k = q * 3, k * 3
    try:
        out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, scale=scale, runtime=runtime_name)
    except ValueError as exc:
        assert "scale" in str(exc)
        return
    ref_out, _ = reference(q, k, v, bt, seq_lens=sl, scale=scale)
    assert not np.isneginf(lse).any(), f"rows with visible keys reported empty: lse = {lse}"
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)


def test_scale_default_is_inv_sqrt_d(runtime_name):
    rng = np.random.default_rng(8350)
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 3, 40, 4, [10, 7], F32)
    a, la = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime=runtime_name)
    b, lb = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, scale=1 / np.sqrt(40), runtime=runtime_name)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(la, lb, rtol=1e-6, atol=1e-7)
    c, _ = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, scale=1.0, runtime=runtime_name)
    assert not np.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seq_len_k_without_seq_lens(runtime_name, causal):
    rng = np.random.default_rng(8400 + causal)
    L = 10
    q, k, v, bt, sl = make_case(rng, 3, 4, 2, 4, 16, 4, [L, L, L], F32, extra_cols=2)
    assert (bt[:, 3:] == -1).all()
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_len_k=L, causal=causal, runtime=runtime_name)
    ref_out, ref_lse = reference(q, k, v, bt, seq_len_k=L, causal=causal)
    assert_fwd_close(out, lse, ref_out, ref_lse, F32)
    out2, lse2 = pn.paged_attention_fwd(q, k, v, bt, None, None, None, L, causal=causal,
                                        runtime=runtime_name)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(lse2, lse)
    out3, _ = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=causal, runtime=runtime_name)
    np.testing.assert_array_equal(out3, out)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_default_length_is_full_table(runtime_name, dtype):
    """No seq_lens, no seq_len_k: L_b = M * bs for every sequence."""
    rng = np.random.default_rng(8500)
    bs, M = 4, 3
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 5, 16, bs, [M * bs] * 2, dtype, extra_cols=0)
    assert bt.shape == (2, M) and (bt >= 0).all()
    out, lse = pn.paged_attention_fwd(q, k, v, bt, causal=True, runtime=runtime_name)
    ref_out, ref_lse = reference(q, k, v, bt, seq_lens=[M * bs] * 2, causal=True)
    assert_fwd_close(out, lse, ref_out, ref_lse, dtype)
    # Shorter seq_lens on the same table give something else (the default really is M * bs).
    out_short, _ = pn.paged_attention_fwd(q, k, v, bt, causal=True, seq_lens=[M * bs - 1] * 2,
                                          runtime=runtime_name)
    assert not np.allclose(out_short.astype(np.float32), out.astype(np.float32), atol=1e-3)


@pytest.mark.parametrize("kv3d", [False, True], ids=["4d", "3d"])
def test_redundant_params_given_correctly(runtime_name, kv3d):
    rng = np.random.default_rng(8600 + kv3d)
    H, Hkv, Sq, D, bs = 4, (1 if kv3d else 2), 3, 16, 4
    q, k, v, bt, sl = make_case(rng, 2, H, Hkv, Sq, D, bs, [9, 5], F32, kv3d=kv3d)
    base, base_lse = pn.paged_attention_fwd(q, k, v, bt, causal=True, seq_lens=sl, runtime=runtime_name)
    got, got_lse = pn.paged_attention_fwd(q, k, v, bt, H, Hkv, Sq, 9, D, bs, True, seq_lens=sl,
                                          runtime=runtime_name)
    np.testing.assert_array_equal(got, base)
    np.testing.assert_array_equal(got_lse, base_lse)
    got, _ = pn.paged_attention_fwd(q, k, v, bt, num_heads=np.int64(H), num_kv_heads=np.int32(Hkv),
                                    seq_len_q=np.uint8(Sq), seq_len_k=np.int16(12),
                                    head_dim=np.int64(D), block_size=np.int64(bs), causal=True,
                                    seq_lens=sl, runtime=runtime_name)
    np.testing.assert_array_equal(got, base)


def test_non_contiguous_inputs(runtime_name):
    """Transposed / strided views give bit-identical results to their contiguous copies."""
    rng = np.random.default_rng(8700)
    q, k, v, bt, sl = make_case(rng, 3, 4, 2, 5, 16, 4, [9, 3, 14], BF16)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, causal=True, seq_lens=sl, runtime=runtime_name)
    # q as a transposed view of a [B, Sq, H, D] array; k / v as views of [N, Hkv, bs, D] arrays;
    # v also strided along D; block_table in Fortran order; seq_lens a strided view.
    qv = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    kv = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    vwide = np.zeros(v.shape[:-1] + (2 * v.shape[-1],), v.dtype)
    vwide[..., ::2] = v
    vv = vwide[..., ::2]
    btv = np.asfortranarray(bt)
    slv = np.repeat(sl, 2)[::2]
    assert not (qv.flags.c_contiguous or kv.flags.c_contiguous or vv.flags.c_contiguous)
    assert not (btv.flags.c_contiguous or slv.flags.c_contiguous)
    np.testing.assert_array_equal(qv, q)
    before = snapshot(qv, kv, vv, btv, slv)
    out2, lse2 = pn.paged_attention_fwd(qv, kv, vv, btv, causal=True, seq_lens=slv, runtime=runtime_name)
    assert_unchanged(before, qv, kv, vv, btv, slv)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(lse2, lse)
    tout, _ = pn.paged_attention_fwd(*(pn.tensor(x, runtime=runtime_name) for x in (qv, kv, vv)),
                                     btv, causal=True, seq_lens=slv)
    np.testing.assert_array_equal(tout.numpy(), out)


@pytest.mark.parametrize("table_dtype", [np.int64, np.uint16, np.int16, np.uint8, np.uint64])
def test_block_table_integer_dtypes(runtime_name, table_dtype):
    rng = np.random.default_rng(8800)
    q, k, v, bt, sl = make_case(rng, 3, 4, 2, 2, 16, 4, [9, 3, 14], F16)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime=runtime_name)
    bt2 = bt.astype(table_dtype)          # -1 wraps to the type's max for unsigned: still unread
    sl2 = sl.astype(table_dtype)
    before = snapshot(bt2, sl2)
    out2, lse2 = pn.paged_attention_fwd(q, k, v, bt2, seq_lens=sl2, runtime=runtime_name)
    assert_unchanged(before, bt2, sl2)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(lse2, lse)


def test_unread_table_entries_may_hold_anything(runtime_name):
    rng = np.random.default_rng(8900)
    q, k, v, bt, sl = make_case(rng, 2, 2, 1, 2, 8, 4, [5, 8], F32, extra_cols=3)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime=runtime_name)
    junk = bt.copy()
    junk[junk == -1] = rng.choice([-7, 10**6, k.shape[0], -(2**31)], size=int((junk == -1).sum()))
    out2, lse2 = pn.paged_attention_fwd(q, k, v, junk, seq_lens=sl, runtime=runtime_name)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(lse2, lse)


def test_python_lists_for_table_and_lens(runtime_name):
    rng = np.random.default_rng(8950)
    q, k, v, bt, sl = make_case(rng, 2, 2, 1, 2, 8, 4, [5, 8], F32)
    out, _ = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime=runtime_name)
    out2, _ = pn.paged_attention_fwd(q, k, v, bt.tolist(), seq_lens=sl.tolist(), runtime=runtime_name)
    np.testing.assert_array_equal(out2, out)


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
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=small_cases())
def test_property_matches_reference_f32(runtime_name, case):
    B, H, Hkv, Sq, D, bs, lens, causal, shared, kv3d, seed = case
    rng = np.random.default_rng(seed)
    run_and_check(runtime_name, rng, B, H, Hkv, Sq, D, bs, lens, F32, causal,
                  shared=shared, kv3d=kv3d)
