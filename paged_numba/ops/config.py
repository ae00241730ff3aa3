"""PagedAttnConfig: every check of the attention ops (forward, FP8 forward, backward, plans), made
once, at the boundary (``write_kv``'s are in ``write_kv_config.py``, ``merge_state``'s in
``merge_config.py``, the argument checks they all share in ``checks.py``).

``fwd_config`` / ``fwd_fp8_config`` / ``bwd_config`` take the user's arguments (NumPy arrays or
Tensors, before anything is moved or run) and return a frozen ``PagedAttnConfig`` or raise
``ValueError`` / ``TypeError`` naming the argument, what was expected and what was given. Kernels
trust the config and never re-check. The block table and lengths are copied (int32, C-contiguous,
unread entries zeroed), so the caller's arrays are never modified and nothing is read out of bounds.

Symbols: B batch, H query heads, Hkv KV heads, Sq queries per sequence, D head_dim, N physical
blocks, bs block_size, M max blocks per sequence, T query tokens of a ragged batch.

Ragged batches (``cu_seqlens_q``, int [B + 1]): q is token-major [T, H, D], sequence b owns rows
``cu[b]:cu[b + 1]``. The config then carries per-sequence query starts / counts and a work list
built once per call: the sequences with 1..``DECODE_MAX_Q`` queries go to the decode path, longer
ones to the tiled path (sequences without queries to neither).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..dtypes import FP8_MAX, DType, fp8_dtype
from ..tensor import Tensor
from .checks import (FLOAT_TYPES, _as_int, _check_finite, _check_int_param, _check_lse, _dtype_name, _finite,
                     _float_dtype, _fp8_kv_dtype, _host_ints, _pool_shape, _positive_int, _shape_dtype)

_F32_MAX = float(np.finfo(np.float32).max)
DECODE_MAX_Q = 4     # a sequence with at most this many queries takes the decode path
PLAN_N = 2 ** 31 - 1  # a plan's pool size until it runs (entries are checked against N then)


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
    # Ragged batches and score modifiers (defaults: the dense [B, H, Sq, D] layout, plain scores).
    ragged: bool = False         # cu_seqlens_q given: q token-major [T, H, D]; Sq = max q_len
    T: int = 0                   # query tokens (ragged), B * Sq otherwise
    q_start: np.ndarray = None   # int32 [B]: first query token of sequence b (ragged: cu[b])
    q_lens: np.ndarray = None    # int32 [B]: queries of sequence b (dense: Sq each)
    decode_seqs: np.ndarray = None   # int32: sequences with 1..DECODE_MAX_Q queries (decode path)
    tiled_seqs: np.ndarray = None    # int32: sequences with more queries (tiled path)
    window_left: int = -1        # >= 0: query at p sees keys j >= p - window_left
    softcap: float = 0.0         # > 0: s = softcap * tanh(s / softcap) after the scale
    alibi_slopes: np.ndarray = None  # float32 [H]: s -= slope_h * |p - j| after the softcap

    @property
    def G(self) -> int:
        return self.H // self.Hkv

    @property
    def q_shape(self) -> tuple:
        """q, out, dout: [T, H, D] when ragged, else [B, H, Sq, D]; lse is ``q_shape[:-1]``."""
        return (self.T, self.H, self.D) if self.ragged else (self.B, self.H, self.Sq, self.D)

    @property
    def lse_shape(self) -> tuple:
        return self.q_shape[:-1]

    @property
    def score_mods(self) -> bool:
        """A window, softcap or ALiBi modifies the scores."""
        return self.window_left >= 0 or self.softcap != 0.0 or self.alibi_slopes is not None

    @property
    def plain(self) -> bool:
        """The dense layout with unmodified scores (no window, softcap or ALiBi)."""
        return not self.ragged and not self.score_mods

    def row_layout(self):
        """(row0 int32 [B], stride_h, stride_i): query i of sequence b, head h, is row
        ``row0[b] + h * stride_h + i * stride_i`` of q / out viewed as [rows, D] (lse: [rows])."""
        if self.ragged:
            return (self.q_start.astype(np.int64) * self.H).astype(np.int32), 1, self.H
        return (np.arange(self.B, dtype=np.int64) * self.H * self.Sq).astype(np.int32), self.Sq, 1

    def key_start(self) -> np.ndarray:
        """int64 [B]: the first key any query of sequence b can see (0 without a window)."""
        if self.window_left < 0:
            return np.zeros(self.B, np.int64)
        first = self.seq_lens.astype(np.int64) - self.q_lens
        return np.maximum(0, first - self.window_left)

    @property
    def max_span(self) -> int:
        """Most keys a sequence with queries can see: max over b of L_b - key_start(b)."""
        has = self.q_lens > 0
        if not has.any():
            return 0
        return int((self.seq_lens.astype(np.int64) - self.key_start())[has].max())

    @property
    def kv_shape(self) -> tuple:
        return (self.N, self.bs, self.Hkv, self.D)

    @property
    def max_len(self) -> int:
        return int(self.seq_lens.max()) if self.B else 0


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
    """(int32 table [B, M] with unread entries zeroed, int32 lens [B], M); ``N=None`` (a plan, whose
    pools come later) checks only that the entries read are not negative."""
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
    bad = used & ((bt < 0) | (bt >= N)) if N is not None else used & (bt < 0)
    if bad.any():
        b, j = (int(i) for i in np.argwhere(bad)[0])
        pool = f"the pool [0, {N})" if N is not None else "[0, N) (block ids are never negative)"
        raise ValueError(f"block_table[{b}, {j}] = {int(bt[b, j])} is outside {pool} "
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


def _window(window_left) -> int:
    if isinstance(window_left, (bool, np.bool_)) or not isinstance(window_left, numbers.Integral):
        raise TypeError(f"window_left: expected an int (-1 = no window), got {type(window_left).__name__}")
    w = int(window_left)
    if w < -1:
        raise ValueError(f"window_left: expected -1 (no window) or an int >= 0, got {w}")
    if w >= 2 ** 31 - 1:        # as wide as any length the kernels index: no window
        return -1
    return w


def _softcap(softcap) -> float:
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a real number (0 = none), got {type(softcap).__name__}")
    c = float(softcap)
    if not math.isfinite(c) or c < 0.0:
        raise ValueError(f"softcap: expected a finite number >= 0 (0 = none), got {c}")
    if c != 0.0 and not (np.float32(c) > 0 and np.isfinite(np.float32(c))):
        raise ValueError(f"softcap: expected a float32-representable number > 0, got {c:g}")
    return c


def _alibi(slopes, H):
    if slopes is None:
        return None
    if isinstance(slopes, Tensor):
        arr = slopes.numpy()
    elif isinstance(slopes, (list, tuple)):
        if not all(isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) for x in slopes):
            raise TypeError("alibi_slopes: expected float32 [H] (an array, or a list of numbers)")
        arr = np.asarray(slopes, np.float32)
    elif isinstance(slopes, np.ndarray):
        arr = slopes
    else:
        raise TypeError(f"alibi_slopes: expected a float32 array [H], got {type(slopes).__name__}")
    if arr.dtype != np.float32:
        raise TypeError(f"alibi_slopes: expected dtype float32, got {arr.dtype}")
    if arr.shape != (H,):
        raise ValueError(f"alibi_slopes: expected shape [H={H}] (one slope per query head), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("alibi_slopes: expected finite slopes, got inf or NaN")
    return np.ascontiguousarray(arr, np.float32).copy()


def _ragged_q(q, cu_seqlens_q, seq_lens):
    """((T, H, D), cu int64 [B + 1]) of a token-major q and its offsets, or ValueError."""
    qs, _, _ = _shape_dtype(q, "q")
    if len(qs) != 3:
        raise ValueError(f"q: expected 3-D token-major [T, H, D] with cu_seqlens_q, got {len(qs)}-D shape {qs}")
    if seq_lens is None:
        raise ValueError("seq_lens: required with cu_seqlens_q (the key length of each sequence)")
    cu = _host_ints(cu_seqlens_q, "cu_seqlens_q")
    if cu.ndim != 1 or cu.size < 1:
        raise ValueError(f"cu_seqlens_q: expected 1-D [B + 1], got shape {cu.shape}")
    cu = cu.astype(np.int64)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens_q: expected cu_seqlens_q[0] = 0, got {int(cu[0])}")
    dec = np.flatnonzero(np.diff(cu) < 0)
    if dec.size:
        b = int(dec[0])
        raise ValueError(f"cu_seqlens_q: expected non-decreasing offsets, got cu_seqlens_q[{b}] = {int(cu[b])} "
                         f"> cu_seqlens_q[{b + 1}] = {int(cu[b + 1])}")
    if int(cu[-1]) != qs[0]:
        raise ValueError(f"cu_seqlens_q: the last offset {int(cu[-1])} must equal q's token count T = {qs[0]} "
                         f"(q shape {qs})")
    return qs, cu


def _common(q, k_blocks, v_blocks, block_table, params, seq_len_k, causal, seq_lens, scale,
            cu_seqlens_q=None, window_left=-1, softcap=0.0, alibi_slopes=None, plan=False):
    cu = None
    if cu_seqlens_q is not None:
        (T, H, D), cu = _ragged_q(q, cu_seqlens_q, seq_lens)
        if cu.size - 1 != _host_ints(block_table, "block_table").shape[0]:
            bt_shape = _host_ints(block_table, "block_table").shape
            raise ValueError(f"cu_seqlens_q: expected [B + 1] = [{bt_shape[0] + 1}] (block_table has B = "
                             f"{bt_shape[0]} rows), got shape {(cu.size,)}")
        qlens = np.diff(cu)
        Sq = int(qlens.max(initial=0))
        B = cu.size - 1
        _, _, _, _, n_pool, bs, Hkv, kv_3d = _qkv_shapes(_Shape((B, H, Sq, D)), k_blocks, v_blocks)
    else:
        B, H, Sq, D, n_pool, bs, Hkv, kv_3d = _qkv_shapes(q, k_blocks, v_blocks)
        T = B * Sq
        qlens = np.full(B, Sq, np.int64)
    N = None if plan else n_pool      # a plan: entries are checked against the pool when it runs
    _check_params(params, H, Hkv, Sq, D, bs)
    causal = _check_causal(causal)
    scale = 1.0 / math.sqrt(D) if scale is None else _finite(scale, "scale")
    if not abs(scale) <= _F32_MAX:
        raise ValueError(f"scale: expected a float32-representable number (|scale| <= {_F32_MAX:.4g}), got {scale:g}")
    window_left = _window(window_left)
    softcap = _softcap(softcap)
    slopes = _alibi(alibi_slopes, H)
    table, lens, M = _table_and_lens(block_table, seq_lens, seq_len_k, B, N, bs)
    if N is None:
        N = PLAN_N
    if cu is not None:
        over = np.flatnonzero(qlens > lens)
        if over.size:
            b = int(over[0])
            raise ValueError(f"cu_seqlens_q: sequence {b} has {int(qlens[b])} queries but seq_lens[{b}] = "
                             f"{int(lens[b])} keys (each q_len must be <= its seq_len: the queries are the "
                             "last tokens of the sequence)")
        q_start = cu[:-1].astype(np.int32)
    else:
        q_start = (np.arange(B, dtype=np.int64) * Sq).astype(np.int32)
    has = qlens > 0
    decode = has & (qlens <= DECODE_MAX_Q)
    return dict(B=B, H=H, Hkv=Hkv, Sq=Sq, D=D, N=N, bs=bs, M=M, causal=causal, scale=scale,
                kv_3d=kv_3d, block_table=table, seq_lens=lens, ragged=cu is not None, T=int(T),
                q_start=q_start, q_lens=qlens.astype(np.int32),
                decode_seqs=np.flatnonzero(decode).astype(np.int32),
                tiled_seqs=np.flatnonzero(has & ~decode).astype(np.int32),
                window_left=window_left, softcap=softcap, alibi_slopes=slopes)


class _Shape:
    """Stands in for q in the pool checks of a ragged call (only its shape is read)."""

    def __init__(self, shape):
        self.shape = shape
        self.dtype = np.float32


# ------------------------------------------------------------------------------ entry points

def fwd_dtypes(q, k_blocks, v_blocks) -> tuple:
    """(q dtype, kv dtype) of ``paged_attention_fwd``: all F32, all F16 or all BF16."""
    qd = _float_dtype(q, "q")
    kd = _float_dtype(k_blocks, "k_blocks")
    vd = _float_dtype(v_blocks, "v_blocks")
    for name, dt in (("k_blocks", kd), ("v_blocks", vd)):
        if dt != qd:
            raise TypeError(f"{name}: expected q's dtype {qd.value}, got {dt.value} "
                            "(mixed dtypes are not supported; cast one side)")
    return qd, kd


def fwd_config(q, k_blocks, v_blocks, block_table, num_heads=None, num_kv_heads=None,
               seq_len_q=None, seq_len_k=None, head_dim=None, block_size=None, causal=False,
               *, seq_lens=None, scale=None, cu_seqlens_q=None, window_left=-1, softcap=0.0,
               alibi_slopes=None) -> PagedAttnConfig:
    """Config of ``paged_attention_fwd``: q, k_blocks, v_blocks all F32, all F16 or all BF16."""
    qd, kd = fwd_dtypes(q, k_blocks, v_blocks)
    mods = dict(cu_seqlens_q=cu_seqlens_q, window_left=window_left, softcap=softcap, alibi_slopes=alibi_slopes)
    fields = _common(q, k_blocks, v_blocks, block_table,
                     (num_heads, num_kv_heads, seq_len_q, head_dim, block_size),
                     seq_len_k, causal, seq_lens, scale, **mods)
    _check_finite(q, qd, "q")
    return PagedAttnConfig(q_dtype=qd, kv_dtype=kd, **fields)


def fp8_dtypes(q, k_blocks, v_blocks, fp8_format=None) -> tuple:
    """(q dtype, kv dtype) of ``paged_attention_fwd_fp8``: FP8 K/V of one format; q FP8 of it, or
    F32 / F16 / BF16."""
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
    return qd, kd


def fp8_scales(q_scale=1.0, k_scale=1.0, v_scale=1.0, o_scale=1.0) -> dict:
    """The FP8 op's dequantization scales, each a finite number > 0."""
    return {n: _finite(s, n, positive=True) for n, s in
            (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale), ("o_scale", o_scale))}


def fwd_fp8_config(q, k_blocks, v_blocks, block_table, num_heads=None, num_kv_heads=None,
                   seq_len_q=None, seq_len_k=None, head_dim=None, block_size=None, causal=False,
                   q_scale=1.0, k_scale=1.0, v_scale=1.0, o_scale=1.0,
                   *, seq_lens=None, scale=None, fp8_format=None, cu_seqlens_q=None, window_left=-1,
                   softcap=0.0, alibi_slopes=None) -> PagedAttnConfig:
    """Config of ``paged_attention_fwd_fp8``: FP8 K/V of one format; q FP8 of it, or F32/F16/BF16."""
    qd, kd = fp8_dtypes(q, k_blocks, v_blocks, fp8_format)
    scales = fp8_scales(q_scale, k_scale, v_scale, o_scale)
    fields = _common(q, k_blocks, v_blocks, block_table,
                     (num_heads, num_kv_heads, seq_len_q, head_dim, block_size),
                     seq_len_k, causal, seq_lens, scale, cu_seqlens_q=cu_seqlens_q,
                     window_left=window_left, softcap=softcap, alibi_slopes=alibi_slopes)
    _check_finite(q, qd, "q")
    return PagedAttnConfig(q_dtype=qd, kv_dtype=kd, **fields, **scales)


def bwd_arrays(cfg, dout, output, lse) -> None:
    """The backward's own checks: dout / output like q, lse float32 [B, H, Sq] ([T, H] when ragged)."""
    for name, x in (("dout", dout), ("output", output)):
        shape, dt, npdt = _shape_dtype(x, name)
        if shape != cfg.q_shape:
            raise ValueError(f"{name}: expected q's shape {cfg.q_shape}, got {shape}")
        if dt != cfg.q_dtype:
            raise TypeError(f"{name}: expected q's dtype {cfg.q_dtype.value}, got {_dtype_name(dt, npdt)}")
    shape, dt, npdt = _shape_dtype(lse, "lse")
    if shape != cfg.lse_shape:
        what = "[T, H]" if cfg.ragged else "[B, H, Sq]"
        raise ValueError(f"lse: expected shape {what} = {cfg.lse_shape}, got {shape}")
    if dt != DType.F32:
        raise TypeError(f"lse: expected dtype f32 (as the forward returns it), got {_dtype_name(dt, npdt)}")
    _check_lse(lse, DType.F32)


def bwd_config(dout, q, k_blocks, v_blocks, output, lse, block_table, num_heads=None,
               num_kv_heads=None, seq_len_q=None, seq_len_k=None, head_dim=None, block_size=None,
               causal=False, *, seq_lens=None, scale=None, cu_seqlens_q=None, window_left=-1,
               softcap=0.0, alibi_slopes=None) -> PagedAttnConfig:
    """Config of ``paged_attention_bwd``: the forward's checks, plus dout / output like q and
    lse float32 [B, H, Sq] ([T, H] when ragged)."""
    cfg = fwd_config(q, k_blocks, v_blocks, block_table, num_heads, num_kv_heads, seq_len_q,
                     seq_len_k, head_dim, block_size, causal, seq_lens=seq_lens, scale=scale,
                     cu_seqlens_q=cu_seqlens_q, window_left=window_left, softcap=softcap,
                     alibi_slopes=alibi_slopes)
    bwd_arrays(cfg, dout, output, lse)
    return cfg


# ------------------------------------------------------------------------------ plans

def plan_config(block_table, seq_lens=None, *, num_heads, num_kv_heads, head_dim, block_size, q_len=1,
                causal=False, scale=None, cu_seqlens_q=None, window_left=-1, softcap=0.0,
                alibi_slopes=None) -> PagedAttnConfig:
    """The config of a plan (``pn.plan_attention``): every check of the ops that does not need the
    data -- the table's entries are checked against the pool size N when the plan runs, so the
    config's ``N`` is ``PLAN_N`` (no pool yet) and its dtypes are placeholders (F32)."""
    H = _positive_int(num_heads, "num_heads")
    Hkv = _positive_int(num_kv_heads, "num_kv_heads")
    D = _positive_int(head_dim, "head_dim")
    bs = _positive_int(block_size, "block_size")
    if H % Hkv != 0:
        raise ValueError(f"num_heads {H} must be a multiple of num_kv_heads {Hkv}")
    bt = _host_ints(block_table, "block_table")
    if bt.ndim != 2:
        raise ValueError(f"block_table: expected 2-D [B, M], got shape {bt.shape}")
    B = bt.shape[0]
    pools = _Shape((PLAN_N, bs, Hkv, D))
    if cu_seqlens_q is not None:
        if q_len != 1:
            raise ValueError(f"q_len: leave it at 1 with cu_seqlens_q (the offsets give each sequence's "
                             f"queries), got {q_len}")
        cu = _host_ints(cu_seqlens_q, "cu_seqlens_q")
        T = int(cu[-1]) if cu.ndim == 1 and cu.size else 0
        q = _Shape((T, H, D))
    else:
        q = _Shape((B, H, _positive_int(q_len, "q_len", minimum=0), D))
    fields = _common(q, pools, pools, block_table, (None,) * 5, None, causal, seq_lens, scale,
                     cu_seqlens_q=cu_seqlens_q, window_left=window_left, softcap=softcap,
                     alibi_slopes=alibi_slopes, plan=True)
    return PagedAttnConfig(q_dtype=DType.F32, kv_dtype=DType.F32, **fields)


def plan_q(cfg, x, name="q") -> None:
    """A run's q (or dout / output) against the plan's shape."""
    shape, _, _ = _shape_dtype(x, name)
    if tuple(shape) != cfg.q_shape:
        what = "[T, H, D]" if cfg.ragged else "[B, H, Sq, D]"
        raise ValueError(f"{name}: expected the plan's shape {what} = {cfg.q_shape}, got {tuple(shape)}")


def plan_pools(cfg, k_blocks, v_blocks) -> tuple:
    """(N, kv_3d) of a run's pools, checked against the plan's block size, KV heads and head dim."""
    ks = _pool_shape(k_blocks, v_blocks)
    got = (ks[1], 1, ks[2]) if len(ks) == 3 else tuple(ks[1:])
    if got != (cfg.bs, cfg.Hkv, cfg.D):
        alt = " (or [N, bs, D])" if cfg.Hkv == 1 else ""
        raise ValueError(f"k_blocks: expected the plan's [N, bs={cfg.bs}, Hkv={cfg.Hkv}, D={cfg.D}]{alt}, "
                         f"got shape {tuple(ks)}")
    return int(ks[0]), len(ks) == 3


def max_block_read(cfg) -> int:
    """The largest physical block id the config's sequences read (-1 when none is read)."""
    nblk = (cfg.seq_lens.astype(np.int64) + cfg.bs - 1) // cfg.bs
    used = np.arange(cfg.M)[None, :] < nblk[:, None]
    return int(cfg.block_table[used].max()) if used.any() else -1


def first_block_outside(cfg, N: int) -> str:
    """The error message of the ops for the first table entry read that is >= N (row-major)."""
    nblk = (cfg.seq_lens.astype(np.int64) + cfg.bs - 1) // cfg.bs
    used = np.arange(cfg.M)[None, :] < nblk[:, None]
    b, j = (int(i) for i in np.argwhere(used & (cfg.block_table >= N))[0])
    return (f"block_table[{b}, {j}] = {int(cfg.block_table[b, j])} is outside the pool [0, {N}) "
            f"(sequence {b} has {int(cfg.seq_lens[b])} tokens, so logical block {j} is read)")


__all__ = ["DECODE_MAX_Q", "FP8_MAX", "PLAN_N", "PagedAttnConfig", "bwd_arrays", "bwd_config", "first_block_outside",
           "fp8_dtypes", "fp8_scales", "fwd_config", "fwd_dtypes", "fwd_fp8_config", "max_block_read", "plan_config",
           "plan_pools", "plan_q"]
