"""Split-K paged decode on the GPU (flash-decoding over a block table) and its merge.

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq queries per sequence, D head_dim,
N physical blocks, bs block_size, M max blocks per sequence; R query rows per thread block.

``decode_kernel(...)`` arguments (C-contiguous device arrays, validated by ``ops/config.py``):

- ``q``      [B, H, Sq, D] storage of q (float32, uint16 bits, uint8 FP8 codes)
- ``k``, ``v`` [N, bs, Hkv, W] the K/V pools read as W machine words per row (uint64 / uint32 /
  uint16 / uint8 views of the storage; E = D / W elements per word, decoded in the kernel)
- ``table``  int32 [B, M]; token t of sequence b is slot ``t % bs`` of block ``table[b, t // bs]``
- ``seq_lens`` int32 [B]; ``qk_scale`` multiplies q . k; ``out_scale`` multiplies the output
- ``out``    [B, H, Sq, D] storage of the output dtype, ``lse`` float32 [B, H, Sq] (one partition)
- ``po``     float32 [B, H, Sq, P, D], ``pml`` float32 [B, H, Sq, P, 2] (several partitions: each
  partition's normalized output, its running max in base 2 and its sum, for ``merge_kernel``)
- ``flag``   int32 [1], set to 1 when a visible score is not finite (the client raises)

Grid (B * Hkv * row chunks, P partitions), NT threads. A thread block serves R rows of one
(sequence, KV head) -- rows are (GQA head g, query i) pairs, so the whole group shares every K/V
load -- over one partition of PT tokens. Threads work in groups of TPG lanes; a group reads one
token row with coalesced word loads (lane l takes words l, l + TPG, ...). Scores go to shared
memory (bottom-right causal mask; only tokens t < L are read), the block reduces max and sum, then
the groups stream V with the probabilities. Unused cache slots are never read.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32

from ...dtypes import F32
from .codecs import SIM, decode_bits, encode_bits

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ELEM_BITS = {0: 32, 1: 16, 2: 16, 3: 8, 4: 8}


def _log2(n: int) -> int:
    return n.bit_length() - 1


@functools.cache
def decode_kernel(D: int, q_code: int, kv_code: int, out_code: int, word_bits: int, TPG: int,
                  NT: int, R: int, PT: int, U: int = 2):
    """The decode kernel specialized on head_dim, dtype codes, word size and geometry (U: tokens
    each lane group loads at once)."""
    EB = ELEM_BITS[kv_code]
    E = word_bits // EB            # elements per word
    W = D // E                     # words per row
    WPL = (W + TPG - 1) // TPG     # words per lane
    EPL = WPL * E                  # elements per lane
    NG = NT // TPG                 # lane groups per block
    SHFL = not SIM                 # warp shuffles (the simulator has none)
    NPART = NT // 32 if SHFL else NG
    LOG_TPG = _log2(TPG)
    LOG_CROSS = _log2(32 // TPG) if SHFL else 0
    LOG_NT = _log2(NT)
    MASK = np.uint64((1 << EB) - 1)
    Q_F32 = q_code == F32
    OUT_F32 = out_code == F32
    NEG_INF = float32(-np.inf)
    ACC_N = R * EPL                # accumulator registers per lane
    QN = R * EPL                   # q registers per lane
    UW = U * WPL                   # words in flight per lane
    UR = U * R

    @cuda.jit(cache=True)
    def kernel(q, k, v, table, seq_lens, qk_scale, out_scale, causal, out, lse, po, pml, flag):
        tid = cuda.threadIdx.x
        part = cuda.blockIdx.y
        n_parts = cuda.gridDim.y
        H = q.shape[1]
        Sq = q.shape[2]
        bs = k.shape[1]
        Hkv = k.shape[2]
        G = H // Hkv
        rows = G * Sq
        n_rc = (rows + R - 1) // R
        by = cuda.blockIdx.x
        b = by // (Hkv * n_rc)
        kvh = by // n_rc % Hkv
        rc = by % n_rc
        L = seq_lens[b]
        t0 = part * PT
        ntok = max(0, min(PT, L - t0))

        q_s = cuda.shared.array((R, D), float32)
        logit = cuda.shared.array((R, PT), float32)
        red = cuda.shared.array((R, NT), float32)
        red_o = cuda.shared.array((NPART, R, D), float32)

        c = float32(qk_scale * LOG2E)
        for idx in range(tid, R * D, NT):
            r = idx // D
            d = idx % D
            gr = rc * R + r
            x = float32(0.0)
            if gr < rows:
                if Q_F32:
                    x = q[b, kvh * G + gr // Sq, gr % Sq, d]
                else:
                    x = decode_bits(q[b, kvh * G + gr // Sq, gr % Sq, d], q_code)
            q_s[r, d] = x * c
        cuda.syncthreads()

        lane = tid % TPG
        gid = tid // TPG
        # This lane's slice of the q rows, in registers: dims (lane + TPG * cc) * E + e.
        qreg = cuda.local.array(QN, float32)
        for cc in range(WPL):
            w = lane + TPG * cc
            for e in range(E):
                for r in range(R):
                    qreg[r * EPL + cc * E + e] = q_s[r, w * E + e] if w < W else float32(0.0)
        # Phase 1: scores of this partition's tokens into shared memory; a group takes U tokens at
        # a time and issues all their loads before using any, to keep bytes in flight.
        words = cuda.local.array(UW, np.uint64)
        dots = cuda.local.array(UR, float32)
        for base in range(0, ntok, NG * U):
            for u in range(U):
                tt = base + u * NG + gid
                if tt < ntok:
                    t = t0 + tt
                    blk = table[b, t // bs]
                    off = t % bs
                    for cc in range(WPL):
                        w = lane + TPG * cc
                        words[u * WPL + cc] = np.uint64(k[blk, off, kvh, w]) if w < W else np.uint64(0)
            for u in range(U):
                for r in range(R):
                    dots[u * R + r] = 0.0
                for cc in range(WPL):
                    word = words[u * WPL + cc]
                    for e in range(E):
                        x = decode_bits((word >> np.uint64(e * EB)) & MASK, kv_code)
                        for r in range(R):
                            dots[u * R + r] += x * qreg[r * EPL + cc * E + e]
            if SHFL:
                for sh in range(LOG_TPG):
                    for i in range(UR):
                        dots[i] += cuda.shfl_xor_sync(0xFFFFFFFF, dots[i], TPG >> (sh + 1))
            if lane == 0:
                for u in range(U):
                    tt = base + u * NG + gid
                    if tt < ntok:
                        t = t0 + tt
                        for r in range(R):
                            gr = rc * R + r
                            x = dots[u * R + r]
                            if gr < rows and (not causal or t <= L - Sq + gr % Sq):
                                if not abs(x) < np.inf:
                                    flag[0] = 1
                            else:
                                x = NEG_INF
                            logit[r, tt] = x
        cuda.syncthreads()

        # Phase 2: per-row max, then probabilities and their sum (tree reductions in shared memory).
        for r in range(R):
            mx = NEG_INF
            for j in range(tid, ntok, NT):
                mx = max(mx, logit[r, j])
            red[r, tid] = mx
        cuda.syncthreads()
        for s in range(LOG_NT):
            half = NT >> (s + 1)
            if tid < half:
                for r in range(R):
                    red[r, tid] = max(red[r, tid], red[r, tid + half])
            cuda.syncthreads()
        mrow = cuda.local.array(R, float32)
        for r in range(R):
            mrow[r] = red[r, 0]
        cuda.syncthreads()
        for r in range(R):
            acc_s = float32(0.0)
            m = mrow[r]
            for j in range(tid, ntok, NT):
                p = float32(0.0)
                if m > NEG_INF:
                    p = math.exp2(logit[r, j] - m)
                logit[r, j] = p
                acc_s += p
            red[r, tid] = acc_s
        cuda.syncthreads()
        for s in range(LOG_NT):
            half = NT >> (s + 1)
            if tid < half:
                for r in range(R):
                    red[r, tid] += red[r, tid + half]
            cuda.syncthreads()

        # Phase 3: stream V with the probabilities, U tokens per group at a time.
        acc = cuda.local.array(ACC_N, float32)
        for i in range(ACC_N):
            acc[i] = 0.0
        for base in range(0, ntok, NG * U):
            for u in range(U):
                tt = base + u * NG + gid
                if tt < ntok:
                    t = t0 + tt
                    blk = table[b, t // bs]
                    off = t % bs
                    for cc in range(WPL):
                        w = lane + TPG * cc
                        words[u * WPL + cc] = np.uint64(v[blk, off, kvh, w]) if w < W else np.uint64(0)
                else:
                    for cc in range(WPL):
                        words[u * WPL + cc] = np.uint64(0)
            for u in range(U):
                tt = base + u * NG + gid
                if tt < ntok:
                    for r in range(R):
                        dots[u * R + r] = logit[r, tt]
                else:
                    for r in range(R):
                        dots[u * R + r] = 0.0
            for u in range(U):
                for cc in range(WPL):
                    word = words[u * WPL + cc]
                    for e in range(E):
                        x = decode_bits((word >> np.uint64(e * EB)) & MASK, kv_code)
                        for r in range(R):
                            acc[r * EPL + cc * E + e] += dots[u * R + r] * x
        if SHFL:
            for s in range(LOG_CROSS):
                for i in range(ACC_N):
                    acc[i] += cuda.shfl_xor_sync(0xFFFFFFFF, acc[i], 16 >> s)
            pidx = tid // 32
            writer = tid % 32 < TPG
        else:
            pidx = gid
            writer = True
        if writer:
            for cc in range(WPL):
                w = lane + TPG * cc
                if w < W:
                    for e in range(E):
                        for r in range(R):
                            red_o[pidx, r, w * E + e] = acc[r * EPL + cc * E + e]
        cuda.syncthreads()

        for idx in range(tid, R * D, NT):
            r = idx // D
            d = idx % D
            gr = rc * R + r
            if gr < rows:
                h = kvh * G + gr // Sq
                i = gr % Sq
                s_o = float32(0.0)
                for p in range(NPART):
                    s_o += red_o[p, r, d]
                m = mrow[r]
                lsum = red[r, 0]
                if n_parts == 1:
                    y = float32(0.0)
                    if lsum > 0:
                        y = s_o * float32(out_scale) / lsum
                    if OUT_F32:
                        out[b, h, i, d] = y
                    else:
                        out[b, h, i, d] = encode_bits(y, out_code)
                    if d == 0:
                        lse[b, h, i] = (m + math.log2(lsum)) * LN2 if lsum > 0 else NEG_INF
                else:
                    po[b, h, i, part, d] = s_o / lsum if lsum > 0 else float32(0.0)
                    if d == 0:
                        pml[b, h, i, part, 0] = m if lsum > 0 else NEG_INF
                        pml[b, h, i, part, 1] = lsum

    return kernel


@functools.cache
def merge_kernel(D: int, out_code: int, NT: int):
    """Combine P partitions: out = sum_p l_p 2^(m_p - m) o_p / sum_p l_p 2^(m_p - m).
    Grid B * H * Sq blocks of NT threads."""
    OUT_F32 = out_code == F32
    NEG_INF = float32(-np.inf)

    @cuda.jit(cache=True)
    def kernel(po, pml, out_scale, out, lse):
        H = po.shape[1]
        Sq = po.shape[2]
        P = po.shape[3]
        x = cuda.blockIdx.x
        b = x // (H * Sq)
        h = x // Sq % H
        i = x % Sq
        m = NEG_INF
        for p in range(P):
            m = max(m, pml[b, h, i, p, 0])
        total = float32(0.0)
        if m > NEG_INF:
            for p in range(P):
                mp = pml[b, h, i, p, 0]
                if mp > NEG_INF:
                    total += pml[b, h, i, p, 1] * math.exp2(mp - m)
        for d in range(cuda.threadIdx.x, D, NT):
            acc = float32(0.0)
            if total > 0:
                for p in range(P):
                    mp = pml[b, h, i, p, 0]
                    if mp > NEG_INF:
                        acc += po[b, h, i, p, d] * (pml[b, h, i, p, 1] * math.exp2(mp - m))
                acc = acc * float32(out_scale) / total
            if OUT_F32:
                out[b, h, i, d] = acc
            else:
                out[b, h, i, d] = encode_bits(acc, out_code)
        if cuda.threadIdx.x == 0:
            lse[b, h, i] = (m + math.log2(total)) * LN2 if total > 0 else NEG_INF

    return kernel
