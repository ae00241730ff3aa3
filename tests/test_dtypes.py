"""The element codecs of ``paged_numba/dtypes.py`` against NumPy / ml_dtypes, bit for bit.

- ``decode_table``: every code of E4M3 / E5M2 (256) and F16 (65536) decodes to the value ml_dtypes
  / NumPy give it (NaN where they have NaN, +-inf where they have +-inf, the sign of -0.0 kept).
- ``fp8_encode`` (the parallel njit array path) equals ``clip(x, -max, max).astype(fp8)`` of
  ml_dtypes -- round to nearest even, saturating, NaN -> NaN -- on > 1e6 float32 values per format:
  every representable value and every midpoint between neighbours (both signs, and one float32
  ulp either side of each), the FP8 subnormal range and below it, float32 subnormals, overflow,
  +-inf, NaN of both signs, +-0, random values over the whole FP8 range and random bit patterns.
- ``fp8_encode_bits`` run as plain Python (the scalar the njit kernels compile) equals the array
  path.
- ``encode_f32`` / ``decode_f32`` round trips for F16, BF16 and both FP8 formats.
"""
import warnings

import ml_dtypes
import numpy as np
import pytest

from paged_numba.dtypes import FP8_MAX, DType, decode_table, fp8_decode_table, fp8_encode_bits, fp8_params
from paged_numba.kernels.cpu.codecs import decode_f32, encode_f32, fp8_encode

FP8 = [DType.FP8_E4M3, DType.FP8_E5M2]
FP8_IDS = ["e4m3", "e5m2"]
ML = {DType.FP8_E4M3: ml_dtypes.float8_e4m3fn, DType.FP8_E5M2: ml_dtypes.float8_e5m2}
# Smallest positive subnormal: 2 ** (1 - bias - mantissa bits).
TINY = {DType.FP8_E4M3: 2.0 ** -9, DType.FP8_E5M2: 2.0 ** -16}


def ml_encode(x, dtype) -> np.ndarray:
    """The oracle: ml_dtypes' round-to-nearest-even cast after clipping to +-max (saturation)."""
    m = np.float32(FP8_MAX[dtype])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # "invalid value encountered in cast"
        return np.clip(np.asarray(x, np.float32), -m, m).astype(ML[dtype]).view(np.uint8)


def ml_values(dtype) -> np.ndarray:
    """float32 value of each of the 256 codes, per ml_dtypes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.arange(256, dtype=np.uint8).view(ML[dtype]).astype(np.float32)


def finite_positive_values(dtype) -> np.ndarray:
    """Sorted float64 array of the distinct finite values >= 0 of the format."""
    v = ml_values(dtype).astype(np.float64)
    # abs: -0.0 passes ``>= 0`` too, and which of the two zeros np.unique keeps depends on the sort
    # NumPy picks for the CPU (AVX-512 machines kept -0.0, whose code is 0x80).
    return np.unique(np.abs(v[np.isfinite(v) & (v >= 0)]))


def assert_codes_equal(got, want, x):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.uint8 and got.shape == want.shape
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    if bad.size:
        i = bad[:8]
        xs = np.asarray(x, np.float32).reshape(-1)[i]
        raise AssertionError(
            f"{bad.size} codes differ, e.g. x={xs.tolist()} (bits "
            f"{[hex(b) for b in xs.view(np.uint32)]}): got {[hex(c) for c in got.reshape(-1)[i]]}, "
            f"ml_dtypes {[hex(c) for c in want.reshape(-1)[i]]}")


def encoder_inputs(dtype, rng) -> np.ndarray:
    """>= 1e6 float32 values covering every rounding case of the format (see module docstring)."""
    pos = finite_positive_values(dtype)                       # 0, subnormals, normals, max
    mx, tiny = FP8_MAX[dtype], TINY[dtype]
    mids = (pos[:-1] + pos[1:]) / 2                           # exact ties (one more mantissa bit)
    ulp_top = pos[-1] - pos[-2]
    beyond = np.array([mx + ulp_top / 2, mx + ulp_top, 2 * mx])   # the overflow tie and past it
    exact = np.concatenate([pos, mids, beyond]).astype(np.float32)
    assert np.all(exact.astype(np.float64) == np.concatenate([pos, mids, beyond]))  # exact in f32
    near = np.concatenate([exact, np.nextafter(exact, np.float32(np.inf)),
                           np.nextafter(exact, np.float32(-np.inf))])
    # Around and below the smallest subnormal: tiny / 2 is a tie to 0 (even), tiny * 3/2 a tie to 2*tiny.
    sub = np.array([tiny / 2, tiny / 4, tiny * 0.75, tiny * 1.5, tiny * 2.5, tiny / 1024,
                    2.0 ** -126, 2.0 ** -149], np.float32)
    sub = np.concatenate([sub, np.nextafter(sub, np.float32(np.inf)), np.nextafter(sub, np.float32(0))])
    below = rng.uniform(0, tiny, 20_000).astype(np.float32)
    subnormal_range = rng.uniform(0, 8 * pos[8], 50_000).astype(np.float32)  # through the subnormals
    f32_subnormals = rng.integers(1, 1 << 23, 20_000, dtype=np.uint32).view(np.float32)
    overflow = np.exp(rng.uniform(np.log(mx), np.log(3e38), 20_000)).astype(np.float32)
    specials = np.array([0.0, np.inf, np.nan, np.finfo(np.float32).max, mx, 1.0], np.float32)
    nans = np.array([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7FA00000, 0x7FC00001], np.uint32).view(np.float32)
    log_uniform = np.exp(rng.uniform(np.log(tiny / 4), np.log(mx * 1.1), 400_000)).astype(np.float32)
    lin_uniform = rng.uniform(0, mx * 1.05, 100_000).astype(np.float32)
    positive = np.concatenate([near, sub, below, subnormal_range, f32_subnormals, overflow,
                               specials, nans, log_uniform, lin_uniform])
    both = np.concatenate([positive, -positive])              # -0, -inf, NaN with the sign bit set
    random_bits = rng.integers(0, 1 << 32, 420_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([both, random_bits])
    assert x.size >= 1_000_000
    return x


# ------------------------------------------------------------------------------- decode tables

@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_fp8_decode_table_matches_ml_dtypes(dtype):
    table = decode_table(dtype)
    want = ml_values(dtype)
    assert table.dtype == np.float32 and table.shape == (256,)
    np.testing.assert_array_equal(np.isnan(table), np.isnan(want), err_msg="NaN codes")
    np.testing.assert_array_equal(np.isposinf(table), np.isposinf(want), err_msg="+inf codes")
    np.testing.assert_array_equal(np.isneginf(table), np.isneginf(want), err_msg="-inf codes")
    fin = np.isfinite(want)
    # Bitwise on finite values: same value and the same sign of zero.
    np.testing.assert_array_equal(table[fin].view(np.uint32), want[fin].view(np.uint32))
    assert np.signbit(table[0x80]) and table[0x80] == 0.0 and not np.signbit(table[0])
    assert table.max(initial=-np.inf, where=fin) == FP8_MAX[dtype]
    np.testing.assert_array_equal(fp8_decode_table(dtype).view(np.uint32)[fin], table.view(np.uint32)[fin])


def test_fp8_decode_table_special_codes():
    e4, e5 = decode_table(DType.FP8_E4M3), decode_table(DType.FP8_E5M2)
    assert np.flatnonzero(np.isnan(e4)).tolist() == [0x7F, 0xFF]
    assert not np.isinf(e4).any()
    assert np.flatnonzero(np.isnan(e5)).tolist() == [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]
    assert e5[0x7C] == np.inf and e5[0xFC] == -np.inf
    assert e4[0x7E] == 448.0 and e4[0xFE] == -448.0 and e5[0x7B] == 57344.0
    assert e4[0x01] == 2.0 ** -9 and e5[0x01] == 2.0 ** -16
    assert e4[0x08] == 2.0 ** -6 and e5[0x04] == 2.0 ** -14          # smallest normals


def test_f16_decode_table_matches_numpy():
    table = decode_table(DType.F16)
    want = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    assert table.dtype == np.float32 and table.shape == (1 << 16,)
    np.testing.assert_array_equal(np.isnan(table), np.isnan(want))
    fin = ~np.isnan(want)
    np.testing.assert_array_equal(table[fin].view(np.uint32), want[fin].view(np.uint32))


@pytest.mark.parametrize("dtype", [DType.F16, *FP8], ids=["f16", *FP8_IDS])
def test_decode_tables_are_read_only_and_cached(dtype):
    table = decode_table(dtype)
    assert decode_table(dtype) is table
    with pytest.raises(ValueError):
        table[0] = 1.0


@pytest.mark.parametrize("dtype", [DType.F32, DType.BF16, DType.I32])
def test_decode_table_rejects_types_without_table(dtype):
    with pytest.raises(ValueError):
        decode_table(dtype)


# ------------------------------------------------------------------------------- FP8 encoder

@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_fp8_encode_matches_ml_dtypes_on_a_million_values(dtype):
    x = encoder_inputs(dtype, np.random.default_rng(11 + dtype.code))
    assert_codes_equal(fp8_encode(x, dtype), ml_encode(x, dtype), x)


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_fp8_encode_every_representable_value_round_trips(dtype):
    codes = np.arange(256, dtype=np.uint8)
    vals = decode_table(dtype)
    got = fp8_encode(vals, dtype)
    fin = np.isfinite(vals)
    np.testing.assert_array_equal(got[fin], codes[fin])
    # NaN codes encode to the format's NaN (sign kept by ml_dtypes' convention).
    assert np.isnan(decode_table(dtype)[got[np.isnan(vals)]]).all()


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_fp8_encode_ties_round_to_even(dtype):
    """Every midpoint between neighbouring values rounds to the one with an even code."""
    pos = finite_positive_values(dtype)
    mids = ((pos[:-1] + pos[1:]) / 2).astype(np.float32)
    for sign in (1, -1):
        got = fp8_encode(sign * mids, dtype)
        lo = fp8_encode((sign * pos[:-1]).astype(np.float32), dtype)
        hi = fp8_encode((sign * pos[1:]).astype(np.float32), dtype)
        assert np.all((got == lo) | (got == hi))
        assert np.all(got % 2 == 0), "ties must go to the even code"
        # One float32 ulp off the tie decides it.
        up = fp8_encode(np.nextafter(sign * mids, np.float32(sign * np.inf)), dtype)
        down = fp8_encode(np.nextafter(sign * mids, np.float32(0)), dtype)
        np.testing.assert_array_equal(up, hi)
        np.testing.assert_array_equal(down, lo)


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_fp8_encode_saturates_and_keeps_nan_and_zero_sign(dtype):
    mx = FP8_MAX[dtype]
    max_code = fp8_params(dtype)[2]
    x = np.array([np.inf, 1e30, 3.4e38, mx * 1.5, mx + 1, mx], np.float32)
    np.testing.assert_array_equal(fp8_encode(x, dtype), np.full(x.size, max_code, np.uint8))
    np.testing.assert_array_equal(fp8_encode(-x, dtype), np.full(x.size, 0x80 | max_code, np.uint8))
    nans = np.array([0x7FC00000, 0x7F800001, 0xFFC00000, 0xFF800001], np.uint32).view(np.float32)
    got = fp8_encode(nans, dtype)
    assert np.isnan(decode_table(dtype)[got]).all()
    np.testing.assert_array_equal(got >> 7, [0, 0, 1, 1])
    zeros = np.array([0.0, -0.0, TINY[dtype] / 2, -TINY[dtype] / 2, 1e-45, -1e-45], np.float32)
    np.testing.assert_array_equal(fp8_encode(zeros, dtype), [0, 0x80, 0, 0x80, 0, 0x80])


def test_fp8_encode_keeps_shape_and_takes_other_layouts():
    x = np.random.default_rng(3).standard_normal((3, 4, 5)).astype(np.float32) * 10
    for dtype in FP8:
        want = ml_encode(x, dtype)
        got = fp8_encode(x, dtype)
        assert got.shape == x.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(fp8_encode(x.transpose(2, 0, 1), dtype), want.transpose(2, 0, 1))
        np.testing.assert_array_equal(fp8_encode(x.astype(np.float64), dtype), want)
        assert fp8_encode(np.zeros((0, 3), np.float32), dtype).shape == (0, 3)


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_fp8_encode_bits_pure_python_matches_array_path(dtype):
    """``fp8_encode_bits`` called from Python (not compiled) gives the compiled path's codes."""
    rng = np.random.default_rng(21 + dtype.code)
    x = encoder_inputs(dtype, rng)
    # A few hundred: every representable value, midpoints, specials, and random picks.
    pos = finite_positive_values(dtype)
    mids = (pos[:-1] + pos[1:]) / 2
    pick = np.concatenate([
        pos.astype(np.float32), -mids.astype(np.float32),
        np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, TINY[dtype] / 2, 1e-40, 3e38],
                 np.float32),
        rng.choice(x, 200)])
    want = fp8_encode(pick, dtype)
    params = fp8_params(dtype)
    got = np.array([int(fp8_encode_bits(np.float32(v).view(np.uint32), *params)) for v in pick],
                   np.uint8)
    assert_codes_equal(got, want, pick)
    assert_codes_equal(got, ml_encode(pick, dtype), pick)


# ------------------------------------------------------------------------------- encode / decode

def test_encode_decode_f32_identity():
    x = np.random.default_rng(5).standard_normal(100).astype(np.float32)
    assert encode_f32(x, DType.F32) is x
    assert decode_f32(x, DType.F32) is x


@pytest.mark.parametrize("dtype,npdt", [(DType.F16, np.float16), (DType.BF16, ml_dtypes.bfloat16)],
                         ids=["f16", "bf16"])
def test_16bit_round_trips(dtype, npdt):
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    vals = decode_f32(codes, dtype)
    assert vals.dtype == np.float32
    want = codes.view(npdt).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(vals), np.isnan(want))
    fin = ~np.isnan(want)
    np.testing.assert_array_equal(vals[fin].view(np.uint32), want[fin].view(np.uint32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # NumPy warns casting NaN to bf16
        back = encode_f32(vals, dtype)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back[fin], codes[fin])               # -0.0 and +-inf included
    assert np.isnan(decode_f32(back[~fin], dtype)).all()
    # float32 -> 16 bit rounds to nearest even like NumPy / ml_dtypes.
    x = np.random.default_rng(6).standard_normal(100_000).astype(np.float32) * 1000
    x = np.concatenate([x, np.array([7e4, -7e4, 1e-8, -0.0, np.inf], np.float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_array_equal(encode_f32(x, dtype), x.astype(npdt).view(np.uint16))


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_fp8_round_trips(dtype):
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    vals = decode_f32(codes, dtype)
    assert vals.dtype == np.float32 and vals.shape == codes.shape
    np.testing.assert_array_equal(vals.view(np.uint32)[np.isfinite(vals)],
                                  decode_table(dtype)[codes].view(np.uint32)[np.isfinite(vals)])
    back = encode_f32(vals, dtype)
    assert back.dtype == np.uint8 and back.shape == codes.shape
    fin = np.isfinite(vals)
    np.testing.assert_array_equal(back[fin], codes[fin])
    # E5M2 +-inf saturate to +-max (SPEC: +-inf saturates); NaN stays NaN.
    inf = np.isinf(vals)
    np.testing.assert_array_equal(decode_f32(back[inf], dtype), np.sign(vals[inf]) * FP8_MAX[dtype])
    assert np.isnan(decode_f32(back[np.isnan(vals)], dtype)).all()
    # float32 -> FP8 -> float32 equals ml_dtypes' saturating cast.
    x = np.random.default_rng(7).standard_normal(10_000).astype(np.float32) * FP8_MAX[dtype] / 50
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.clip(x, -FP8_MAX[dtype], FP8_MAX[dtype]).astype(ML[dtype]).astype(np.float32)
    np.testing.assert_array_equal(decode_f32(encode_f32(x, dtype), dtype), want)


def test_encode_f32_rejects_integer_types():
    with pytest.raises(TypeError):
        encode_f32(np.zeros(3, np.float32), DType.I32)
