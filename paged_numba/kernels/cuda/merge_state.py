"""Merging attention states on the GPU (FlashInfer's cascade primitives): states over disjoint key
sets, each a normalized output v and its natural-log LSE s, combine into the state over the union:
``s = ln(sum_k e^s_k)``, ``v = sum_k e^(s_k - s) v_k``. States at -inf weigh nothing (their v is
never read); a row whose states are all -inf gives v = 0, s = -inf. float32 arithmetic.

Symbols: R rows, K states per row, T tokens, H heads, D head_dim.

- ``pair_kernel(D, code, NT)``: ``(v_a, s_a, v_b, s_b, out, lse)`` with v_*, out [R, D] storage of
  dtype ``code`` (float32 or uint16 bits), s_*, lse float32 [R]; grid R blocks of NT threads.
- ``states_kernel(D, code, NT)``: ``(v, s, out, lse)`` with v [T, K, H, D], s float32 [T, K, H],
  out [T, H, D], lse float32 [T, H]; grid T * H blocks of NT threads.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32

from ...dtypes import F32
from .codecs import decode_bits, encode_bits


@cuda.jit(device=True, inline=True)
def _f32(x, code):
    if code == F32:
        return float32(x)
    return decode_bits(x, code)


@functools.cache
def pair_kernel(D: int, code: int, NT: int):
    OUT_F32 = code == F32
    NEG_INF = float32(-np.inf)

    @cuda.jit(cache=True)
    def kernel(v_a, s_a, v_b, s_b, out, lse):
        r = cuda.blockIdx.x
        sa = s_a[r]
        sb = s_b[r]
        m = max(sa, sb)
        wa = float32(0.0)
        wb = float32(0.0)
        if m > NEG_INF:
            if sa > NEG_INF:
                wa = math.exp(sa - m)
            if sb > NEG_INF:
                wb = math.exp(sb - m)
        tot = wa + wb
        for d in range(cuda.threadIdx.x, D, NT):
            y = float32(0.0)
            if tot > 0:
                if wa > 0:
                    y += wa * _f32(v_a[r, d], code)
                if wb > 0:
                    y += wb * _f32(v_b[r, d], code)
                y = y / tot
            if OUT_F32:
                out[r, d] = y
            else:
                out[r, d] = encode_bits(y, code)
        if cuda.threadIdx.x == 0:
            lse[r] = m + math.log(tot) if tot > 0 else NEG_INF

    return kernel


@functools.cache
def states_kernel(D: int, code: int, NT: int):
    OUT_F32 = code == F32
    NEG_INF = float32(-np.inf)

    @cuda.jit(cache=True)
    def kernel(v, s, out, lse):
        K = v.shape[1]
        H = v.shape[2]
        t = cuda.blockIdx.x // H
        h = cuda.blockIdx.x % H
        m = NEG_INF
        for kk in range(K):
            m = max(m, s[t, kk, h])
        tot = float32(0.0)
        if m > NEG_INF:
            for kk in range(K):
                x = s[t, kk, h]
                if x > NEG_INF:
                    tot += math.exp(x - m)
        for d in range(cuda.threadIdx.x, D, NT):
            y = float32(0.0)
            if tot > 0:
                for kk in range(K):
                    x = s[t, kk, h]
                    if x > NEG_INF:
                        y += math.exp(x - m) * _f32(v[t, kk, h, d], code)
                y = y / tot
            if OUT_F32:
                out[t, h, d] = y
            else:
                out[t, h, d] = encode_bits(y, code)
        if cuda.threadIdx.x == 0:
            lse[t, h] = m + math.log(tot) if tot > 0 else NEG_INF

    return kernel
