"""The ops' boundary helpers: which runtime a call runs on, inputs as storage on it, results back
in the form the inputs came in."""
from __future__ import annotations

import numpy as np

from ..dtypes import DType, from_storage
from ..runtime import get_runtime
from ..tensor import Tensor


def _tensors_in(arrays: dict) -> dict:
    """The Tensors among the data arguments ``arrays`` (name -> value): all of them or none, else a
    ValueError naming the first plain one."""
    tensors = {n: a for n, a in arrays.items() if isinstance(a, Tensor)}
    if tensors and len(tensors) != len(arrays):
        plain = next(n for n in arrays if n not in tensors)
        first = next(iter(tensors))
        raise ValueError(f"{plain}: expected a pn.Tensor like {first}, got {type(arrays[plain]).__name__} "
                         "(pass all data arguments as Tensors, or all as NumPy arrays)")
    return tensors


def _pick_runtime(arrays: dict, runtime):
    """(runtime, tensors_in) for the data arguments ``arrays`` (name -> value)."""
    tensors = _tensors_in(arrays)
    if tensors:
        rts = {id(t.runtime): t.runtime for t in tensors.values()}
        if len(rts) > 1:
            where = ", ".join(f"{n} on {t.runtime.name!r}" for n, t in tensors.items())
            raise ValueError(f"inputs are on different runtimes ({where}); move them with .to()")
        rt = next(iter(rts.values()))
        if runtime is not None and get_runtime(runtime) is not rt:
            raise ValueError(f"runtime: {get_runtime(runtime).name!r} given, but the inputs are on {rt.name!r}")
        return rt, True
    return get_runtime(runtime), False


def _require_score_mods(rt, cfg, op="fwd"):
    """A runtime whose client does not declare ``supports_score_mods`` (True, or the ops that have
    them, e.g. ``("fwd",)``) runs plain calls only."""
    sup = getattr(rt.client, "supports_score_mods", False)
    if cfg.plain or sup is True or (not isinstance(sup, bool) and op in sup):
        return
    used = [name for name, on in (("cu_seqlens_q", cfg.ragged), ("window_left", cfg.window_left >= 0),
                                  ("softcap", cfg.softcap != 0.0), ("alibi_slopes", cfg.alibi_slopes is not None))
            if on]
    raise NotImplementedError(f"{', '.join(used)}: not yet on the {rt.name} runtime (use runtime='cuda')")


def _storage(x, dt: DType, rt):
    """Storage of ``x`` on ``rt`` (zero-copy for Tensors and contiguous NumPy arrays on cpu)."""
    if isinstance(x, Tensor):
        return x.storage
    arr = np.asarray(x)
    if arr.dtype != dt.storage:
        arr = arr.astype(dt.numpy, copy=False).view(dt.storage)
    return rt.from_host(np.ascontiguousarray(arr))


def _wrap(storage, dt: DType, rt, as_tensor: bool):
    if as_tensor:
        return Tensor(storage, dt, rt)
    host = storage if isinstance(storage, np.ndarray) else rt.to_host(storage)
    return from_storage(host, dt)
