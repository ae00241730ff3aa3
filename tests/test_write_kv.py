"""``pn.write_kv``: new K/V rows scattered into the pools in place, per runtime (tiny shapes, so the
CUDA simulator runs them too).

- float pools (f32 / f16 / bf16, 4-D and 3-D, NumPy and Tensor pools): the result equals a NumPy
  scatter bit for bit; untouched slots (NaN included) keep their bytes; negative slots are skipped;
  k, v and slot_mapping are not modified;
- FP8 pools: the stored codes equal ml_dtypes' ``clip(x / scale, -max, max)`` cast bit for bit, for
  f32 / f16 / bf16 rows holding ties, subnormals, out-of-range values, +-inf, NaN and +-0;
- every bad input raises ValueError / TypeError naming the argument, and writes nothing.
"""
from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest

import paged_numba as pn
from helpers import BF16, F16, F32, assert_unchanged, snapshot

SIM_OK = True  # every case here is small enough for the CUDA simulator

ML = {"e4m3": np.dtype(ml_dtypes.float8_e4m3fn), "e5m2": np.dtype(ml_dtypes.float8_e5m2)}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_PARAMS = {"e4m3": (3, 7), "e5m2": (2, 15)}      # mantissa bits, exponent bias
N, BS, HKV, D = 5, 3, 2, 8


def _scatter(pool, rows, slots):
    """NumPy oracle: ``pool`` with row t at slot ``slots[t]`` (negative: skipped)."""
    out = pool.copy()
    flat = out.reshape((-1,) + pool.shape[2:])
    for t, s in enumerate(slots):
        if s >= 0:
            flat[s] = rows[t]
    return out


def _pools(rng, dtype, kv3d=False):
    shape = (N, BS, D) if kv3d else (N, BS, HKV, D)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    k.reshape(-1)[::7] = np.nan   # old contents, NaN included, must survive where nothing is written
    v.reshape(-1)[::5] = np.nan
    return k.astype(dtype), v.astype(dtype)


def _slots(rng, T):
    slots = rng.permutation(N * BS)[:T].astype(np.int64)
    slots[1] = -1
    slots[-1] = -7
    return slots


def _maybe_tensor(x, runtime_name, as_tensor):
    return pn.tensor(x, runtime_name) if as_tensor else x


def _host(x):
    return x.numpy() if isinstance(x, pn.Tensor) else x


def _bits(x):
    return np.ascontiguousarray(x).view(np.uint8)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "tensor"])
@pytest.mark.parametrize("kv3d", [False, True], ids=["4d", "3d"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
def test_write_float_pools_in_place(runtime_name, dtype, kv3d, as_tensor):
    rng = np.random.default_rng(17 + 3 * kv3d + as_tensor + len(str(dtype)))
    T = 6
    kp, vp = _pools(rng, dtype, kv3d)
    row_shape = (T, D) if kv3d else (T, HKV, D)
    k = rng.standard_normal(row_shape).astype(np.float32).astype(dtype)
    v = rng.standard_normal(row_shape).astype(np.float32).astype(dtype)
    slots = _slots(rng, T)
    want_k, want_v = _scatter(kp, k, slots), _scatter(vp, v, slots)
    before = snapshot(k, v, slots)
    kt, vt = _maybe_tensor(kp, runtime_name, as_tensor), _maybe_tensor(vp, runtime_name, as_tensor)
    assert pn.write_kv(kt, vt, _maybe_tensor(k, runtime_name, as_tensor),
                       _maybe_tensor(v, runtime_name, as_tensor), slots, runtime=runtime_name) is None
    assert_unchanged(before, k, v, slots)
    got_k, got_v = _host(kt), _host(vt)
    assert got_k.dtype == dtype and got_k.shape == kp.shape
    np.testing.assert_array_equal(_bits(got_k), _bits(want_k))
    np.testing.assert_array_equal(_bits(got_v), _bits(want_v))


def _fp8_rows(rng, fmt, scale, shape):
    """float32 rows exercising every rounding case of ``fmt`` after division by ``scale``."""
    mbits, bias = FP8_PARAMS[fmt]
    m = FP8_MAX[fmt]
    pos = np.unique(np.abs(np.arange(256, dtype=np.uint8).view(ML[fmt]).astype(np.float64)))
    pos = pos[np.isfinite(pos)]
    mids = (pos[:-1] + pos[1:]) / 2                                   # ties (scale is a power of 2)
    tiny = 2.0 ** (1 - bias - mbits)
    special = [np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, m * 1.5, -m * 4, 3e38, tiny / 2, tiny * 0.75,
               -tiny * 1.5, m, m * (1 + 2.0 ** -(mbits + 1))]
    n = int(np.prod(shape))
    pick = rng.choice(mids, n // 2) * rng.choice([-1.0, 1.0], n // 2)
    rand = np.exp(rng.uniform(np.log(tiny / 4), np.log(m * 2), n)) * rng.choice([-1.0, 1.0], n)
    x = np.concatenate([special, pick, rand])[:n] * scale
    rng.shuffle(x[len(special):])
    return x.astype(np.float32).reshape(shape)


def _ml_quantize(x, fmt, scale):
    m = np.float32(FP8_MAX[fmt])
    with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.clip(np.asarray(x, np.float32) / np.float32(scale), -m, m).astype(ML[fmt])


@pytest.mark.parametrize("scales", [(0.5, 2.0), (0.37, 1.3)], ids=["pow2", "odd"])
@pytest.mark.parametrize("src", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_write_fp8_matches_ml_dtypes_bit_for_bit(runtime_name, fmt, src, scales):
    rng = np.random.default_rng(5 + len(fmt) + len(str(src)) + int(scales[0] * 10))
    T = 8
    k_scale, v_scale = scales
    kp = np.full((N, BS, HKV, D), 0x7F, np.uint8).view(ML[fmt])        # NaN codes: old contents
    vp = np.full((N, BS, HKV, D), 0x11, np.uint8).view(ML[fmt])
    with np.errstate(over="ignore"):
        k = _fp8_rows(rng, fmt, k_scale, (T, HKV, D)).astype(src)
        v = _fp8_rows(rng, fmt, v_scale, (T, HKV, D)).astype(src)
    slots = _slots(rng, T)
    want_k = _scatter(kp, _ml_quantize(k, fmt, k_scale), slots)
    want_v = _scatter(vp, _ml_quantize(v, fmt, v_scale), slots)
    before = snapshot(k, v)
    pn.write_kv(kp, vp, k, v, slots, k_scale=k_scale, v_scale=v_scale, runtime=runtime_name)
    assert_unchanged(before, k, v)
    for got, want in ((kp, want_k), (vp, want_v)):
        bad = np.flatnonzero(_bits(got) != _bits(want))
        assert bad.size == 0, (f"{bad.size} codes differ, e.g. got {_bits(got).reshape(-1)[bad[:6]]}, "
                               f"ml_dtypes {_bits(want).reshape(-1)[bad[:6]]}")


def test_write_fp8_raw_uint8_pools_and_tensors(runtime_name):
    rng = np.random.default_rng(3)
    kp = np.zeros((N, BS, HKV, D), np.uint8)
    vp = np.zeros((N, BS, HKV, D), np.uint8)
    k = rng.standard_normal((4, HKV, D)).astype(np.float32) * 50
    v = rng.standard_normal((4, HKV, D)).astype(np.float32) * 50
    slots = np.array([0, 14, -1, 3])
    pn.write_kv(kp, vp, k, v, slots, k_scale=0.25, fp8_format="e5m2", runtime=runtime_name)
    np.testing.assert_array_equal(kp, _scatter(np.zeros_like(kp), _ml_quantize(k, "e5m2", 0.25).view(np.uint8), slots))
    np.testing.assert_array_equal(vp, _scatter(np.zeros_like(vp), _ml_quantize(v, "e5m2", 1.0).view(np.uint8), slots))
    # The same through Tensors of an FP8 dtype, via the runtime's client.
    kt = pn.tensor(np.zeros((N, BS, HKV, D), np.uint8), runtime_name, dtype="fp8_e5m2")
    vt = pn.tensor(np.zeros((N, BS, HKV, D), np.uint8), runtime_name, dtype="fp8_e5m2")
    pn.get_runtime(runtime_name).client.write_kv(kt, vt, pn.tensor(k, runtime_name), pn.tensor(v, runtime_name),
                                                 slots, k_scale=0.25)
    np.testing.assert_array_equal(kt.numpy().view(np.uint8), kp)
    np.testing.assert_array_equal(vt.numpy().view(np.uint8), vp)


def test_write_nothing_when_every_slot_is_negative(runtime_name):
    kp = np.full((N, BS, HKV, D), np.nan, np.float32)
    vp = np.full((N, BS, HKV, D), np.nan, np.float32)
    before = snapshot(kp, vp)
    ones = np.ones((3, HKV, D), np.float32)
    pn.write_kv(kp, vp, ones, ones, [-1, -2, -1], runtime=runtime_name)
    pn.write_kv(kp, vp, ones[:0], ones[:0], np.zeros(0, np.int32), runtime=runtime_name)
    assert_unchanged(before, kp, vp)


# ------------------------------------------------------------------------------ errors

def _valid(pool_dtype=np.float32, src=None):
    rng = np.random.default_rng(0)
    kp = np.zeros((N, BS, HKV, D), pool_dtype)
    vp = np.zeros((N, BS, HKV, D), pool_dtype)
    src = pool_dtype if src is None else src
    k = rng.standard_normal((4, HKV, D)).astype(np.float32).astype(src)
    v = rng.standard_normal((4, HKV, D)).astype(np.float32).astype(src)
    return dict(k_blocks=kp, v_blocks=vp, k=k, v=v, slot_mapping=np.array([0, 5, -1, 14]))


E4 = ML["e4m3"]
ERRORS = [
    # (changes to the valid call, exception, text the message must contain)
    (dict(slot_mapping=np.array([0, 5, -1, 15])), ValueError, r"slot_mapping\[3\] = 15 is outside the pool's slots \[0, 15\)"),
    (dict(slot_mapping=np.array([7, 5, 2, 5])), ValueError, r"slot_mapping\[1\] and slot_mapping\[3\] are both 5"),
    (dict(slot_mapping=np.array([0, 5, 1])), ValueError, r"slot_mapping: expected 1-D \[T=4\]"),
    (dict(slot_mapping=np.array([0.0, 5, 1, 2])), TypeError, r"slot_mapping: expected an integer array"),
    (dict(k=np.zeros((4, HKV + 1, D), np.float32)), ValueError, r"k: expected \[T, Hkv=2, D=8\]"),
    (dict(k=np.zeros((4, HKV * D), np.float32)), ValueError, r"k: expected"),
    (dict(v=np.zeros((3, HKV, D), np.float32)), ValueError, r"v: expected k's shape"),
    (dict(k=np.zeros((4, HKV, D), np.float16)), TypeError, r"k: expected the pool's dtype f32, got f16"),
    (dict(v=np.zeros((4, HKV, D), np.float64)), TypeError, r"v: expected the pool's dtype f32, got float64"),
    (dict(v_blocks=np.zeros((N, BS, HKV, D), np.float16)), TypeError, r"v_blocks: expected k_blocks' dtype f32"),
    (dict(v_blocks=np.zeros((N + 1, BS, HKV, D), np.float32)), ValueError, r"v_blocks: expected the shape of k_blocks"),
    (dict(k_blocks=np.zeros((N, BS), np.float32), v_blocks=np.zeros((N, BS), np.float32)), ValueError,
     r"k_blocks: expected 4-D"),
    (dict(k_blocks=np.zeros((N, BS, HKV, D)).tolist()), TypeError, r"k_blocks: expected a NumPy array or pn.Tensor"),
    (dict(k_blocks=np.zeros((N, BS, HKV, 2 * D), np.float32)[..., ::2]), ValueError, r"k_blocks: expected a C-contiguous"),
    (dict(k_blocks=np.zeros((N, BS, HKV, D), np.int32), v_blocks=np.zeros((N, BS, HKV, D), np.int32)), TypeError,
     r"k_blocks: expected dtype f32, f16, bf16, fp8_e4m3 or fp8_e5m2, got i32"),
    (dict(k_scale=2.0), ValueError, r"k_scale: scales apply to FP8 pools only"),
    (dict(v_scale=float("nan")), ValueError, r"v_scale: expected a finite number > 0"),
    (dict(k_scale=0.0), ValueError, r"k_scale: expected a finite number > 0"),
    (dict(k_scale="1"), TypeError, r"k_scale: expected a real number"),
    (dict(fp8_format="e4m3"), TypeError, r"k_blocks: dtype f32 is not FP8"),
]


@pytest.mark.parametrize("change, exc, text", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_write_kv_errors_name_the_argument_and_write_nothing(change, exc, text):
    args = _valid()
    args.update(change)
    before = snapshot(*(a for a in args.values() if isinstance(a, np.ndarray)))
    with pytest.raises(exc, match=text):
        pn.write_kv(runtime="cpu", **args)
    assert_unchanged(before, *(a for a in args.values() if isinstance(a, np.ndarray)))


FP8_ERRORS = [
    (dict(k=np.zeros((4, HKV, D), np.float64)), TypeError, r"k: expected f32, f16 or bf16 values to quantize into "
                                                           r"the fp8_e4m3 pool, got float64; float64 is not supported"),
    (dict(v=np.zeros((4, HKV, D), E4)), TypeError, r"v: expected f32, f16 or bf16 values to quantize"),
    (dict(v=np.zeros((4, HKV, D), np.float16)), TypeError, r"v: expected k's dtype f32, got f16"),
    (dict(k_scale=1e-50), ValueError, r"k_scale: expected a float32-representable number > 0"),
    (dict(v_scale=-1.0), ValueError, r"v_scale: expected a finite number > 0"),
    (dict(v_blocks=np.zeros((N, BS, HKV, D), ML["e5m2"])), TypeError, r"v_blocks: expected k_blocks' dtype fp8_e4m3"),
    (dict(k_blocks=np.zeros((N, BS, HKV, D), np.uint8), v_blocks=np.zeros((N, BS, HKV, D), np.uint8)), TypeError,
     r"k_blocks: raw uint8 FP8 codes need fp8_format"),
    (dict(fp8_format="e5m2"), TypeError, r"k_blocks: dtype fp8_e4m3 disagrees with fp8_format fp8_e5m2"),
]


@pytest.mark.parametrize("change, exc, text", FP8_ERRORS, ids=[e[2][:40] for e in FP8_ERRORS])
def test_write_kv_fp8_errors(change, exc, text):
    args = _valid(E4, np.float32)
    args.update(change)
    before = snapshot(*(a for a in args.values() if isinstance(a, np.ndarray)))
    with pytest.raises(exc, match=text):
        pn.write_kv(runtime="cpu", **args)
    assert_unchanged(before, *(a for a in args.values() if isinstance(a, np.ndarray)))


def test_write_kv_refuses_read_only_shared_and_mixed_pools():
    args = _valid()
    kp = args["k_blocks"]
    kp.setflags(write=False)
    with pytest.raises(ValueError, match=r"k_blocks: the array is read-only"):
        pn.write_kv(runtime="cpu", **args)
    args = _valid()
    with pytest.raises(ValueError, match=r"v_blocks: shares memory with k_blocks"):
        pn.write_kv(args["k_blocks"], args["k_blocks"], args["k"], args["v"], args["slot_mapping"], runtime="cpu")
    whole = np.zeros((N + 1, BS, HKV, D), np.float32)
    with pytest.raises(ValueError, match=r"v_blocks: shares memory with k_blocks"):
        pn.write_kv(whole[:N], whole[1:], args["k"], args["v"], args["slot_mapping"], runtime="cpu")
    kt = pn.tensor(args["k_blocks"], "cpu")
    with pytest.raises(ValueError, match=r"v_blocks: expected a pn.Tensor like k_blocks"):
        pn.write_kv(kt, args["v_blocks"], args["k"], args["v"], args["slot_mapping"])
    assert not args["v_blocks"].any() and not kt.numpy().any()
