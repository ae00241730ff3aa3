"""Split-K paged decode on the GPU (flash-decoding over a block table) and its merge.

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq queries per sequence, D head_dim,
N physical blocks, bs block_size, M max blocks per sequence; R query rows per thread block.

``decode_kernel(...)`` arguments (C-contiguous device arrays, validated by ``ops/config.py``):

- ``q``      [rows, D] storage of q (float32, uint16 bits, uint8 FP8 codes): q [B, H, Sq, D] or a
  token-major ragged q [T, H, D] viewed as rows; query i of sequence b, head h, is row
  ``work[0, b] + h * stride_h + i * stride_i``
- ``k``, ``v`` the K/V pools [N, bs, Hkv, D] as flat arrays of machine words (uint64 / uint32 /
  uint16 / uint8 views of the storage; W words per row, E = D / W elements per word, decoded in the
  kernel); row (slot s, KV head h) starts at word (s * Hkv + h) * W
- ``table``  int32 [B, M]; token t of sequence b is slot ``t % bs`` of block ``table[b, t // bs]``
- ``seq_lens`` int32 [B]; ``work`` int32 [4, B]: row 0 the first q row of each sequence, row 1
  its query count q_len_b, row 2 the sequences of the decode work list (the grid's x covers
  its first ``n_dec`` entries), row 3 the tiled work list (``paged_attention``)
- ``bs`` the block size; ``n_kv_heads`` Hkv; ``n_heads`` H; ``stride_h``, ``stride_i``;
  ``qk_scale`` multiplies q . k; ``out_scale`` multiplies the output
- ``causal``; ``window`` (-1: none; else query position p sees keys t >= p - window);
  ``softcap`` (used when the factory's SOFTCAP: s = softcap tanh(s / softcap)); ``slopes`` float32
  [H] (ALIBI: s -= slopes[h] |p - t|)
- ``out``    [rows, D] storage of the output dtype, ``lse`` float32 [rows] (one partition)
- ``po``     float32 [n_dec, H, SQ, P, D], ``pml`` float32 [n_dec, H, SQ, P, 2] (several partitions:
  each partition's normalized output, its running max in base 2 and its sum, for ``merge_kernel``)
- ``flag``   int32 [1], set to 1 when a visible score is not finite (the client raises)

Query i of a sequence with q_len queries and L keys sits at p = L - q_len + i (bottom-right).
Partitions start at the first key the window lets any of the sequence's queries see,
``max(0, L - q_len - window)``, so keys before it are never read.

Grid (n_dec * Hkv * row chunks, P partitions), NT threads. A thread block serves R rows of one
(sequence, KV head) -- rows are (GQA head g, query i) pairs, so the whole group shares every K/V
load -- over one partition of PT tokens. The block first resolves the partition's tokens to pool
rows through the block table (once, into shared memory). It then walks the partition in tiles of
TT tokens, software-pipelined: every thread loads its share of the next tile's K and V words into
registers (consecutive threads on consecutive words of a row: coalesced) while the block computes
on the current tile from shared memory, then stores them there. For the math, threads work in
groups of TX lanes (lane l holds words l, l + TX, ... of a row and the matching slice of all R q
rows); each group (token slot) takes every NZ-th token of the tile, decodes each K element once for
the R rows, reduces the dot products with warp shuffles and keeps its own online softmax (running
max and sum in base 2, accumulators in registers): one pass over the cache, no score buffer. Slots
of a warp merge through shuffles, warps through shared memory. Tokens t >= L are never read
(bottom-right causal mask on top).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int32, int64

from ...dtypes import F32
from .codecs import SIM, decode_bits, encode_bits, fp8_pairs, fp8x2_decode

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ELEM_BITS = {0: 32, 1: 16, 2: 16, 3: 8, 4: 8}


def _log2(n: int) -> int:
    return n.bit_length() - 1


@cuda.jit(device=True, inline=True)
def _load_tile(k, v, slot_s, tid, base, ntok, kbuf, vbuf, NT, LPT, TW, W):
    """Words tid + NT * j (j < LPT) of the K and V rows of tokens base .. base + TT - 1 of the
    partition into kbuf, vbuf (consecutive threads on consecutive words of a row; zeros past ntok).
    Indices are cast to unsigned, which spares numba's negative-index wraparound code."""
    for j in range(LPT):
        i = tid + NT * j
        tt = base + i // W
        if (TW % NT == 0 or i < TW) and tt < ntok:
            a = np.uint64(slot_s[np.uint64(tt)] + i % W)
            kbuf[j] = k[a]
            vbuf[j] = v[a]
        else:
            kbuf[j] = 0
            vbuf[j] = 0


@cuda.jit(device=True, inline=True)
def _row_slice(tile, o, tx, xs, WDT, MASK, TX, WPL, E, EB, W, EXACT, kv_code, PAIRS):
    """This lane's elements (tx + TX * cc) * E + e of the tile row starting at word o, decoded into
    xs[cc * E + e] (zeros past the row); PAIRS: FP8 codes two at a time (``fp8x2_decode``)."""
    for cc in range(WPL):
        w = tx + TX * cc
        if EXACT or w < W:
            word = tile[np.uint64(o + w)]
            if PAIRS:
                for e2 in range(E // 2):
                    xs[cc * E + 2 * e2], xs[cc * E + 2 * e2 + 1] = fp8x2_decode(
                        np.uint32((word >> WDT(16 * e2)) & WDT(0xFFFF)), kv_code)
            else:
                for e in range(E):
                    xs[cc * E + e] = decode_bits((word >> WDT(e * EB)) & MASK, kv_code)
        else:
            for e in range(E):
                xs[cc * E + e] = 0.0


@cuda.jit(device=True, inline=True)
def _modify(x, cap, inv_cap, slope, dist, SOFTCAP, ALIBI):
    """A visible score x = scale * q.k (natural units) -> softcap, then ALiBi (dist = p - t), in
    base-2 units for exp2."""
    if SOFTCAP:
        x = cap * math.tanh(x * inv_cap)
    if ALIBI:
        x -= slope * float32(abs(dist))
    return x * float32(LOG2E)


@functools.cache
def decode_kernel(D: int, q_code: int, kv_code: int, out_code: int, word_bits: int, TX: int,
                  NT: int, R: int, PT: int, TT: int, MAXREG: int = 0, SOFTCAP: bool = False,
                  ALIBI: bool = False, HWCVT: bool = False):
    """The decode kernel specialized on head_dim, dtype codes, word size and geometry: TX lanes per
    token row, NT threads, R query rows, PT tokens per partition, TT tokens per shared-memory tile;
    MAXREG caps the registers per thread (0: no cap); SOFTCAP / ALIBI turn the score modifiers on
    (plain attention pays nothing for them); HWCVT: the device has the FP8 -> F16 pair converter
    (sm_89+), which E4M3 K/V then use (E5M2 pairs need none) on geometries with whole rows per lane."""
    EB = ELEM_BITS[kv_code]
    E = word_bits // EB            # elements per word
    W = D // E                     # words per row
    WPL = (W + TX - 1) // TX       # words per lane
    EPL = WPL * E                  # elements per lane
    EXACT = WPL * TX == W          # every lane holds WPL words of the row
    # FP8 codes decoded two at a time -- where every lane holds whole words of the row (EXACT): with
    # the guards of a partial row (D 40 / 80) the pairs' registers spill, so those keep decode_bits.
    PAIRS = fp8_pairs(kv_code, HWCVT) and EXACT
    NZ = NT // TX                  # token slots: thread (tx, tz) = (lane of a row, slot)
    TPS = TT // NZ                 # tokens of a tile per slot
    TW = TT * W                    # words of a tile, per pool
    LPT = (TW + NT - 1) // NT      # words each thread loads per tile, per pool
    SHFL = not SIM                 # warp shuffles (the simulator has none; there TX = 1)
    NPART = NT // 32 if SHFL else NZ   # partial results per block after the in-warp merge
    LOG_TX = _log2(TX)
    LOG_CROSS = _log2(32 // TX) if SHFL else 0
    WDT = {64: np.uint64, 32: np.uint32, 16: np.uint16, 8: np.uint8}[word_bits]
    MASK = WDT((1 << EB) - 1)
    Q_F32 = q_code == F32
    OUT_F32 = out_code == F32
    NEG_INF = float32(-np.inf)
    MOD = SOFTCAP or ALIBI         # scores are modified in natural units, then scaled to base 2
    ACC_N = R * EPL                # q and accumulator registers per thread
    SLOPE_N = R if ALIBI else 1
    SC_N = TPS * R                 # scores per thread and tile
    assert NZ >= 1 and TT % NZ == 0 and (TX == 1 or SHFL) and (not SHFL or 32 % TX == 0)

    @cuda.jit(cache=True, **({} if SIM else {"max_registers": MAXREG or None}))
    def kernel(q, k, v, table, seq_lens, work, bs, n_kv_heads, n_heads, stride_h, stride_i, qk_scale,
               out_scale, causal, window, softcap, slopes, out, lse, po, pml, flag):
        # MAXREG is named here so that it is a closure variable of the kernel, hence part of numba's
        # on-disk cache key (the max_registers option alone is not).
        tid = cuda.threadIdx.x + 0 * MAXREG
        tx = tid % TX
        tz = tid // TX
        part = cuda.blockIdx.y
        n_parts = cuda.gridDim.y
        H = n_heads
        Hkv = n_kv_heads
        G = H // Hkv
        SQ = po.shape[2]               # most queries of a decode sequence (the grid's row chunks)
        n_rc = (G * SQ + R - 1) // R
        by = cuda.blockIdx.x
        wi = by // (Hkv * n_rc)        # entry of the decode work list
        kvh = by // n_rc % Hkv
        rc = by % n_rc
        b = work[2, wi]
        Sq = work[1, b]
        row0 = work[0, b]
        rows = G * Sq
        if rc * R >= rows:             # a row chunk this sequence does not have (whole block)
            return
        L = seq_lens[b]
        first = L - Sq                 # position of query 0; query i sees tokens t <= first + i
        kstart = 0
        if window >= 0:
            kstart = max(0, first - window)
        t0 = kstart + part * PT
        ntok = max(0, min(PT, L - t0))

        slot_s = cuda.shared.array(PT, int64)
        ks = cuda.shared.array(TW, WDT)
        vs = cuda.shared.array(TW, WDT)
        ml_s = cuda.shared.array((NPART, R, 2), float32)
        red_o = cuda.shared.array((NPART, R, D), float32)

        for j in range(tid, ntok, NT):
            t = t0 + j
            slot_s[j] = ((int64(table[b, t // bs]) * bs + t % bs) * Hkv + kvh) * W
        # This lane's slice of the R q rows, scaled, in registers: dims (tx + TX * cc) * E + e.
        c = float32(qk_scale) if MOD else float32(qk_scale * LOG2E)
        cap = float32(softcap)
        inv_cap = float32(1.0) / cap if SOFTCAP else float32(0.0)
        qreg = cuda.local.array(ACC_N, float32)
        rpos = cuda.local.array(R, int32)      # each row's absolute query position
        rslope = cuda.local.array(SLOPE_N, float32)   # each row's ALiBi slope (ALIBI only)
        for r in range(R):
            gr = rc * R + r
            rpos[r] = first + gr % Sq
            if ALIBI:
                rslope[r] = slopes[kvh * G + gr // Sq] if gr < rows else float32(0.0)
            qrow = row0 + (kvh * G + gr // Sq) * stride_h + (gr % Sq) * stride_i
            for cc in range(WPL):
                w = tx + TX * cc
                for e in range(E):
                    x = float32(0.0)
                    if gr < rows and (EXACT or w < W):
                        if Q_F32:
                            x = q[qrow, w * E + e]
                        else:
                            x = decode_bits(q[qrow, w * E + e], q_code)
                    qreg[r * EPL + cc * E + e] = x * c
        acc = cuda.local.array(ACC_N, float32)
        for i in range(ACC_N):
            acc[i] = 0.0
        m = cuda.local.array(R, float32)
        mnew = cuda.local.array(R, float32)
        fac = cuda.local.array(R, float32)
        lsum = cuda.local.array(R, float32)
        for r in range(R):
            m[r] = NEG_INF
            mnew[r] = NEG_INF
            lsum[r] = 0.0
        kbuf = cuda.local.array(LPT, WDT)
        vbuf = cuda.local.array(LPT, WDT)
        sc = cuda.local.array(SC_N, float32)
        xs = cuda.local.array(EPL, float32)    # one tile row's slice, decoded
        cuda.syncthreads()

        # Software pipeline: the loads of tile i + 1 are in flight while tile i is used from shared
        # memory, so every thread keeps LPT words per pool on the way during the math.
        _load_tile(k, v, slot_s, tid, 0, ntok, kbuf, vbuf, NT, LPT, TW, W)
        for base in range(0, ntok, TT):
            cuda.syncthreads()         # the previous tile is no longer read
            for j in range(LPT):
                i = tid + NT * j
                if TW % NT == 0 or i < TW:
                    ks[np.uint64(i)] = kbuf[j]
                    vs[np.uint64(i)] = vbuf[j]
            cuda.syncthreads()
            if base + TT < ntok:
                _load_tile(k, v, slot_s, tid, base + TT, ntok, kbuf, vbuf, NT, LPT, TW, W)
            # Scores of this slot's tokens tz, tz + NZ, ... of the tile for the R rows: each K
            # element is decoded once and used by every row.
            for i in range(SC_N):
                sc[i] = 0.0
            for j in range(TPS):
                _row_slice(ks, (tz + NZ * j) * W, tx, xs, WDT, MASK, TX, WPL, E, EB, W, EXACT, kv_code, PAIRS)
                for i in range(EPL):
                    for r in range(R):
                        sc[j * R + r] += xs[i] * qreg[r * EPL + i]
            if SHFL:
                for sh in range(LOG_TX):
                    for i in range(SC_N):
                        sc[i] += cuda.shfl_xor_sync(0xFFFFFFFF, sc[i], TX >> (sh + 1))
            # Modify (softcap, ALiBi), mask (only a tile that reaches past the partition, the causal
            # edge or the window's needs it), then the online softmax (every lane of a group holds
            # the same scores).
            whole = (base + TT <= ntok and (not causal or t0 + base + TT - 1 <= first)
                     and (window < 0 or t0 + base >= first + Sq - 1 - window))
            for j in range(TPS):
                tt = base + tz + NZ * j
                for r in range(R):
                    x = sc[j * R + r]
                    if whole or (tt < ntok and (not causal or t0 + tt <= rpos[r])
                                 and (window < 0 or t0 + tt >= rpos[r] - window)):
                        if not abs(x) < np.inf:
                            flag[0] = 1
                        if MOD:
                            x = _modify(x, cap, inv_cap, rslope[r] if ALIBI else float32(0.0), rpos[r] - (t0 + tt),
                                        SOFTCAP, ALIBI)
                    else:
                        x = NEG_INF
                    sc[j * R + r] = x
            # (Loops over rows are innermost and short, so that they unroll: a register array indexed
            # by a loop variable that does not unroll would live in local memory.)
            for j in range(TPS):
                for r in range(R):
                    mnew[r] = max(mnew[r], sc[j * R + r])
            for r in range(R):
                f = float32(1.0)
                if mnew[r] > m[r]:
                    f = math.exp2(m[r] - mnew[r])
                fac[r] = f
                lsum[r] *= f
                m[r] = mnew[r]
            for i in range(EPL):
                for r in range(R):
                    acc[r * EPL + i] *= fac[r]
            for j in range(TPS):
                for r in range(R):
                    p = float32(0.0)
                    if m[r] > NEG_INF:
                        p = math.exp2(sc[j * R + r] - m[r])
                    sc[j * R + r] = p
                    lsum[r] += p
            for j in range(TPS):
                _row_slice(vs, (tz + NZ * j) * W, tx, xs, WDT, MASK, TX, WPL, E, EB, W, EXACT, kv_code, PAIRS)
                for i in range(EPL):
                    for r in range(R):
                        acc[r * EPL + i] += sc[j * R + r] * xs[i]

        # Merge the slots of a warp (butterfly over the slot bits of the lane), then the warps.
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
                    for i in range(EPL):
                        ao = cuda.shfl_xor_sync(0xFFFFFFFF, acc[r * EPL + i], off)
                        acc[r * EPL + i] = acc[r * EPL + i] * sa + ao * sb
                    m[r] = mn
            pidx = tid // 32
            writer = tid % 32 < TX
        else:
            pidx = tz
            writer = True
        if writer:
            for cc in range(WPL):
                w = tx + TX * cc
                if EXACT or w < W:
                    for e in range(E):
                        for r in range(R):
                            red_o[pidx, r, w * E + e] = acc[r * EPL + cc * E + e]
            if tx == 0:
                for r in range(R):
                    ml_s[pidx, r, 0] = m[r]
                    ml_s[pidx, r, 1] = lsum[r]
        cuda.syncthreads()

        for idx in range(tid, R * D, NT):
            r = idx // D
            d = idx % D
            gq = rc * R + r
            if gq < rows:
                h = kvh * G + gq // Sq
                i = gq % Sq
                orow = row0 + h * stride_h + i * stride_i
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
                        out[orow, d] = y
                    else:
                        out[orow, d] = encode_bits(y, out_code)
                    if d == 0:
                        lse[orow] = (mm + math.log2(tot)) * LN2 if tot > 0 else NEG_INF
                else:
                    po[wi, h, i, part, d] = s_o / tot if tot > 0 else float32(0.0)
                    if d == 0:
                        pml[wi, h, i, part, 0] = mm if tot > 0 else NEG_INF
                        pml[wi, h, i, part, 1] = tot

    return kernel


@functools.cache
def merge_kernel(D: int, out_code: int, NT: int):
    """Combine P partitions: out = sum_p l_p 2^(m_p - m) o_p / sum_p l_p 2^(m_p - m).
    Grid n_dec * H * SQ blocks of NT threads (po, pml [n_dec, H, SQ, P, ...] as the decode kernel
    writes them; out [rows, D], lse [rows] addressed through ``work`` like the decode kernel)."""
    OUT_F32 = out_code == F32
    NEG_INF = float32(-np.inf)

    @cuda.jit(cache=True)
    def kernel(po, pml, work, stride_h, stride_i, out_scale, out, lse):
        H = po.shape[1]
        SQ = po.shape[2]
        P = po.shape[3]
        x = cuda.blockIdx.x
        wi = x // (H * SQ)
        h = x // SQ % H
        i = x % SQ
        b = work[2, wi]
        if i >= work[1, b]:
            return
        orow = work[0, b] + h * stride_h + i * stride_i
        m = NEG_INF
        for p in range(P):
            m = max(m, pml[wi, h, i, p, 0])
        total = float32(0.0)
        if m > NEG_INF:
            for p in range(P):
                mp = pml[wi, h, i, p, 0]
                if mp > NEG_INF:
                    total += pml[wi, h, i, p, 1] * math.exp2(mp - m)
        for d in range(cuda.threadIdx.x, D, NT):
            acc = float32(0.0)
            if total > 0:
                for p in range(P):
                    mp = pml[wi, h, i, p, 0]
                    if mp > NEG_INF:
                        acc += po[wi, h, i, p, d] * (pml[wi, h, i, p, 1] * math.exp2(mp - m))
                acc = acc * float32(out_scale) / total
            if OUT_F32:
                out[orow, d] = acc
            else:
                out[orow, d] = encode_bits(acc, out_code)
        if cuda.threadIdx.x == 0:
            lse[orow] = (m + math.log2(total)) * LN2 if total > 0 else NEG_INF

    return kernel
