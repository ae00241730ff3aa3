"""Split-K paged decode on the GPU (flash-decoding over a block table) and its merge.

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq queries per sequence, D head_dim,
N physical blocks, bs block_size, M max blocks per sequence; R query rows per thread block.

``decode_kernel(...)`` arguments (C-contiguous device arrays, validated by ``ops/config.py``):

- ``q``      [B, H, Sq, D] storage of q (float32, uint16 bits, uint8 FP8 codes)
- ``k``, ``v`` [N * bs, Hkv, W] the K/V pools with blocks and slots flattened, each row read as W
  machine words (uint64 / uint32 / uint16 / uint8 views of the storage; E = D / W elements per
  word, decoded in the kernel)
- ``table``  int32 [B, M]; token t of sequence b is slot ``t % bs`` of block ``table[b, t // bs]``
- ``seq_lens`` int32 [B]; ``bs`` the block size; ``qk_scale`` multiplies q . k; ``out_scale``
  multiplies the output
- ``out``    [B, H, Sq, D] storage of the output dtype, ``lse`` float32 [B, H, Sq] (one partition)
- ``po``     float32 [B, H, Sq, P, D], ``pml`` float32 [B, H, Sq, P, 2] (several partitions: each
  partition's normalized output, its running max in base 2 and its sum, for ``merge_kernel``)
- ``flag``   int32 [1], set to 1 when a visible score is not finite (the client raises)

Grid (B * Hkv * row chunks, P partitions), NT threads. A thread block serves R rows of one
(sequence, KV head) -- rows are (GQA head g, query i) pairs, so the whole group shares every K/V
load -- over one partition of PT tokens. The block first resolves the partition's tokens to pool
rows through the block table (once, into shared memory). Threads then work in groups of TPG lanes;
a group takes U tokens at a time, issues the coalesced word loads of their K and V rows together
(lane l takes words l, l + TPG, ...), reduces the dot products with warp shuffles and keeps its own
online softmax (running max and sum in base 2, accumulators in registers): one pass over the cache,
no score buffer. Groups of a warp merge through shuffles, warps through shared memory. Tokens
t >= L are never read (bottom-right causal mask on top).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int64

from ...dtypes import F32
from .codecs import SIM, decode_bits, encode_bits

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ELEM_BITS = {0: 32, 1: 16, 2: 16, 3: 8, 4: 8}


def _log2(n: int) -> int:
    return n.bit_length() - 1


@cuda.jit(device=True, inline=True)
def _load_rows(k, v, slot_s, kvh, lane, gid, base, ntok, kw, vw, U, NG, WPL, TPG, W):
    """Words of the K and V rows of tokens base + u * NG + gid (u < U) of the partition into kw, vw
    (zeros past ntok and past the row)."""
    for u in range(U):
        tt = base + u * NG + gid
        if tt < ntok:
            row = slot_s[tt]
            for cc in range(WPL):
                w = lane + TPG * cc
                if w < W:
                    kw[u * WPL + cc] = np.uint64(k[row, kvh, w])
                    vw[u * WPL + cc] = np.uint64(v[row, kvh, w])
                else:
                    kw[u * WPL + cc] = np.uint64(0)
                    vw[u * WPL + cc] = np.uint64(0)
        else:
            for cc in range(WPL):
                kw[u * WPL + cc] = np.uint64(0)
                vw[u * WPL + cc] = np.uint64(0)


@functools.cache
def decode_kernel(D: int, q_code: int, kv_code: int, out_code: int, word_bits: int, TPG: int,
                  NT: int, R: int, PT: int, U: int = 2, PF: bool = False):
    """The decode kernel specialized on head_dim, dtype codes, word size and geometry (U: tokens
    each lane group loads at once; PF: issue the next U tokens' loads before the math on these)."""
    EB = ELEM_BITS[kv_code]
    E = word_bits // EB            # elements per word
    W = D // E                     # words per row
    WPL = (W + TPG - 1) // TPG     # words per lane
    EPL = WPL * E                  # elements per lane
    NG = NT // TPG                 # lane groups per block
    SHFL = not SIM                 # warp shuffles (the simulator has none)
    NPART = NT // 32 if SHFL else NG   # partial results per block after the in-warp merge
    LOG_TPG = _log2(TPG)
    LOG_CROSS = _log2(32 // TPG) if SHFL else 0
    MASK = np.uint64((1 << EB) - 1)
    Q_F32 = q_code == F32
    OUT_F32 = out_code == F32
    NEG_INF = float32(-np.inf)
    ACC_N = R * EPL                # accumulator registers per lane
    UW = U * WPL                   # words in flight per lane, per pool
    UR = U * R

    @cuda.jit(cache=True)
    def kernel(q, k, v, table, seq_lens, bs, qk_scale, out_scale, causal, out, lse, po, pml, flag):
        tid = cuda.threadIdx.x
        part = cuda.blockIdx.y
        n_parts = cuda.gridDim.y
        H = q.shape[1]
        Sq = q.shape[2]
        Hkv = k.shape[1]
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
        slot_s = cuda.shared.array(PT, int64)
        ml_s = cuda.shared.array((NPART, R, 2), float32)
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
        for j in range(tid, ntok, NT):
            t = t0 + j
            slot_s[j] = int64(table[b, t // bs]) * bs + t % bs
        cuda.syncthreads()

        lane = tid % TPG
        gid = tid // TPG
        # This lane's slice of the q rows, in registers: dims (lane + TPG * cc) * E + e.
        qreg = cuda.local.array(ACC_N, float32)
        for cc in range(WPL):
            w = lane + TPG * cc
            for e in range(E):
                for r in range(R):
                    qreg[r * EPL + cc * E + e] = q_s[r, w * E + e] if w < W else float32(0.0)
        acc = cuda.local.array(ACC_N, float32)
        for i in range(ACC_N):
            acc[i] = 0.0
        m = cuda.local.array(R, float32)
        lsum = cuda.local.array(R, float32)
        for r in range(R):
            m[r] = NEG_INF
            lsum[r] = 0.0
        kw = cuda.local.array(UW, np.uint64)
        vw = cuda.local.array(UW, np.uint64)
        kn = cuda.local.array(UW, np.uint64)
        vn = cuda.local.array(UW, np.uint64)
        s = cuda.local.array(UR, float32)
        first = L - Sq                 # position of query 0; query i sees tokens t <= first + i
        if PF:
            _load_rows(k, v, slot_s, kvh, lane, gid, 0, ntok, kw, vw, U, NG, WPL, TPG, W)
        for base in range(0, ntok, NG * U):
            # All K and V loads of the U tokens first, then the math: bytes in flight. With PF the
            # loads of the next U tokens are issued before the math on these (software pipeline).
            if PF:
                _load_rows(k, v, slot_s, kvh, lane, gid, base + NG * U, ntok, kn, vn, U, NG, WPL, TPG, W)
            else:
                _load_rows(k, v, slot_s, kvh, lane, gid, base, ntok, kw, vw, U, NG, WPL, TPG, W)
            for i in range(UR):
                s[i] = 0.0
            for u in range(U):
                for cc in range(WPL):
                    word = kw[u * WPL + cc]
                    for e in range(E):
                        x = decode_bits((word >> np.uint64(e * EB)) & MASK, kv_code)
                        for r in range(R):
                            s[u * R + r] += x * qreg[r * EPL + cc * E + e]
            if SHFL:
                for sh in range(LOG_TPG):
                    for i in range(UR):
                        s[i] += cuda.shfl_xor_sync(0xFFFFFFFF, s[i], TPG >> (sh + 1))
            # Mask, then the online softmax of this group (every lane holds the same scores).
            for u in range(U):
                tt = base + u * NG + gid
                for r in range(R):
                    gr = rc * R + r
                    x = s[u * R + r]
                    if tt < ntok and gr < rows and (not causal or t0 + tt <= first + gr % Sq):
                        if lane == 0 and not abs(x) < np.inf:
                            flag[0] = 1
                    else:
                        x = NEG_INF
                    s[u * R + r] = x
            for r in range(R):
                mx = m[r]
                for u in range(U):
                    mx = max(mx, s[u * R + r])
                if mx > m[r]:
                    sc = math.exp2(m[r] - mx)
                    lsum[r] *= sc
                    for j in range(EPL):
                        acc[r * EPL + j] *= sc
                    m[r] = mx
                for u in range(U):
                    p = float32(0.0)
                    if mx > NEG_INF:
                        p = math.exp2(s[u * R + r] - mx)
                    s[u * R + r] = p
                    lsum[r] += p
            for u in range(U):
                for cc in range(WPL):
                    word = vw[u * WPL + cc]
                    for e in range(E):
                        x = decode_bits((word >> np.uint64(e * EB)) & MASK, kv_code)
                        for r in range(R):
                            acc[r * EPL + cc * E + e] += s[u * R + r] * x
            if PF:
                for i in range(UW):
                    kw[i] = kn[i]
                    vw[i] = vn[i]
        # Merge the groups of a warp (butterfly over the lane-group bits), then the warps.
        if SHFL:
            for sh in range(LOG_CROSS):
                off = 16 >> sh
                for r in range(R):
                    mo = cuda.shfl_xor_sync(0xFFFFFFFF, m[r], off)
                    lo = cuda.shfl_xor_sync(0xFFFFFFFF, lsum[r], off)
                    mn = max(m[r], mo)
                    sa = float32(0.0)
                    sb = float32(0.0)
                    if mn > NEG_INF:
                        sa = math.exp2(m[r] - mn)
                        sb = math.exp2(mo - mn)
                    lsum[r] = lsum[r] * sa + lo * sb
                    for j in range(EPL):
                        ao = cuda.shfl_xor_sync(0xFFFFFFFF, acc[r * EPL + j], off)
                        acc[r * EPL + j] = acc[r * EPL + j] * sa + ao * sb
                    m[r] = mn
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
            if lane == 0:
                for r in range(R):
                    ml_s[pidx, r, 0] = m[r]
                    ml_s[pidx, r, 1] = lsum[r]
        cuda.syncthreads()

        for idx in range(tid, R * D, NT):
            r = idx // D
            d = idx % D
            gr = rc * R + r
            if gr < rows:
                h = kvh * G + gr // Sq
                i = gr % Sq
                mm = NEG_INF
                for p in range(NPART):
                    mm = max(mm, ml_s[p, r, 0])
                tot = float32(0.0)
                s_o = float32(0.0)
                if mm > NEG_INF:
                    for p in range(NPART):
                        mp = ml_s[p, r, 0]
                        if mp > NEG_INF:
                            f = math.exp2(mp - mm)
                            tot += ml_s[p, r, 1] * f
                            s_o += red_o[p, r, d] * f
                if n_parts == 1:
                    y = float32(0.0)
                    if tot > 0:
                        y = s_o * float32(out_scale) / tot
                    if OUT_F32:
                        out[b, h, i, d] = y
                    else:
                        out[b, h, i, d] = encode_bits(y, out_code)
                    if d == 0:
                        lse[b, h, i] = (mm + math.log2(tot)) * LN2 if tot > 0 else NEG_INF
                else:
                    po[b, h, i, part, d] = s_o / tot if tot > 0 else float32(0.0)
                    if d == 0:
                        pml[b, h, i, part, 0] = mm if tot > 0 else NEG_INF
                        pml[b, h, i, part, 1] = tot

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
