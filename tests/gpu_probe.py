"""Whether a real GPU is here, checked through the CUDA driver without importing numba (conftest.py
must decide on the simulator before numba is imported; test modules ask the same question)."""
from __future__ import annotations

import ctypes


def real_gpu() -> bool:
    """A CUDA driver that sees at least one GPU."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        n = ctypes.c_int(0)
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(n)) == 0 and n.value > 0
    return False
