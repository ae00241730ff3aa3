"""Staging of the tensor-core kernels' tiles (``paged_prefill``, ``paged_backward_mma``): query rows
of the dense and the ragged layouts, pool rows of a tile's tokens resolved through the block
table, 16-byte ``cp.async`` copies of K / V rows (or FP8 code rows) into shared memory, and the
exact decode of staged FP8 codes into 16-bit tiles."""
from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32

from ...dtypes import F16
from .codecs import decode_bits, fp8x2_decode, fp8x2_to_f16x2
from .mma import cp_async16, pack2, udiv32


@cuda.jit(device=True, inline=True)
def q_row(row0, h, i, stride_h, stride_i):
    """Row of query i, head h of the sequence whose rows start at row0 (q / out as [rows, D], lse
    as [rows]): the dense [B, H, Sq, D] layout and the token-major ragged one differ only in the
    strides."""
    return np.int64(row0) + np.int64(h) * stride_h + np.int64(i) * stride_i


@cuda.jit(device=True, inline=True)
def kv_shift(row):
    """Words by which row ``row`` of a 32-bit K / V tile of the 3xTF32 backward starts after row *
    pitch: 8 ((row >> 1) % 2). With a pitch of 16 (mod 32) words, the 16-byte reads of rows g,
    g + 1 and the 8-byte reads of rows t (and t + 4) at 2 g then hit 32 distinct banks, and each
    read's column stays a compile-time offset (``paged_backward_mma.tf32_pitches``)."""
    return 8 * ((row >> 1) & 1)


@cuda.jit(device=True, inline=True)
def resolve_slots(slots, table, b, kvh, k0, kend, bs, Hkv, tid, BK, NT):
    """The NT threads write into ``slots`` the pool row (slot * Hkv + kvh) of tokens k0 .. k0 + BK - 1
    (-1 from kend on), thread tid tokens tid, tid + NT, ...: one table read and one 32-bit division
    per token and tile."""
    for j in range((BK + NT - 1) // NT):       # a compile-time trip count: unrolled
        c = tid + NT * j
        if BK % NT == 0 or c < BK:
            t = np.uint32(k0 + c)
            x = int32(-1)
            if t < kend:
                blk = udiv32(t, np.uint32(bs))
                x = int32((table[b, blk] * bs + int32(t - blk * np.uint32(bs))) * Hkv + kvh)
            slots[c] = x


@cuda.jit(device=True, inline=True)
def load_kv(sm, k, v, slots, koff, voff, tid, NT, BK, D, DPK, DPV, E, SWZ):
    """Start the 16-byte copies (E elements: 8 of 16 bits, 4 of 32) of the K and V rows of a
    tile's tokens (pool rows in ``slots``, -1: a zero row) into the tile buffers at koff / voff
    (rows DPK / DPV elements apart); SWZ (a compile-time flag): each row shifted by ``kv_shift``."""
    CH = D // E
    for i in range((BK * CH + NT - 1) // NT):    # a compile-time trip count: unrolled
        c = tid + NT * i
        if BK * CH % NT and c >= BK * CH:
            break
        j = c // CH
        ch = c % CH
        row = slots[j]
        src = np.int64(0)
        n = 0
        if row >= 0:
            src = np.int64(row) * D + ch * E
            n = 16
        col = kv_shift(j) + ch * E if SWZ else ch * E
        cp_async16(sm, koff + j * DPK + col, k, src, n)
        cp_async16(sm, voff + j * DPV + col, v, src, n)


@cuda.jit(device=True, inline=True)
def load_codes(sm8, k, v, slots, roff, tid, NT, BK, D):
    """FP8 K/V: start the 16-byte copies of a tile's code rows (D bytes each; -1: zeros) into the
    staging area at byte roff (K, then V)."""
    CH = D // 16
    for i in range((BK * CH + NT - 1) // NT):
        c = tid + NT * i
        if BK * CH % NT and c >= BK * CH:
            break
        j = c // CH
        ch = c % CH
        row = slots[j]
        src = np.int64(0)
        n = 0
        if row >= 0:
            src = np.int64(row) * D + ch * 16
            n = 16
        cp_async16(sm8, roff + j * D + ch * 16, k, src, n)
        cp_async16(sm8, roff + BK * D + j * D + ch * 16, v, src, n)


@cuda.jit(device=True, inline=True)
def convert_codes(sm32, roff, koff, voff, tid, NT, BK, D, DP, kind, kv_code, PAIRS):
    """FP8 K/V: decode the staged codes (exactly: every E4M3 / E5M2 value is a BF16 and an F16
    value) into the 16-bit tile buffers at koff / voff (uint16 element offsets), 4 codes a step;
    PAIRS: two codes at a time into F16 (``fp8x2_to_f16x2``), which an F16 tile stores as is."""
    Q4 = D // 4
    for i in range((BK * Q4 + NT - 1) // NT):
        c = tid + NT * i
        if BK * Q4 % NT and c >= BK * Q4:
            break
        j = c // Q4
        cq = c % Q4
        for kv in range(2):
            word = sm32[(roff + kv * BK * D + j * D + 4 * cq) // 4]
            dst = ((voff if kv else koff) + j * DP + 4 * cq) // 2
            if PAIRS and kind == F16:
                sm32[dst] = fp8x2_to_f16x2(word & np.uint32(0xFFFF), kv_code)
                sm32[dst + 1] = fp8x2_to_f16x2(word >> np.uint32(16), kv_code)
            elif PAIRS:
                x0, x1 = fp8x2_decode(word & np.uint32(0xFFFF), kv_code)
                x2, x3 = fp8x2_decode(word >> np.uint32(16), kv_code)
                sm32[dst] = pack2(kind, x0, x1)
                sm32[dst + 1] = pack2(kind, x2, x3)
            else:
                x = cuda.local.array(4, float32)
                for e in range(4):
                    x[e] = decode_bits((word >> np.uint32(8 * e)) & np.uint32(0xFF), kv_code)
                sm32[dst] = pack2(kind, x[0], x[1])
                sm32[dst + 1] = pack2(kind, x[2], x[3])
