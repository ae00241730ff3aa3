"""Tiled paged-attention forward on the GPU, for many queries per sequence (prefill).

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq queries per sequence, D head_dim,
N physical blocks, bs block_size, M max blocks per sequence.

``tiled_kernel(...)`` arguments (C-contiguous device arrays, validated by ``ops/config.py``):

- ``q``      [B, H, Sq, D] storage of q (float32, uint16 bits, uint8 FP8 codes)
- ``k``, ``v`` [N, bs, Hkv, W] K/V pools as W words per row (see ``paged_decode``)
- ``table``  int32 [B, M]: token t of sequence b is slot ``t % bs`` of block ``table[b, t // bs]``
- ``seq_lens`` int32 [B]; ``qk_scale`` multiplies q . k; ``out_scale`` multiplies the output
- ``out``    [B, H, Sq, D] storage of the output dtype; ``lse`` float32 [B, H, Sq]
- ``flag``   int32 [1], set when a visible score is not finite

Grid (B * H, query tiles), NT threads as NT / 8 row groups x 8 lanes. A block keeps its BQ queries
(pre-scaled, float32) in shared memory and walks the sequence in tiles of BK tokens gathered through
the block table into one shared buffer (K, then V: both fit the 48 KB of static shared memory).
Each thread owns RT query rows x (BK / 8) keys of the score tile and RT rows x (D / 8) dims of the
output, in registers; the online softmax (base 2) shares each row's max through shared memory.
Bottom-right causal: whole key tiles past the query tile's last visible key are skipped.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32

from ...dtypes import F32
from .codecs import decode_bits, encode_bits
from .paged_decode import ELEM_BITS, LN2, LOG2E


def tile_shape(D: int, sim: bool) -> tuple:
    """(BQ, BK, NT) for head_dim D: the largest tiles whose shared memory stays under 46 KB and
    whose per-thread output tile stays at most 64 registers."""
    if sim:
        return 8, 8, 32
    DT = -(-D // 8)
    for BQ, BK in ((64, 32), (32, 32), (16, 16)):
        smem = 4 * ((BQ + BK) * (D + 1) + BQ * (BK + 1) + BQ * 8)
        if smem <= 46 * 1024 and (BQ // 16) * DT <= 64:
            return BQ, BK, 128
    return 16, 8, 128


@functools.cache
def tiled_kernel(D: int, q_code: int, kv_code: int, out_code: int, word_bits: int, BQ: int, BK: int,
                 NT: int):
    EB = ELEM_BITS[kv_code]
    E = word_bits // EB
    W = D // E
    NTY = NT // 8
    RT = BQ // NTY          # query rows per thread
    KT = BK // 8            # keys per thread
    DT = -(-D // 8)         # output dims per thread
    MASK = np.uint64((1 << EB) - 1)
    Q_F32 = q_code == F32
    OUT_F32 = out_code == F32
    NEG_INF = float32(-np.inf)
    D1 = D + 1              # padded shared-memory rows (no bank conflicts down a column)
    BK1 = BK + 1
    S_N = RT * KT
    O_N = RT * DT

    @cuda.jit(cache=True)
    def kernel(q, k, v, table, seq_lens, qk_scale, out_scale, causal, out, lse, flag):
        tid = cuda.threadIdx.x
        ty = tid // 8
        tx = tid % 8
        H = q.shape[1]
        Sq = q.shape[2]
        bs = k.shape[1]
        Hkv = k.shape[2]
        G = H // Hkv
        b = cuda.blockIdx.x // H
        h = cuda.blockIdx.x % H
        kvh = h // G
        q0 = cuda.blockIdx.y * BQ
        L = seq_lens[b]

        Qs = cuda.shared.array((BQ, D1), float32)
        KV = cuda.shared.array((BK, D1), float32)
        Ps = cuda.shared.array((BQ, BK1), float32)
        lred = cuda.shared.array((BQ, 8), float32)

        c = float32(qk_scale * LOG2E)
        for idx in range(tid, BQ * D, NT):
            r = idx // D
            d = idx % D
            x = float32(0.0)
            if q0 + r < Sq:
                if Q_F32:
                    x = q[b, h, q0 + r, d]
                else:
                    x = decode_bits(q[b, h, q0 + r, d], q_code)
            Qs[r, d] = x * c

        s = cuda.local.array(S_N, float32)
        o = cuda.local.array(O_N, float32)
        m = cuda.local.array(RT, float32)
        lpart = cuda.local.array(RT, float32)
        qv = cuda.local.array(RT, float32)
        kv = cuda.local.array(KT, float32)
        for i in range(RT * DT):
            o[i] = 0.0
        for rr in range(RT):
            m[rr] = NEG_INF
            lpart[rr] = 0.0

        # Keys visible to the last query of the tile (bottom-right causal), or all L.
        kmax = L
        if causal:
            kmax = min(L, max(0, L - Sq + min(Sq, q0 + BQ)))
        for k0 in range(0, kmax, BK):
            cuda.syncthreads()  # Qs ready / previous tile's V and P consumed
            for idx in range(tid, BK * W, NT):
                j = idx // W
                w = idx % W
                t = k0 + j
                if t < kmax:
                    word = np.uint64(k[table[b, t // bs], t % bs, kvh, w])
                    for e in range(E):
                        KV[j, w * E + e] = decode_bits((word >> np.uint64(e * EB)) & MASK, kv_code)
                else:
                    for e in range(E):
                        KV[j, w * E + e] = 0.0
            cuda.syncthreads()
            for i in range(RT * KT):
                s[i] = 0.0
            for d in range(D):
                for rr in range(RT):
                    qv[rr] = Qs[ty * RT + rr, d]
                for kk in range(KT):
                    kv[kk] = KV[tx + 8 * kk, d]
                for rr in range(RT):
                    for kk in range(KT):
                        s[rr * KT + kk] += qv[rr] * kv[kk]
            for rr in range(RT):
                i = q0 + ty * RT + rr
                for kk in range(KT):
                    t = k0 + tx + 8 * kk
                    x = s[rr * KT + kk]
                    if t < kmax and (not causal or t <= L - Sq + i):
                        if not abs(x) < np.inf:
                            flag[0] = 1
                    else:
                        x = NEG_INF
                    Ps[ty * RT + rr, tx + 8 * kk] = x
            cuda.syncthreads()
            for rr in range(RT):
                mt = m[rr]
                for j in range(BK):
                    mt = max(mt, Ps[ty * RT + rr, j])
                alpha = float32(1.0)
                if m[rr] > NEG_INF:
                    alpha = math.exp2(m[rr] - mt)
                m[rr] = mt
                lpart[rr] *= alpha
                for dd in range(DT):
                    o[rr * DT + dd] *= alpha
                for kk in range(KT):
                    p = float32(0.0)
                    if mt > NEG_INF:
                        p = math.exp2(s[rr * KT + kk] - mt)
                        if not causal and k0 + tx + 8 * kk >= kmax:
                            p = float32(0.0)
                    s[rr * KT + kk] = p
            cuda.syncthreads()  # every row max read before P overwrites the scores
            for rr in range(RT):
                i = q0 + ty * RT + rr
                for kk in range(KT):
                    t = k0 + tx + 8 * kk
                    p = s[rr * KT + kk]
                    if t >= kmax or (causal and t > L - Sq + i):
                        p = float32(0.0)
                    Ps[ty * RT + rr, tx + 8 * kk] = p
                    lpart[rr] += p
            for idx in range(tid, BK * W, NT):
                j = idx // W
                w = idx % W
                t = k0 + j
                if t < kmax:
                    word = np.uint64(v[table[b, t // bs], t % bs, kvh, w])
                    for e in range(E):
                        KV[j, w * E + e] = decode_bits((word >> np.uint64(e * EB)) & MASK, kv_code)
                else:
                    for e in range(E):
                        KV[j, w * E + e] = 0.0
            cuda.syncthreads()
            for j in range(BK):
                for rr in range(RT):
                    qv[rr] = Ps[ty * RT + rr, j]
                for dd in range(DT):
                    d = tx + 8 * dd
                    if d < D:
                        x = KV[j, d]
                        for rr in range(RT):
                            o[rr * DT + dd] += qv[rr] * x

        for rr in range(RT):
            lred[ty * RT + rr, tx] = lpart[rr]
        cuda.syncthreads()
        for rr in range(RT):
            r = ty * RT + rr
            i = q0 + r
            if i < Sq:
                lsum = float32(0.0)
                for x8 in range(8):
                    lsum += lred[r, x8]
                inv = float32(0.0)
                if lsum > 0:
                    inv = float32(out_scale) / lsum
                for dd in range(DT):
                    d = tx + 8 * dd
                    if d < D:
                        y = o[rr * DT + dd] * inv
                        if OUT_F32:
                            out[b, h, i, d] = y
                        else:
                            out[b, h, i, d] = encode_bits(y, out_code)
                if tx == 0:
                    lse[b, h, i] = (m[rr] + math.log2(lsum)) * LN2 if lsum > 0 else NEG_INF

    return kernel
