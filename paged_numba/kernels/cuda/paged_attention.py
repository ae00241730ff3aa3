"""Tiled paged-attention forward on the GPU, for many queries per sequence (prefill).

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq queries per sequence, D head_dim,
N physical blocks, bs block_size, M max blocks per sequence.

``tiled_kernel(...)`` arguments (C-contiguous device arrays, validated by ``ops/config.py``):

- ``q``      [rows, D] storage of q (float32, uint16 bits, uint8 FP8 codes), addressed as in
  ``paged_decode``: query i of sequence b, head h, is row ``work[0, b] + h * stride_h + i * stride_i``
- ``k``, ``v`` [N, bs, Hkv, W] K/V pools as W words per row (see ``paged_decode``)
- ``table``  int32 [B, M]: token t of sequence b is slot ``t % bs`` of block ``table[b, t // bs]``
- ``seq_lens`` int32 [B]; ``work`` int32 [4, B] (``paged_decode``; row 3: the tiled work list)
- ``n_heads`` H; ``qk_scale`` multiplies q . k; ``out_scale`` multiplies the output; ``causal``,
  ``window``, ``softcap``, ``slopes`` as in ``paged_decode`` (SOFTCAP / ALIBI factory flags)
- ``out``    [rows, D] storage of the output dtype; ``lse`` float32 [rows]
- ``flag``   int32 [1], set when a visible score is not finite

Grid (n_tiled * H, query tiles of the longest tiled sequence), NT threads as NT / 8 row groups x 8
lanes; a query tile past its sequence's q_len returns at once. A block keeps its BQ queries
(pre-scaled, float32) in shared memory and walks the sequence in tiles of BK tokens gathered through
the block table into one shared buffer (K, then V: both fit the 48 KB of static shared memory).
Each thread owns RT query rows x (BK / 8) keys of the score tile and RT rows x (D / 8) dims of the
output, in registers; the online softmax (base 2) shares each row's max through shared memory.
Bottom-right causal: whole key tiles past the query tile's last visible key are skipped; with a
window the walk starts at the first key the tile's first query sees.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32

from ...dtypes import F32
from .codecs import decode_bits, encode_bits
from .paged_decode import ELEM_BITS, LN2, LOG2E, _modify


@functools.cache
def tiled_kernel(D: int, q_code: int, kv_code: int, out_code: int, word_bits: int, BQ: int, BK: int,
                 NT: int, SOFTCAP: bool = False, ALIBI: bool = False):
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
    MOD = SOFTCAP or ALIBI

    @cuda.jit(cache=True)
    def kernel(q, k, v, table, seq_lens, work, n_heads, stride_h, stride_i, qk_scale, out_scale, causal,
               window, softcap, slopes, out, lse, flag):
        tid = cuda.threadIdx.x
        ty = tid // 8
        tx = tid % 8
        H = n_heads
        bs = k.shape[1]
        Hkv = k.shape[2]
        G = H // Hkv
        b = work[3, cuda.blockIdx.x // H]
        h = cuda.blockIdx.x % H
        kvh = h // G
        q0 = cuda.blockIdx.y * BQ
        Sq = work[1, b]
        if q0 >= Sq:                # a query tile this sequence does not have (whole block)
            return
        qbase = work[0, b] + h * stride_h
        L = seq_lens[b]
        first = L - Sq              # position of query 0
        cap = float32(softcap)
        inv_cap = float32(1.0) / cap if SOFTCAP else float32(0.0)
        slope = float32(0.0)
        if ALIBI:
            slope = slopes[h]

        Qs = cuda.shared.array((BQ, D1), float32)
        KV = cuda.shared.array((BK, D1), float32)
        Ps = cuda.shared.array((BQ, BK1), float32)
        lred = cuda.shared.array((BQ, 8), float32)

        c = float32(qk_scale) if MOD else float32(qk_scale * LOG2E)
        for idx in range(tid, BQ * D, NT):
            r = idx // D
            d = idx % D
            x = float32(0.0)
            if q0 + r < Sq:
                if Q_F32:
                    x = q[qbase + (q0 + r) * stride_i, d]
                else:
                    x = decode_bits(q[qbase + (q0 + r) * stride_i, d], q_code)
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

        # Keys visible to the last query of the tile (bottom-right causal), or all L; from the first
        # key the tile's first query sees through the window.
        kmax = L
        if causal:
            kmax = min(L, max(0, first + min(Sq, q0 + BQ)))
        kmin = 0
        if window >= 0:
            kmin = min(kmax, max(0, first + q0 - window))
        for k0 in range(kmin, kmax, BK):
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
                pq = first + q0 + ty * RT + rr      # the row's query position
                for kk in range(KT):
                    t = k0 + tx + 8 * kk
                    x = s[rr * KT + kk]
                    if t < kmax and (not causal or t <= pq) and (window < 0 or t >= pq - window):
                        if not abs(x) < np.inf:
                            flag[0] = 1
                        if MOD:
                            x = _modify(x, cap, inv_cap, slope, pq - t, SOFTCAP, ALIBI)
                    else:
                        x = NEG_INF
                    s[rr * KT + kk] = x
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
                        p = math.exp2(s[rr * KT + kk] - mt)     # masked scores are -inf: p = 0
                    s[rr * KT + kk] = p
            cuda.syncthreads()  # every row max read before P overwrites the scores
            for rr in range(RT):
                for kk in range(KT):
                    p = s[rr * KT + kk]
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
                orow = qbase + i * stride_i
                for dd in range(DT):
                    d = tx + 8 * dd
                    if d < D:
                        y = o[rr * DT + dd] * inv
                        if OUT_F32:
                            out[orow, d] = y
                        else:
                            out[orow, d] = encode_bits(y, out_code)
                if tx == 0:
                    lse[orow] = (m[rr] + math.log2(lsum)) * LN2 if lsum > 0 else NEG_INF

    return kernel
