"""The runtime registry: ``get_runtime``, ``available_runtimes``, ``register_runtime``.

Explicit argument > ``PAGED_NUMBA_RUNTIME`` > ``"auto"``. Runtimes are imported lazily and created
once; ``import paged_numba`` never imports ``numba.cuda``. ``"auto"`` picks ``"cuda"`` when a real GPU
is usable, else ``"cpu"``; it never picks the CUDA simulator.
"""
from __future__ import annotations

import os
import threading

from ..errors import RuntimeUnavailableError
from .base import Client, Device, Runtime

ENV_VAR = "PAGED_NUMBA_RUNTIME"


def _make_cpu():
    from .cpu import CpuRuntime

    return CpuRuntime()


def _make_cuda():
    from .cuda import CudaRuntime

    return CudaRuntime()


_FACTORIES = {"cpu": _make_cpu, "cuda": _make_cuda}
_INSTANCES: dict = {}
_FAILURES: dict = {}
_LOCK = threading.RLock()


def register_runtime(name: str, factory) -> None:
    """Register (or replace) a runtime: ``factory()`` returns a ``Runtime`` or raises
    ``RuntimeUnavailableError``. It is called at the first ``get_runtime(name)``."""
    if not isinstance(name, str) or not name.strip() or name.strip().lower() == "auto":
        raise ValueError(f"name: expected a non-empty runtime name other than 'auto', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable returning a Runtime, got {type(factory).__name__}")
    key = name.strip().lower()
    with _LOCK:
        _FACTORIES[key] = factory
        _INSTANCES.pop(key, None)
        _FAILURES.pop(key, None)


def _create(key: str) -> Runtime:
    with _LOCK:
        if key in _INSTANCES:
            return _INSTANCES[key]
        if key in _FAILURES:
            raise RuntimeUnavailableError(_FAILURES[key])
        try:
            rt = _FACTORIES[key]()
        except RuntimeUnavailableError as exc:
            _FAILURES[key] = str(exc)
            raise
        _INSTANCES[key] = rt
        return rt


def _real_gpu_possible() -> bool:
    """Cheap pre-check for "auto": not the simulator, and the CUDA driver library loads."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return False
    import ctypes

    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


def get_runtime(name=None) -> Runtime:
    """The runtime called ``name`` ("cpu", "cuda", "auto", or a registered name), created once.
    ``None`` means ``$PAGED_NUMBA_RUNTIME``, else ``"auto"``. A ``Runtime`` is returned as is."""
    if isinstance(name, Runtime) or hasattr(name, "client"):  # a runtime object, as is
        return name
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
    if not isinstance(name, str):
        raise TypeError(f"runtime: expected a runtime name or Runtime, got {type(name).__name__}")
    key = name.strip().lower()
    if key == "auto":
        if "cuda" in _FACTORIES and _real_gpu_possible():
            try:
                return _create("cuda")
            except RuntimeUnavailableError:
                pass
        return _create("cpu")
    if key not in _FACTORIES:
        names = ", ".join(repr(n) for n in _FACTORIES)
        raise ValueError(f"runtime: unknown name {name!r}; registered: {names} (or 'auto')")
    return _create(key)


def available_runtimes() -> list:
    """Names of the registered runtimes that can start here (each is started to find out)."""
    found = []
    for key in list(_FACTORIES):
        try:
            _create(key)
        except RuntimeUnavailableError:
            continue
        found.append(key)
    return found


__all__ = ["Client", "Device", "Runtime", "RuntimeUnavailableError", "available_runtimes",
           "get_runtime", "register_runtime"]
