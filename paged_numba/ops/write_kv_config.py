"""WriteKVConfig: the checks of ``write_kv`` (pools written in place, the new rows, slot_mapping,
FP8 scales), made once before any kernel runs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..dtypes import DType, fp8_dtype
from ..tensor import Tensor
from .checks import (FLOAT_TYPES, _dtype_name, _finite, _fp8_kv_dtype, _host_ints, _pool_shape, _same_memory,
                     _shape_dtype)


@dataclass(frozen=True, eq=False)
class WriteKVConfig:
    """A validated ``write_kv`` call: pools [N, bs, Hkv, D], new rows [T, Hkv, D]."""
    N: int
    bs: int
    Hkv: int
    D: int
    T: int
    kv_3d: bool                  # the pools were given as [N, bs, D]
    pool_dtype: DType
    src_dtype: DType             # k / v: the pool's dtype, or F32 / F16 / BF16 for FP8 pools
    slots: np.ndarray            # int64 [T], each < N * bs; negative = skipped; no duplicates
    k_scale: float = 1.0         # float32-representable, > 0; 1.0 for float pools
    v_scale: float = 1.0

    @property
    def pool_shape(self) -> tuple:
        return (self.N, self.bs, self.Hkv, self.D)

    @property
    def src_shape(self) -> tuple:
        return (self.T, self.Hkv, self.D)

    @property
    def n_written(self) -> int:
        return int((self.slots >= 0).sum())


def _pool_dtype(x, name, fmt) -> DType:
    _, dt, npdt = _shape_dtype(x, name)
    if dt in FLOAT_TYPES:
        if fmt is not None:
            raise TypeError(f"{name}: dtype {dt.value} is not FP8, but fp8_format={fmt.value} was given")
        return dt
    if (dt is not None and dt.is_fp8) or npdt == np.uint8:
        return _fp8_kv_dtype(x, name, fmt)
    hint = "; float64 is not supported, cast with .astype(np.float32)" if npdt == np.float64 else ""
    raise TypeError(f"{name}: expected dtype f32, f16, bf16, fp8_e4m3 or fp8_e5m2, got "
                    f"{_dtype_name(dt, npdt)}{hint}")


def _writable_pool(x, name):
    """A pool is written in place: a Tensor, or a writable C-contiguous NumPy array."""
    if isinstance(x, Tensor):
        return
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array or pn.Tensor (written in place), got {type(x).__name__}")
    if not x.flags.writeable:
        raise ValueError(f"{name}: the array is read-only, but write_kv writes into it in place")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array (written in place), got strides {x.strides}; "
                         "use np.ascontiguousarray and keep the result")


def _pool_scale(value, name, dt: DType) -> float:
    value = _finite(value, name, positive=True)
    if not dt.is_fp8:
        if value != 1.0:
            raise ValueError(f"{name}: scales apply to FP8 pools only; got {value:g} for a {dt.value} pool")
        return 1.0
    f = np.float32(value)
    if not (0.0 < f < np.inf):
        raise ValueError(f"{name}: expected a float32-representable number > 0, got {value:g}")
    return float(f)


def write_kv_config(k_blocks, v_blocks, k, v, slot_mapping, *, k_scale=1.0, v_scale=1.0,
                    fp8_format=None) -> WriteKVConfig:
    """Config of ``write_kv``: pools [N, bs, Hkv, D] (or [N, bs, D]) of one dtype, written in place;
    k, v [T, Hkv, D] (or [T, D]) in the pool's dtype (FP8 pools: F32 / F16 / BF16, quantized as
    value / scale); slot_mapping int [T], each slot < N * bs, negative = skip, no slot twice."""
    fmt = None if fp8_format is None else fp8_dtype(fp8_format)
    for name, x in (("k_blocks", k_blocks), ("v_blocks", v_blocks)):
        _writable_pool(x, name)
    pd = _pool_dtype(k_blocks, "k_blocks", fmt)
    vd = _pool_dtype(v_blocks, "v_blocks", fmt)
    if vd != pd:
        raise TypeError(f"v_blocks: expected k_blocks' dtype {pd.value}, got {vd.value}")
    ks = _pool_shape(k_blocks, v_blocks)
    if k_blocks is v_blocks or _same_memory(k_blocks, v_blocks):
        raise ValueError("v_blocks: shares memory with k_blocks; K and V need pools of their own")
    kv_3d = len(ks) == 3
    N, bs, D = ks[0], ks[1], ks[-1]
    Hkv = 1 if kv_3d else ks[2]
    what = "[T, D]" if kv_3d else f"[T, Hkv={Hkv}, D={D}]"
    rs, rdt, rnp = _shape_dtype(k, "k")
    if len(rs) != len(ks) - 1 or tuple(rs[1:]) != tuple(ks[2:]):
        raise ValueError(f"k: expected {what} (the pool's trailing axes {tuple(ks[2:])}), got shape {tuple(rs)}")
    T = rs[0]
    vrs, vdt, vnp = _shape_dtype(v, "v")
    if tuple(vrs) != tuple(rs):
        raise ValueError(f"v: expected k's shape {tuple(rs)}, got {tuple(vrs)}")
    for name, dt, npdt in (("k", rdt, rnp), ("v", vdt, vnp)):
        if pd.is_fp8:
            if dt not in FLOAT_TYPES:
                hint = "; float64 is not supported, cast with .astype(np.float32)" if npdt == np.float64 else ""
                raise TypeError(f"{name}: expected f32, f16 or bf16 values to quantize into the {pd.value} pool, "
                                f"got {_dtype_name(dt, npdt)}{hint}")
        elif dt != pd:
            raise TypeError(f"{name}: expected the pool's dtype {pd.value}, got {_dtype_name(dt, npdt)} "
                            f"(cast with .astype(...) first)")
    src = rdt if pd.is_fp8 else pd
    if vdt != rdt:
        raise TypeError(f"v: expected k's dtype {rdt.value}, got {_dtype_name(vdt, vnp)}")
    sm = _host_ints(slot_mapping, "slot_mapping")
    if sm.shape != (T,):
        raise ValueError(f"slot_mapping: expected 1-D [T={T}] (one slot per row of k), got shape {sm.shape}")
    slots = np.array(sm, dtype=np.int64)
    cap = N * bs
    bad = np.flatnonzero(slots >= cap)
    if bad.size:
        t = int(bad[0])
        raise ValueError(f"slot_mapping[{t}] = {int(sm[t])} is outside the pool's slots [0, {cap}) "
                         f"({N} blocks x block_size {bs}); negative slots are skipped")
    valid = np.flatnonzero(slots >= 0)
    order = valid[np.argsort(slots[valid], kind="stable")]
    dup = np.flatnonzero(slots[order[1:]] == slots[order[:-1]])
    if dup.size:
        i, j = sorted((int(order[dup[0]]), int(order[dup[0] + 1])))
        raise ValueError(f"slot_mapping[{i}] and slot_mapping[{j}] are both {int(sm[i])}: a slot may be "
                         "written once per call")
    return WriteKVConfig(N=N, bs=bs, Hkv=Hkv, D=D, T=T, kv_3d=kv_3d, pool_dtype=pd, src_dtype=src,
                         slots=slots, k_scale=_pool_scale(k_scale, "k_scale", pd),
                         v_scale=_pool_scale(v_scale, "v_scale", pd))


__all__ = ["WriteKVConfig", "write_kv_config"]
