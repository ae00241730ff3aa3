"""Element types: the public ``DType``, its NumPy / ml_dtypes mapping, and the FP8 codecs.

Kernels never see float16, bfloat16 or FP8 values as such (numba's CPU target has no float16, and
CUDA's 16-bit / FP8 helpers break ``cache=True``): they see the *storage* dtype -- ``uint16`` for
F16 / BF16, ``uint8`` for FP8 -- and decode in the kernel. ``DType.code`` is the small integer a
kernel factory specializes on.

This module is pure NumPy (no numba): the whole-array encoders and decoders that run a kernel
(``encode_f32``, ``decode_f32``, ``fp8_encode``) live in ``kernels/cpu/codecs.py``, which imports
from here and never the other way round.
"""
from __future__ import annotations

import enum

import ml_dtypes
import numpy as np


class DType(enum.Enum):
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"
    I32 = "i32"
    I64 = "i64"

    @property
    def numpy(self) -> np.dtype:
        """The NumPy dtype a user sees (ml_dtypes for BF16 / FP8)."""
        return _NUMPY[self]

    @property
    def storage(self) -> np.dtype:
        """The dtype kernels see: float32, uint16 (F16 / BF16), uint8 (FP8), int32, int64."""
        return _STORAGE[self]

    @property
    def code(self) -> int:
        """Compile-time constant for kernel factories."""
        return _CODE[self]

    @property
    def itemsize(self) -> int:
        return _STORAGE[self].itemsize

    @property
    def is_float(self) -> bool:
        return self in (DType.F32, DType.F16, DType.BF16)

    @property
    def is_fp8(self) -> bool:
        return self in (DType.FP8_E4M3, DType.FP8_E5M2)

    def __repr__(self) -> str:
        return f"DType.{self.name}"

    __str__ = __repr__


_NUMPY = {
    DType.F32: np.dtype(np.float32),
    DType.F16: np.dtype(np.float16),
    DType.BF16: np.dtype(ml_dtypes.bfloat16),
    DType.FP8_E4M3: np.dtype(ml_dtypes.float8_e4m3fn),
    DType.FP8_E5M2: np.dtype(ml_dtypes.float8_e5m2),
    DType.I32: np.dtype(np.int32),
    DType.I64: np.dtype(np.int64),
}
_STORAGE = {
    DType.F32: np.dtype(np.float32),
    DType.F16: np.dtype(np.uint16),
    DType.BF16: np.dtype(np.uint16),
    DType.FP8_E4M3: np.dtype(np.uint8),
    DType.FP8_E5M2: np.dtype(np.uint8),
    DType.I32: np.dtype(np.int32),
    DType.I64: np.dtype(np.int64),
}
# Kernel codes: 0 f32, 1 f16, 2 bf16, 3 e4m3, 4 e5m2.
F32, F16, BF16, E4M3, E5M2 = 0, 1, 2, 3, 4
_CODE = {DType.F32: F32, DType.F16: F16, DType.BF16: BF16, DType.FP8_E4M3: E4M3,
         DType.FP8_E5M2: E5M2, DType.I32: 5, DType.I64: 6}
_FROM_NUMPY = {v: k for k, v in _NUMPY.items()}

FP8_MAX = {DType.FP8_E4M3: 448.0, DType.FP8_E5M2: 57344.0}
_FP8_NAMES = {"e4m3": DType.FP8_E4M3, "e4m3fn": DType.FP8_E4M3, "e5m2": DType.FP8_E5M2}


def from_numpy_dtype(dt) -> DType | None:
    """The DType of a NumPy dtype, or None when it has none (uint8 is raw storage, not a DType)."""
    return _FROM_NUMPY.get(np.dtype(dt))


def as_dtype(value) -> DType:
    """DType from a DType, its name ("bf16", "fp8_e4m3", "F32"), or a NumPy dtype."""
    if isinstance(value, DType):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        for d in DType:
            if key in (d.value, d.name.lower()):
                return d
        if key in _FP8_NAMES:
            return _FP8_NAMES[key]
    try:
        found = from_numpy_dtype(value)
    except TypeError:
        found = None
    if found is None:
        names = ", ".join(d.value for d in DType)
        raise TypeError(f"dtype: expected one of {names} (or the NumPy / ml_dtypes dtype), got {value!r}")
    return found


def fp8_dtype(fp8_format) -> DType:
    """DType for an ``fp8_format`` string ("e4m3" / "e5m2")."""
    key = str(fp8_format).strip().lower()
    if key not in _FP8_NAMES:
        raise ValueError(f"fp8_format: expected 'e4m3' or 'e5m2', got {fp8_format!r}")
    return _FP8_NAMES[key]


def to_storage(arr: np.ndarray, dtype: DType) -> np.ndarray:
    """View a NumPy array of ``dtype.numpy`` (or already storage-typed) as kernel storage."""
    if arr.dtype == dtype.storage:
        return arr
    return arr.view(dtype.storage)


def from_storage(arr: np.ndarray, dtype: DType) -> np.ndarray:
    """View kernel storage as the user-facing NumPy dtype."""
    if arr.dtype == dtype.numpy:
        return arr
    return arr.view(dtype.numpy)


_TABLES: dict = {}


def decode_table(dtype: DType) -> np.ndarray:
    """float32 value of every code of F16 or an FP8 type, indexed by its storage bits (read-only)."""
    if dtype not in _TABLES:
        if dtype.is_fp8:
            table = fp8_decode_table(dtype)
        elif dtype == DType.F16:
            table = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
        else:
            raise ValueError(f"decode_table: no table for {dtype}")
        table.setflags(write=False)
        _TABLES[dtype] = table
    return _TABLES[dtype]


# ------------------------------------------------------------------------------------- FP8
# E4M3 (OCP "e4m3fn"): 4 exponent bits, bias 7, 3 mantissa bits, no infinities, NaN = S.1111.111,
#   max finite 448. E5M2: 5 exponent bits, bias 15, 2 mantissa bits, IEEE-like inf / NaN, max 57344.
# (mantissa bits, exponent bias, largest finite code, NaN code) per format:
FP8_E4M3_PARAMS = (3, 7, 0x7E, 0x7F)
FP8_E5M2_PARAMS = (2, 15, 0x7B, 0x7E)


def fp8_params(dtype: DType) -> tuple:
    return FP8_E4M3_PARAMS if dtype == DType.FP8_E4M3 else FP8_E5M2_PARAMS


def fp8_decode_table(dtype: DType) -> np.ndarray:
    """float32 value of each of the 256 codes, from the bit layout (sign, exponent, mantissa)."""
    mbits, bias, _, _ = fp8_params(dtype)
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    e = (codes >> mbits) & ((0x80 >> mbits) - 1)
    m = codes & ((1 << mbits) - 1)
    frac = m / float(1 << mbits)
    val = np.where(e == 0, frac * 2.0 ** (1 - bias), (1.0 + frac) * 2.0 ** (e - bias))
    emax = (0x80 >> mbits) - 1
    if dtype == DType.FP8_E4M3:
        val = np.where((e == emax) & (m == (1 << mbits) - 1), np.nan, val)
    else:
        val = np.where(e == emax, np.where(m == 0, np.inf, np.nan), val)
    return np.copysign(val, sign).astype(np.float32)


def fp8_encode_bits(u, mbits, bias, max_code, nan_code):
    """FP8 code (uint8) of the float32 whose bits are ``u`` (uint32): round to nearest even,
    saturating to +-max finite (infinities included), NaN -> NaN. Integer arithmetic only, so one
    definition serves numba's CPU and CUDA targets (compiled where it is used) and plain Python."""
    u = np.uint32(u)
    sign = np.uint8((u >> np.uint32(24)) & np.uint32(0x80))
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):
        return sign | np.uint8(nan_code)
    shift = 23 - mbits
    rebias = 127 - bias                    # float32 exponent minus FP8 exponent
    # float32 bits of the largest finite FP8 value: exponent (max_code >> mbits), mantissa bits.
    max_bits = np.uint32((((max_code >> mbits) + rebias) << 23) | ((max_code & ((1 << mbits) - 1)) << shift))
    if a >= max_bits:
        return sign | np.uint8(max_code)
    e = np.int32(a >> np.uint32(23))
    if e > rebias:                         # FP8 normal range: round the mantissa at ``shift``
        r = a + np.uint32((1 << (shift - 1)) - 1) + ((a >> np.uint32(shift)) & np.uint32(1))
        return sign | np.uint8((r >> np.uint32(shift)) - np.uint32(rebias << mbits))
    s = shift + 1 + rebias - e             # FP8 subnormals: units of 2 ** (1 - bias - mbits)
    if e == 0 or s >= 25:
        return sign
    m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    q = m >> np.uint32(s)
    rem = m & np.uint32((1 << s) - 1)
    half = np.uint32(1 << (s - 1))
    if rem > half or (rem == half and (q & np.uint32(1)) == np.uint32(1)):
        q += np.uint32(1)
    return sign | np.uint8(q)
