"""The argument checks every op's config shares: shapes and dtypes of arrays and Tensors, ints and
finite reals, integer host arrays, non-finite values in q, the backward's lse. Each raises a
``ValueError`` / ``TypeError`` naming the argument, what was expected and what was given."""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..dtypes import DType, from_numpy_dtype
from ..tensor import Tensor

FLOAT_TYPES = (DType.F32, DType.F16, DType.BF16)


def _shape_dtype(x, name):
    """(shape, DType or None, numpy dtype) of a Tensor or array-like argument."""
    if isinstance(x, Tensor):
        return x.shape, x.dtype, x.dtype.numpy
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    try:
        npdt = np.dtype(x.dtype)
    except TypeError:
        raise TypeError(f"{name}: expected a NumPy array or pn.Tensor, got {type(x).__name__}") from None
    return tuple(x.shape), from_numpy_dtype(npdt), npdt


def _dtype_name(dt, npdt) -> str:
    return dt.value if dt is not None else str(npdt)


def _float_dtype(x, name, *, hint_fp8: bool = True) -> DType:
    shape, dt, npdt = _shape_dtype(x, name)
    if dt in FLOAT_TYPES:
        return dt
    hint = ""
    if dt is not None and dt.is_fp8 and hint_fp8:
        hint = "; FP8 inputs go to paged_attention_fwd_fp8"
    elif npdt == np.float64:
        hint = "; float64 is not supported, cast with .astype(np.float32)"
    raise TypeError(f"{name}: expected dtype f32, f16 or bf16, got {_dtype_name(dt, npdt)}{hint}")


def _check_int_param(value, name, actual, what):
    if value is None:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if int(value) != actual:
        raise ValueError(f"{name}={int(value)} disagrees with {what} = {actual}")


def _as_int(value, name) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


def _finite(value, name, *, positive: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0.0):
        what = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name}: expected {what}, got {value}")
    return value


# (mask, smallest |bits| of inf / NaN) per storage type: a value is not finite when its bits with the
# sign cleared are >= the threshold (E4M3 has no inf: 0x7f is its NaN).
_NONFINITE_BITS = {DType.F16: (0x7FFF, 0x7C00), DType.BF16: (0x7FFF, 0x7F80),
                   DType.FP8_E4M3: (0x7F, 0x7F), DType.FP8_E5M2: (0x7F, 0x7C)}


def _host_values(x, dt: DType):
    """x as a host NumPy array of its storage type, or None for device data (Tensors on a GPU
    runtime: their kernels flag non-finite scores instead)."""
    arr = x.storage if isinstance(x, Tensor) else x
    if not isinstance(arr, np.ndarray):
        if isinstance(x, Tensor) or hasattr(arr, "__cuda_array_interface__"):
            return None
        arr = np.asarray(arr)
    return arr if arr.dtype == dt.storage else arr.view(dt.storage)


def _nonfinite(arr: np.ndarray, dt: DType) -> np.ndarray:
    """Boolean mask of the inf / NaN elements of storage ``arr`` of dtype ``dt``."""
    if dt == DType.F32:
        return ~np.isfinite(arr)
    mask, bad = _NONFINITE_BITS[dt]
    return (arr & mask) >= bad


def _check_finite(x, dt: DType, name: str) -> None:
    """ValueError naming ``name`` and the first index when a host array holds inf or NaN (one pass
    when all is well: ``isfinite(...).all()`` for float32 -- the fastest NumPy form, ~60 us for a
    prefill's 512 K elements -- and the max of the bits without sign for 16-bit / FP8)."""
    arr = _host_values(x, dt)
    if arr is None or arr.size == 0:
        return
    if dt == DType.F32:
        if np.isfinite(arr).all():
            return
    else:
        mask, bad = _NONFINITE_BITS[dt]
        if int(np.bitwise_and(arr, mask).max()) < bad:
            return
    idx = tuple(int(i) for i in np.argwhere(_nonfinite(arr, dt))[0])
    raise ValueError(f"{name}: expected finite values, got inf or NaN at {name}[{', '.join(map(str, idx))}]")


def _check_lse(lse, dt: DType) -> None:
    """The backward's lse: finite, or -inf for a row that sees no key; NaN and +inf are errors."""
    arr = _host_values(lse, dt)
    if arr is None or arr.size == 0:
        return
    hi = arr.max()                      # NaN propagates through max; +inf is the max when present
    if not (np.isnan(hi) or hi == np.inf):
        return
    idx = tuple(int(i) for i in np.argwhere(np.isnan(arr) | (arr == np.inf))[0])
    raise ValueError(f"lse: expected the forward's lse (finite, or -inf for a row that sees no key), got "
                     f"{float(arr[idx])} at lse[{', '.join(map(str, idx))}]")


def _host_ints(x, name) -> np.ndarray:
    if isinstance(x, Tensor):
        arr = x.numpy()
    else:
        arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {arr.dtype}")
    return arr


def _pool_shape(k_blocks, v_blocks) -> tuple:
    """The pools' common shape [N, bs, Hkv, D] or [N, bs, D], or ValueError."""
    ks, _, _ = _shape_dtype(k_blocks, "k_blocks")
    vs, _, _ = _shape_dtype(v_blocks, "v_blocks")
    if len(ks) not in (3, 4):
        raise ValueError(f"k_blocks: expected 4-D [N, bs, Hkv, D] or 3-D [N, bs, D], got {len(ks)}-D shape {ks}")
    if vs != ks:
        raise ValueError(f"v_blocks: expected the shape of k_blocks {ks}, got {vs}")
    return ks


def _fp8_kv_dtype(x, name, fmt) -> DType:
    _, dt, npdt = _shape_dtype(x, name)
    if dt is not None and dt.is_fp8:
        if fmt is not None and dt != fmt:
            raise TypeError(f"{name}: dtype {dt.value} disagrees with fp8_format {fmt.value}")
        return dt
    if npdt == np.uint8:
        if fmt is None:
            raise TypeError(f"{name}: raw uint8 FP8 codes need fp8_format='e4m3' or 'e5m2'")
        return fmt
    hint = "; float K/V go to paged_attention_fwd" if dt in FLOAT_TYPES else ""
    raise TypeError(f"{name}: expected FP8 (float8_e4m3fn / float8_e5m2, or uint8 with fp8_format), "
                    f"got {_dtype_name(dt, npdt)}{hint}")


def _positive_int(value, name, *, minimum=1) -> int:
    value = _as_int(value, name)
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _same_memory(a, b) -> bool:
    a = a.storage if isinstance(a, Tensor) else a
    b = b.storage if isinstance(b, Tensor) else b
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.may_share_memory(a, b)
    return a is b
