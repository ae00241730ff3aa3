"""PagedAttnConfig: every check of SPEC.md, made once, at the boundary.

``fwd_config`` / ``fwd_fp8_config`` / ``bwd_config`` take the user's arguments (NumPy arrays or
Tensors, before anything is moved or run) and return a frozen ``PagedAttnConfig`` or raise
``ValueError`` / ``TypeError`` naming the argument, what was expected and what was given. Kernels
trust the config and never re-check. The block table and lengths are copied (int32, C-contiguous,
unread entries zeroed), so the caller's arrays are never modified and nothing is read out of bounds.

Symbols: B batch, H query heads, Hkv KV heads, Sq queries per sequence, D head_dim, N physical
blocks, bs block_size, M max blocks per sequence.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..dtypes import FP8_MAX, DType, fp8_dtype, from_numpy_dtype
from ..tensor import Tensor

FLOAT_TYPES = (DType.F32, DType.F16, DType.BF16)
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True, eq=False)
class PagedAttnConfig:
    B: int
    H: int
    Hkv: int
    Sq: int
    D: int
    N: int
    bs: int
    M: int
    causal: bool
    scale: float
    q_dtype: DType
    kv_dtype: DType
    kv_3d: bool                  # k_blocks / v_blocks were given as [N, bs, D]
    block_table: np.ndarray      # int32 [B, M], entries past each sequence's length zeroed
    seq_lens: np.ndarray         # int32 [B]
    q_scale: float = 1.0
    k_scale: float = 1.0
    v_scale: float = 1.0
    o_scale: float = 1.0

    @property
    def G(self) -> int:
        return self.H // self.Hkv

    @property
    def q_shape(self) -> tuple:
        return (self.B, self.H, self.Sq, self.D)

    @property
    def kv_shape(self) -> tuple:
        return (self.N, self.bs, self.Hkv, self.D)

    @property
    def max_len(self) -> int:
        return int(self.seq_lens.max()) if self.B else 0


# ----------------------------------------------------------------------------------- helpers

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


def _qkv_shapes(q, k_blocks, v_blocks):
    """(B, H, Sq, D, N, bs, Hkv, kv_3d) from q and the pools, or ValueError."""
    qs, _, _ = _shape_dtype(q, "q")
    if len(qs) != 4:
        raise ValueError(f"q: expected 4-D [B, H, Sq, D], got {len(qs)}-D shape {qs}")
    B, H, Sq, D = qs
    ks = _pool_shape(k_blocks, v_blocks)
    kv_3d = len(ks) == 3
    N, bs = ks[0], ks[1]
    Hkv = 1 if kv_3d else ks[2]
    if ks[-1] != D:
        raise ValueError(f"k_blocks: head_dim (last axis) {ks[-1]} disagrees with q's head_dim {D}")
    if D < 1:
        raise ValueError(f"q: head_dim must be >= 1, got shape {qs}")
    if bs < 1:
        raise ValueError(f"k_blocks: block_size (axis 1) must be >= 1, got shape {ks}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"num_heads {H} (q axis 1) must be a multiple of num_kv_heads {Hkv} "
                         f"(k_blocks axis 2)")
    return B, H, Sq, D, N, bs, Hkv, kv_3d


def _table_and_lens(block_table, seq_lens, seq_len_k, B, N, bs):
    bt = _host_ints(block_table, "block_table")
    if bt.ndim != 2 or bt.shape[0] != B:
        raise ValueError(f"block_table: expected 2-D [B={B}, M], got shape {bt.shape}")
    M = bt.shape[1]
    cap = M * bs
    if seq_len_k is not None:
        seq_len_k = _as_int(seq_len_k, "seq_len_k")
        if not 0 <= seq_len_k <= cap:
            raise ValueError(f"seq_len_k={seq_len_k} is outside [0, M * block_size = {cap}]")
    if seq_lens is not None:
        sl = _host_ints(seq_lens, "seq_lens")
        if sl.shape != (B,):
            raise ValueError(f"seq_lens: expected 1-D [B={B}], got shape {sl.shape}")
        limit = cap if seq_len_k is None else seq_len_k
        what = f"M * block_size = {cap}" if seq_len_k is None else f"seq_len_k = {seq_len_k}"
        bad = np.flatnonzero((sl < 0) | (sl > limit))
        if bad.size:
            b = int(bad[0])
            raise ValueError(f"seq_lens[{b}] = {int(sl[b])} is outside [0, {what}]")
        lens = sl.astype(np.int32)
    else:
        lens = np.full(B, cap if seq_len_k is None else seq_len_k, np.int32)
    nblk = (lens.astype(np.int64) + bs - 1) // bs
    used = np.arange(M)[None, :] < nblk[:, None]
    bad = used & ((bt < 0) | (bt >= N))
    if bad.any():
        b, j = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(bt[b, j])} is outside the pool [0, {N}) "
                         f"(sequence {b} has {int(lens[b])} tokens, so logical block {j} is read)")
    table = np.where(used, bt, 0).astype(np.int32)
    return np.ascontiguousarray(table), lens, M


def _check_params(params, H, Hkv, Sq, D, bs):
    num_heads, num_kv_heads, seq_len_q, head_dim, block_size = params
    _check_int_param(num_heads, "num_heads", H, "q.shape[1]")
    _check_int_param(num_kv_heads, "num_kv_heads", Hkv, "k_blocks' kv-head axis")
    _check_int_param(seq_len_q, "seq_len_q", Sq, "q.shape[2]")
    _check_int_param(head_dim, "head_dim", D, "q.shape[3]")
    _check_int_param(block_size, "block_size", bs, "k_blocks.shape[1]")


def _check_causal(causal) -> bool:
    if not isinstance(causal, (bool, np.bool_, numbers.Integral)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    return bool(causal)


def _common(q, k_blocks, v_blocks, block_table, params, seq_len_k, causal, seq_lens, scale):
    B, H, Sq, D, N, bs, Hkv, kv_3d = _qkv_shapes(q, k_blocks, v_blocks)
    _check_params(params, H, Hkv, Sq, D, bs)
    causal = _check_causal(causal)
    scale = 1.0 / math.sqrt(D) if scale is None else _finite(scale, "scale")
    if not abs(scale) <= _F32_MAX:
        raise ValueError(f"scale: expected a float32-representable number (|scale| <= {_F32_MAX:.4g}), got {scale:g}")
    table, lens, M = _table_and_lens(block_table, seq_lens, seq_len_k, B, N, bs)
    return dict(B=B, H=H, Hkv=Hkv, Sq=Sq, D=D, N=N, bs=bs, M=M, causal=causal, scale=scale,
                kv_3d=kv_3d, block_table=table, seq_lens=lens)


# ------------------------------------------------------------------------------ entry points

def fwd_config(q, k_blocks, v_blocks, block_table, num_heads=None, num_kv_heads=None,
               seq_len_q=None, seq_len_k=None, head_dim=None, block_size=None, causal=False,
               *, seq_lens=None, scale=None) -> PagedAttnConfig:
    """Config of ``paged_attention_fwd``: q, k_blocks, v_blocks all F32, all F16 or all BF16."""
    qd = _float_dtype(q, "q")
    kd = _float_dtype(k_blocks, "k_blocks")
    vd = _float_dtype(v_blocks, "v_blocks")
    for name, dt in (("k_blocks", kd), ("v_blocks", vd)):
        if dt != qd:
            raise TypeError(f"{name}: expected q's dtype {qd.value}, got {dt.value} "
                            "(mixed dtypes are not supported; cast one side)")
    fields = _common(q, k_blocks, v_blocks, block_table,
                     (num_heads, num_kv_heads, seq_len_q, head_dim, block_size),
                     seq_len_k, causal, seq_lens, scale)
    return PagedAttnConfig(q_dtype=qd, kv_dtype=kd, **fields)


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


def fwd_fp8_config(q, k_blocks, v_blocks, block_table, num_heads=None, num_kv_heads=None,
                   seq_len_q=None, seq_len_k=None, head_dim=None, block_size=None, causal=False,
                   q_scale=1.0, k_scale=1.0, v_scale=1.0, o_scale=1.0,
                   *, seq_lens=None, scale=None, fp8_format=None) -> PagedAttnConfig:
    """Config of ``paged_attention_fwd_fp8``: FP8 K/V of one format; q FP8 of it, or F32/F16/BF16."""
    fmt = None if fp8_format is None else fp8_dtype(fp8_format)
    kd = _fp8_kv_dtype(k_blocks, "k_blocks", fmt)
    vd = _fp8_kv_dtype(v_blocks, "v_blocks", fmt)
    if vd != kd:
        raise TypeError(f"v_blocks: expected k_blocks' format {kd.value}, got {vd.value}")
    _, qdt, qnp = _shape_dtype(q, "q")
    if qdt in FLOAT_TYPES:
        qd = qdt
    elif (qdt is not None and qdt.is_fp8) or qnp == np.uint8:
        if qdt is not None and qdt != kd:
            raise TypeError(f"q: FP8 q must have k_blocks' format {kd.value}, got {qdt.value}")
        qd = kd
    else:
        raise TypeError(f"q: expected f32, f16, bf16 or {kd.value}, got {_dtype_name(qdt, qnp)}")
    scales = {n: _finite(s, n, positive=True) for n, s in
              (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale), ("o_scale", o_scale))}
    fields = _common(q, k_blocks, v_blocks, block_table,
                     (num_heads, num_kv_heads, seq_len_q, head_dim, block_size),
                     seq_len_k, causal, seq_lens, scale)
    return PagedAttnConfig(q_dtype=qd, kv_dtype=kd, **fields, **scales)


def bwd_config(dout, q, k_blocks, v_blocks, output, lse, block_table, num_heads=None,
               num_kv_heads=None, seq_len_q=None, seq_len_k=None, head_dim=None, block_size=None,
               causal=False, *, seq_lens=None, scale=None) -> PagedAttnConfig:
    """Config of ``paged_attention_bwd``: the forward's checks, plus dout / output like q and
    lse float32 [B, H, Sq]."""
    cfg = fwd_config(q, k_blocks, v_blocks, block_table, num_heads, num_kv_heads, seq_len_q,
                     seq_len_k, head_dim, block_size, causal, seq_lens=seq_lens, scale=scale)
    for name, x in (("dout", dout), ("output", output)):
        shape, dt, npdt = _shape_dtype(x, name)
        if shape != cfg.q_shape:
            raise ValueError(f"{name}: expected q's shape {cfg.q_shape}, got {shape}")
        if dt != cfg.q_dtype:
            raise TypeError(f"{name}: expected q's dtype {cfg.q_dtype.value}, got {_dtype_name(dt, npdt)}")
    shape, dt, npdt = _shape_dtype(lse, "lse")
    if shape != cfg.q_shape[:3]:
        raise ValueError(f"lse: expected shape [B, H, Sq] = {cfg.q_shape[:3]}, got {shape}")
    if dt != DType.F32:
        raise TypeError(f"lse: expected dtype f32 (as the forward returns it), got {_dtype_name(dt, npdt)}")
    return cfg


# ------------------------------------------------------------------------------ write_kv

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


def _same_memory(a, b) -> bool:
    a = a.storage if isinstance(a, Tensor) else a
    b = b.storage if isinstance(b, Tensor) else b
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.may_share_memory(a, b)
    return a is b


__all__ = ["FP8_MAX", "PagedAttnConfig", "WriteKVConfig", "bwd_config", "fwd_config", "fwd_fp8_config",
           "write_kv_config"]
