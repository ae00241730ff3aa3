"""Element types: the public ``DType`` and its NumPy / ml_dtypes mapping.

Kernels never see float16, bfloat16 or FP8 values as such (numba's CPU target has no float16, and
CUDA's 16-bit / FP8 helpers break ``cache=True``): they see the *storage* dtype -- ``uint16`` for
F16 / BF16, ``uint8`` for FP8 -- and decode in the kernel. ``DType.code`` is the small integer a
kernel factory specializes on.
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


def decode_table(dtype: DType) -> np.ndarray:
    """float32 value of every code of a 16-bit or 8-bit type, indexed by its storage bits."""
    return _decode_table(dtype)


_TABLES: dict = {}


def _decode_table(dtype: DType) -> np.ndarray:
    if dtype not in _TABLES:
        n = 1 << (8 * dtype.itemsize)
        codes = np.arange(n, dtype=np.uint32).astype(dtype.storage)
        table = codes.view(dtype.numpy).astype(np.float32)
        table.setflags(write=False)
        _TABLES[dtype] = table
    return _TABLES[dtype]
