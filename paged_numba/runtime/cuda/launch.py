"""Launch records, prepared launches, streams and CUDA graphs of the cuda runtime.

numba's dispatcher spends ~110 us of host time on a launch of 15 arguments (type resolution, then
5 + 2 * ndim ctypes values per array). A plan launches the same kernels with the same metadata in
every layer, so ``PreparedLaunch`` packs the argument buffer once -- after a first launch through
numba has compiled the kernel and loaded its module -- and per run rewrites only the fields of the
arrays that change (q, K/V pools, out, lse: pointer, size, shape), then calls ``cuLaunchKernel``
on the compiled kernel's handle. On the simulator launches always go through numba.
"""
from __future__ import annotations

import ctypes

import numpy as np

_SLOT = 8           # bytes per kernel parameter slot in the packed buffer (every scalar fits)


class Launch:
    """One kernel launch: dispatcher, grid, block, dynamic shared memory, the arguments, and which
    of them are views of the per-run arrays: ``roles`` maps an argument index to (role, trailing
    shape, itemsize) -- the argument is ``arrays[role]`` viewed as [-1, *trailing] of that itemsize
    (role in "q", "k", "v", "out", "lse")."""

    __slots__ = ("kern", "grid", "block", "smem", "args", "roles")

    def __init__(self, kern, grid, block, smem, args, roles=None):
        self.kern, self.grid, self.block, self.smem, self.args = kern, grid, block, smem, args
        self.roles = roles or {}

    def __call__(self, stream):
        self.kern[self.grid, self.block, stream, self.smem](*self.args)


def _dims(d) -> tuple:
    d = (d,) if isinstance(d, int) else tuple(d)
    return tuple(int(x) for x in d) + (1,) * (3 - len(d))


def device_ptr(arr) -> int:
    return arr.device_ctypes_pointer.value or 0


class PreparedLaunch:
    """``launch`` of a ``Launch`` through ``cuLaunchKernel`` with a buffer packed once."""

    def __init__(self, launch: Launch):
        from numba.cuda.cudadrv.driver import binding

        self._binding = binding
        kern = launch.kern
        compiled = kern.compile(tuple(kern.typeof_pyval(a) for a in launch.args))
        self._func = compiled._codelibrary.get_cufunc().handle
        flat, starts = [], []
        for ty, val in zip(compiled.argument_types, launch.args):
            starts.append(len(flat))
            vals = []
            compiled._prepare_args(ty, val, 0, [], vals)
            flat.extend(vals)
        self._buf = np.zeros(len(flat), np.uint64)
        raw = self._buf.view(np.uint8)
        for i, val in enumerate(flat):
            if isinstance(val, (bool, np.bool_)):
                self._buf[i] = int(val)
            elif isinstance(val, int):
                self._buf[i] = np.uint64(val & 0xFFFFFFFFFFFFFFFF)
            elif isinstance(val, ctypes._SimpleCData):
                n = ctypes.sizeof(val)
                raw[i * _SLOT:i * _SLOT + n] = np.frombuffer(ctypes.string_at(ctypes.addressof(val), n), np.uint8)
            else:
                raise TypeError(f"prepared launch: cannot pack kernel argument {val!r}")
        base = self._buf.ctypes.data
        self._ptrs = (ctypes.c_void_p * max(1, len(flat)))(*[base + _SLOT * i for i in range(len(flat))])
        self._params = ctypes.addressof(self._ptrs)
        # numba's fields of an array argument: meminfo, parent, size, itemsize, data, shape, strides.
        # Per run only size (+2), data (+4) and the leading extent (+5) change: the trailing shape,
        # the itemsize and every stride (C-contiguous) are the first run's.
        self._roles = [(starts[i], role, int(np.prod(trailing, dtype=np.int64)), itemsize)
                       for i, (role, trailing, itemsize) in launch.roles.items()]
        self._grid, self._block, self._smem = _dims(launch.grid), _dims(launch.block), int(launch.smem)

    def __call__(self, stream_handle, arrays: dict) -> None:
        """Launch on the raw stream handle with ``arrays`` (role -> (pointer, bytes)) in the roles."""
        buf = self._buf
        for start, role, inner, itemsize in self._roles:
            ptr, nbytes = arrays[role]
            lead = nbytes // (itemsize * inner)
            buf[start + 2] = lead * inner
            buf[start + 4] = ptr
            buf[start + 5] = lead
        g, b = self._grid, self._block
        err, = self._binding.cuLaunchKernel(self._func, g[0], g[1], g[2], b[0], b[1], b[2], self._smem,
                                            stream_handle, self._params, 0)
        if int(err) != 0:
            raise RuntimeError(f"cuLaunchKernel failed: {err!r}")


def as_stream(cuda, stream, simulator: bool):
    """A numba stream from ``stream``: None (the default stream), a numba stream, an object with
    ``cuda_stream`` (torch), ``__cuda_stream__()`` (the CUDA stream protocol) or ``ptr`` (CuPy), or a raw
    int handle."""
    if stream is None:
        return cuda.default_stream()
    if hasattr(stream, "auto_synchronize") and hasattr(stream, "synchronize"):
        return stream                                   # a numba stream (or the simulator's)
    if hasattr(stream, "__cuda_stream__"):
        proto = stream.__cuda_stream__()
        ptr = proto[1] if isinstance(proto, tuple) else proto
    elif hasattr(stream, "cuda_stream"):
        ptr = stream.cuda_stream
    elif hasattr(stream, "ptr") and not isinstance(stream, (int, np.integer)):   # CuPy
        ptr = stream.ptr
    elif isinstance(stream, (int, np.integer)) and not isinstance(stream, (bool, np.bool_)):
        ptr = stream
    else:
        raise TypeError(f"stream: expected a numba stream, an object with cuda_stream / __cuda_stream__ / ptr "
                        f"(torch, CuPy) or an int handle, got {type(stream).__name__}")
    ptr = int(ptr)
    if ptr == 0:
        return cuda.default_stream()
    if simulator:
        raise TypeError("stream: the CUDA simulator takes numba streams only (cuda.stream()), not external "
                        f"handles ({type(stream).__name__})")
    return cuda.external_stream(ptr)


def stream_handle(stream) -> int:
    """The raw CUstream of a numba stream (0: the default stream)."""
    h = getattr(stream, "handle", None)
    if h is None:
        return 0
    try:
        return int(h)
    except TypeError:
        return int(getattr(h, "value", 0) or 0)


class Graph:
    """A CUDA graph captured from a plan's stream (``AttentionPlan.capture``)."""

    def __init__(self, stream, handle: int):
        from numba.cuda.cudadrv.driver import binding

        self._b = binding
        self._stream = stream
        self._h = handle
        self._graph = None
        self._exec = None
        mode = binding.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        _ok(binding.cuStreamBeginCapture(handle, mode), "cuStreamBeginCapture")

    def end(self) -> None:
        if self._graph is not None:
            return
        err, graph = self._b.cuStreamEndCapture(self._h)
        _ok((err,), "cuStreamEndCapture")
        self._graph = graph
        err, exe = self._b.cuGraphInstantiate(graph, 0)
        _ok((err,), "cuGraphInstantiate")
        self._exec = exe

    def abort(self) -> None:
        """End a capture that failed, dropping what it recorded (errors ignored)."""
        try:
            res = self._b.cuStreamEndCapture(self._h)
            if int(res[0]) == 0 and res[1] is not None:
                self._b.cuGraphDestroy(res[1])
        except Exception:
            pass

    def replay(self) -> None:
        """Launch the captured work again on the plan's stream (asynchronously)."""
        if self._exec is None:
            raise RuntimeError("graph.replay: the capture has not finished (leave the with block first)")
        _ok(self._b.cuGraphLaunch(self._exec, self._h), "cuGraphLaunch")

    def __del__(self):
        try:
            if self._exec is not None:
                self._b.cuGraphExecDestroy(self._exec)
            if self._graph is not None:
                self._b.cuGraphDestroy(self._graph)
        except Exception:
            pass


def _ok(res, what):
    err = res[0]
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err!r}")
