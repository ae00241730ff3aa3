"""CudaRuntime: storage is numba device arrays; ops run as ``numba.cuda`` kernels (``client.py``).

Under ``NUMBA_ENABLE_CUDASIM=1`` the runtime runs on numba's CUDA simulator (correctness at tiny
shapes, no GPU needed).
"""
from __future__ import annotations

import numpy as np

from ...errors import RuntimeUnavailableError
from ..base import Device, Runtime
from .client import CudaClient

_FIX = ("install the NVIDIA driver and the CUDA toolkit wheels (pip install 'paged-numba[cuda13]' or "
        "'[cuda12]'), or set NUMBA_ENABLE_CUDASIM=1 for the simulator, or use runtime='cpu'")


def _import_cuda():
    try:
        import numba
        from numba import cuda
    except Exception as exc:  # a missing libcudart surfaces as DynamicLibNotFoundError
        raise RuntimeUnavailableError(f"numba.cuda cannot be imported ({exc}); {_FIX}") from None
    return numba, cuda


class CudaRuntime(Runtime):
    name = "cuda"

    def __init__(self):
        numba, cuda = _import_cuda()
        self._cuda = cuda
        self.simulator = bool(numba.config.ENABLE_CUDASIM)
        if not self.simulator:
            try:
                ok = cuda.is_available()
            except Exception as exc:  # pragma: no cover - driver trouble
                raise RuntimeUnavailableError(f"the CUDA driver failed to start ({exc}); {_FIX}") from None
            if not ok:
                raise RuntimeUnavailableError(f"no usable CUDA GPU or driver was found; {_FIX}")
        if self.simulator:
            self.sm_count = 1
            self.cc = (9, 0)   # what the simulator's twins stand in for
            self.device = Device("cuda", 0, "numba CUDA simulator")
        else:
            dev = cuda.get_current_device()
            name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
            cc = self.cc = tuple(dev.compute_capability)
            self.sm_count = int(dev.MULTIPROCESSOR_COUNT)
            self.device = Device("cuda", int(dev.id), f"{name}, sm_{cc[0]}{cc[1]}, {self.sm_count} SMs")
        self.client = CudaClient(self)

    def synchronize(self):
        self._cuda.synchronize()

    def from_host(self, arr):
        arr = np.ascontiguousarray(arr)
        canonical = tuple(int(np.prod(arr.shape[i + 1:])) * arr.itemsize for i in range(arr.ndim))
        if arr.strides != canonical:  # e.g. a size-1 axis with stride 0 from x[:, None]
            arr = arr.copy(order="C")
        return self._cuda.to_device(arr)

    def to_host(self, storage):
        return storage.copy_to_host()

    def from_external(self, obj):
        if self.simulator:
            raise TypeError("data: the CUDA simulator cannot take __cuda_array_interface__ objects; pass a "
                            "NumPy array")
        arr = self._cuda.as_cuda_array(obj)
        if not arr.is_c_contiguous():
            raise ValueError("data: expected a C-contiguous device array (call .contiguous() first)")
        return arr, arr.dtype

    def is_native(self, obj):
        return self._cuda.is_cuda_array(obj) if not self.simulator else hasattr(obj, "copy_to_host")
