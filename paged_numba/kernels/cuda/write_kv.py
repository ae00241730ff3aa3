"""Cache writes on the GPU (vLLM's ``reshape_and_cache``): new K/V rows scattered into the pools.

Symbols: T new rows, Hkv KV heads, D head_dim, N physical blocks, bs block_size.

``write_kv_kernel(pool_code, src_code)`` arguments (C-contiguous device arrays, validated by
``ops/config.py``):

- ``k_pool``, ``v_pool`` [N, bs, Hkv, D] storage of ``pool_code`` (float32, uint16 bits, uint8 FP8
  codes), written in place
- ``k``, ``v`` [T, Hkv, D] storage of ``src_code``: the pool's own dtype (copied bit for bit), or
  F32 / F16 / BF16 for an FP8 pool (decoded, divided by the scale in float32, encoded with the
  saturating round-to-nearest-even encoder shared with the CPU)
- ``slots`` int64 [T]: row t goes to block ``slots[t] // bs``, offset ``slots[t] % bs``; negative
  slots are skipped (no slot appears twice, so no two threads write one element)
- ``k_scale``, ``v_scale`` float32 > 0 (FP8 pools only)

One thread per element (t, h, d) of the rows, consecutive threads on consecutive d, so the reads of
k / v and the writes of a pool row are coalesced. Grid: ceil(T * Hkv * D / NT) blocks of NT threads.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32

from ...dtypes import F32
from .codecs import decode_bits, encode_bits, f2u, i2f


@cuda.jit(device=True, inline=True)
def _keep_nan_sign(x, bits16):
    """``x`` decoded from the 16-bit ``bits16``, with the source's sign bit put back on a NaN: the
    GPU's half -> float conversion returns the canonical positive NaN for every NaN input."""
    if x != x:
        x = i2f(f2u(x) | ((np.uint32(bits16) & np.uint32(0x8000)) << np.uint32(16)))
    return x


@functools.cache
def write_kv_kernel(pool_code: int, src_code: int):
    """The write kernel specialized on the pool's and the rows' dtype codes."""
    COPY = pool_code == src_code
    SRC_F32 = src_code == F32      # float32 rows are values, not bits: no decode

    @cuda.jit(cache=True)
    def kernel(k_pool, v_pool, k, v, slots, k_scale, v_scale):
        i = cuda.grid(1)
        Hkv = k.shape[1]
        D = k.shape[2]
        if i >= k.shape[0] * Hkv * D:
            return
        t = i // (Hkv * D)
        h = i // D % Hkv
        d = i % D
        s = slots[t]
        if s < 0:
            return
        bs = k_pool.shape[1]
        blk = s // bs
        off = s % bs
        if COPY:
            k_pool[blk, off, h, d] = k[t, h, d]
            v_pool[blk, off, h, d] = v[t, h, d]
        else:
            if SRC_F32:
                xk = float32(k[t, h, d])
                xv = float32(v[t, h, d])
            else:
                xk = _keep_nan_sign(decode_bits(k[t, h, d], src_code), k[t, h, d])
                xv = _keep_nan_sign(decode_bits(v[t, h, d], src_code), v[t, h, d])
            # A GPU division returns the canonical (positive) NaN for any NaN operand; dividing only
            # non-NaN values keeps a NaN's sign bit, as ml_dtypes (and the CPU path) do.
            if xk == xk:
                xk = xk / float32(k_scale)
            if xv == xv:
                xv = xv / float32(v_scale)
            k_pool[blk, off, h, d] = encode_bits(xk, pool_code)
            v_pool[blk, off, h, d] = encode_bits(xv, pool_code)

    return kernel
