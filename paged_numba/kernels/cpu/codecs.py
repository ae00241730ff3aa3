"""Element codecs on the CPU: storage bits -> float32 inside the kernels, and whole-array
float32 <-> storage conversions for the client. The same meaning as ``kernels/cuda/codecs.py``.

Kernels see storage integers (F16 / BF16 as ``uint16``, FP8 as ``uint8``; numba's CPU target has
no float16) and decode them here. The in-kernel decoders take a DType code (``dtypes.F32`` ...)
that the calling kernel holds as a compile-time constant (a factory closure value), so numba's
dead-branch pruning keeps one branch: a kernel compiles only its own dtypes' decoders.

DType codes: 0 F32 (float32 storage), 1 F16 and 2 BF16 (uint16), 3 FP8 E4M3 and 4 FP8 E5M2 (uint8).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ...dtypes import (BF16, E4M3, E5M2, F16, F32, DType, decode_table, fp8_encode_bits,
                       fp8_params, from_storage)
from . import FASTMATH
from .launch import launch


# ------------------------------------------------------------------------- in-kernel decoders
@intrinsic
def half_to_f32(typingctx, h):
    """float32 of the IEEE half whose bits are the uint16 ``h`` (vectorizes to vcvtph2ps)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def as_float32(typingctx, x):
    """The float32 whose bits are the int32 ``x``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def fp8_value(c, code):
    """float32 of the FP8 code ``c`` (uint32) of format ``code`` (E4M3 / E5M2) through IEEE half,
    branch-free so loops vectorize. E5M2 is the top byte of a half. E4M3's bits moved into half
    position give a half 2**8 too small (exact for subnormals too, which become normal halves);
    S.1111.111 (E4M3's only NaN) gets the half exponent 11111 added, so it stays a NaN with its
    sign."""
    if code == E4M3:
        em = c & np.uint32(0x7F)
        nan = (em + np.uint32(1)) >> np.uint32(7)   # 1 only for em == 0x7F
        h = ((c & np.uint32(0x80)) << np.uint32(8)) | (em << np.uint32(7)) | (nan * np.uint32(0x7C00))
        return half_to_f32(np.uint16(h)) * np.float32(256.0)
    return half_to_f32(np.uint16(c << np.uint32(8)))


# Per-dtype loops (ordinary compiled functions: each compiles once per signature, is cached on
# disk on its own and shared by every kernel that calls it), and two small ``inline="always"``
# dispatchers whose branches the calling kernel prunes to one call.

@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _row_f32(src, n, dst):
    for i in range(n):
        dst[i] = src[i]


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _row_bf16(src, n, dst):
    bits = dst.view(np.uint32)
    for i in range(n):
        bits[i] = np.uint32(src[i]) << np.uint32(16)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _row_f16(src, n, dst):
    for i in range(n):
        dst[i] = half_to_f32(np.uint16(src[i]))


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _row_e4m3(src, n, dst):
    for i in range(n):
        dst[i] = fp8_value(np.uint32(src[i]), E4M3)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _row_e5m2(src, n, dst):
    for i in range(n):
        dst[i] = fp8_value(np.uint32(src[i]), E5M2)


@njit(inline="always", cache=True)
def load_row(src, n, dst, code):
    """``dst[:n]`` = float32 values of the first ``n`` elements of ``src``.

    Parameters
    ----------
    src : 1-D storage array (float32, uint16 or uint8 as ``code`` says), length >= n
    n : int
    dst : 1-D float32 array, length >= n (written)
    code : DType code of ``src``, a compile-time constant of the calling kernel

    F32 copies, BF16 shifts the bits into place, F16 and FP8 convert through IEEE half.
    """
    if code == F32:
        _row_f32(src, n, dst)
    elif code == BF16:
        _row_bf16(src, n, dst)
    elif code == F16:
        _row_f16(src, n, dst)
    elif code == E4M3:
        _row_e4m3(src, n, dst)
    else:
        _row_e5m2(src, n, dst)


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def _tok_f32(src, p, s, h, n, dst, dbits, off):
    for i in range(n):
        dst[off + i] = src[p, s, h, i]


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def _tok_bf16(src, p, s, h, n, dst, dbits, off):
    for i in range(n):
        dbits[off + i] = np.uint32(src[p, s, h, i]) << np.uint32(16)


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def _tok_f16(src, p, s, h, n, dst, dbits, off):
    for i in range(n):
        dst[off + i] = half_to_f32(np.uint16(src[p, s, h, i]))


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def _tok_e4m3(src, p, s, h, n, dst, dbits, off):
    for i in range(n):
        dst[off + i] = fp8_value(np.uint32(src[p, s, h, i]), E4M3)


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def _tok_e5m2(src, p, s, h, n, dst, dbits, off):
    for i in range(n):
        dst[off + i] = fp8_value(np.uint32(src[p, s, h, i]), E5M2)


@njit(inline="always", cache=True)
def load_tok(src, p, s, h, n, dst, dbits, off, code):
    """``dst[off:off + n]`` = float32 values of ``src[p, s, h, :n]``, indexing the 4-D pool
    directly (no array view per token).

    Parameters
    ----------
    src : storage [N, bs, Hkv, D] (float32, uint16 or uint8 as ``code`` says)
    p, s, h : int -- physical block, slot, KV head
    n : int (<= D)
    dst : 1-D float32 (written); ``dbits`` is ``dst`` viewed as uint32
    off : int
    code : DType code of ``src``, a compile-time constant of the calling kernel
    """
    if code == F32:
        _tok_f32(src, p, s, h, n, dst, dbits, off)
    elif code == BF16:
        _tok_bf16(src, p, s, h, n, dst, dbits, off)
    elif code == F16:
        _tok_f16(src, p, s, h, n, dst, dbits, off)
    elif code == E4M3:
        _tok_e4m3(src, p, s, h, n, dst, dbits, off)
    else:
        _tok_e5m2(src, p, s, h, n, dst, dbits, off)


# ------------------------------------------------------------------------- whole arrays (host side)
_encode = njit(inline="always", cache=True)(fp8_encode_bits)

@njit(parallel=True, cache=True)
def fp8_encode_array(bits, out, mbits, bias, max_code, nan_code, start, stop):
    """``out[i]`` = FP8 code of the float32 with bits ``bits[i]`` for ``start <= i < stop`` (a range
    kernel: see ``launch.py``).

    Parameters
    ----------
    bits : uint32 [n] (float32 bits)
    out : uint8 [n] (written)
    mbits, bias, max_code, nan_code : int -- the format (``dtypes.fp8_params``)
    start, stop : int
    """
    for i in prange(start, stop):
        out[i] = _encode(bits[i], mbits, bias, max_code, nan_code)


_ENCODE_PER_US = 300.0  # elements per microsecond of one thread (2-core development machine)


def fp8_encode(x: np.ndarray, dtype: DType) -> np.ndarray:
    """uint8 FP8 codes (same shape) of a float array: round to nearest even, saturating to
    +-max finite (infinities included), NaN -> NaN -- ``dtypes.fp8_encode_bits`` on every element."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint8)
    n = x.size
    launch(fp8_encode_array, (x.reshape(-1).view(np.uint32), out.reshape(-1), *fp8_params(dtype)),
           n, n / _ENCODE_PER_US)
    return out


def decode_f32(storage: np.ndarray, dtype: DType) -> np.ndarray:
    """Storage of ``dtype`` -> float32 array (the same array when already float32)."""
    if dtype == DType.F32:
        return storage
    if dtype.is_fp8:
        return decode_table(dtype)[storage]
    return from_storage(storage, dtype).astype(np.float32)


def encode_f32(x: np.ndarray, dtype: DType) -> np.ndarray:
    """float32 array -> storage of ``dtype``, rounding to nearest even (FP8: saturating)."""
    if dtype == DType.F32:
        return x
    if dtype == DType.F16:
        return x.astype(np.float16).view(np.uint16)
    if dtype == DType.BF16:
        return x.astype(ml_dtypes.bfloat16).view(np.uint16)
    if dtype.is_fp8:
        return fp8_encode(x, dtype)
    raise TypeError(f"dtype: cannot encode float32 as {dtype}")
