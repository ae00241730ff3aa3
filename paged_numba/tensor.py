"""Tensor: storage + shape + dtype on one runtime (numr's Tensor, as used by boostr).

``storage`` is the runtime's native array (a NumPy array on ``cpu``, a device array on ``cuda``)
holding the kernel storage dtype of ``dtype`` (``uint16`` for F16 / BF16, ``uint8`` for FP8), always
C-contiguous. A Tensor never aliases memory an op writes: ops allocate their outputs.
"""
from __future__ import annotations

import numpy as np

from .dtypes import DType, as_dtype, from_numpy_dtype, from_storage, to_storage


class Tensor:
    __slots__ = ("storage", "dtype", "runtime")

    def __init__(self, storage, dtype: DType, runtime):
        self.storage = storage
        self.dtype = dtype
        self.runtime = runtime

    @property
    def shape(self) -> tuple:
        return tuple(self.storage.shape)

    @property
    def ndim(self) -> int:
        return len(self.storage.shape)

    def numpy(self) -> np.ndarray:
        """Host copy as a NumPy array (BF16 / FP8 as ml_dtypes arrays)."""
        return from_storage(self.runtime.to_host(self.storage), self.dtype)

    def to(self, runtime) -> "Tensor":
        """This tensor on another runtime (``Runtime`` or its name); itself when already there."""
        from .runtime import get_runtime

        rt = get_runtime(runtime)
        if rt is self.runtime:
            return self
        return Tensor(rt.from_host(to_storage(self.numpy(), self.dtype)), self.dtype, rt)

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, runtime={self.runtime.name!r})"


def tensor(data, runtime=None, dtype=None) -> Tensor:
    """A Tensor from a NumPy array (ml_dtypes included), another Tensor, or (cuda runtime) any object
    with ``__cuda_array_interface__``. ``dtype`` converts (NumPy ``astype`` semantics) or, for raw
    ``uint16`` / ``uint8`` data, names the 16-bit or FP8 type the bits hold."""
    from .runtime import get_runtime

    want = None if dtype is None else as_dtype(dtype)
    if isinstance(data, Tensor):
        rt = data.runtime if runtime is None else get_runtime(runtime)
        if want is None or want == data.dtype:
            return data.to(rt)
        return tensor(data.numpy(), rt, want)
    rt = get_runtime(runtime)
    if not isinstance(data, np.ndarray) and hasattr(data, "__cuda_array_interface__"):
        storage, np_dtype = rt.from_external(data)
        np_dtype = np.dtype(np_dtype)
        if want is not None and np_dtype.kind in "iu" and np_dtype.itemsize == want.itemsize:
            found = want  # raw bits (e.g. a torch bf16 tensor viewed as int16) reinterpreted
        else:
            found = _dtype_of(np_dtype, want, "data")
            if np_dtype not in (found.numpy, found.storage):
                raise TypeError(f"data: a device array of {np_dtype} cannot be converted to {found} "
                                "without a copy; convert it on the device first")
        if np_dtype != found.storage:
            storage = storage.view(found.storage)
        return Tensor(storage, found, rt)
    arr = np.asarray(data)
    found = _dtype_of(arr.dtype, want, "data")
    if arr.dtype not in (found.numpy, found.storage):
        arr = arr.astype(found.numpy)
    storage = np.ascontiguousarray(to_storage(arr, found))
    return Tensor(rt.from_host(storage), found, rt)


def _dtype_of(np_dtype, want, what) -> DType:
    """DType of data with NumPy dtype ``np_dtype``, given the requested DType ``want`` (or None)."""
    np_dtype = np.dtype(np_dtype)
    if want is not None:
        if np_dtype == want.storage or np_dtype == want.numpy:
            return want
        if np_dtype.kind in "fiu" or from_numpy_dtype(np_dtype) is not None:
            return want  # converted with astype by the caller
        raise TypeError(f"{what}: cannot convert {np_dtype} to {want}")
    found = from_numpy_dtype(np_dtype)
    if found is None:
        hint = ""
        if np_dtype == np.uint8:
            hint = "; raw FP8 bits need dtype='fp8_e4m3' or 'fp8_e5m2'"
        elif np_dtype == np.uint16:
            hint = "; raw 16-bit bits need dtype='f16' or 'bf16'"
        elif np_dtype == np.float64:
            hint = "; float64 is not supported: pass dtype='f32' to convert"
        raise TypeError(f"{what}: expected f32, f16, bf16, fp8, int32 or int64 data, got {np_dtype}{hint}")
    return found
