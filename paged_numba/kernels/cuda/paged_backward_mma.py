"""Paged-attention backward on tensor cores (FlashAttention-2's dK / dV pass with dQ by atomics) for
F16 / BF16, and F32 as 3xTF32, at head dims that are multiples of 16, over a block table.

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq_b queries of sequence b, D
head_dim, N physical blocks, bs block_size, M max blocks per sequence; R = G * Sq_b query rows per
(sequence, KV head) -- row r is query ``r // G`` of head ``kvh * G + r % G``, the forward's order;
NW warps, BK = 16 * NW keys per thread block, BQ query rows per step, DP = D + 8, BQP = BQ + 8.

``dkdvq_kernel(...)`` arguments (C-contiguous device arrays, validated by ``ops/config.py``):

- ``q``, ``dout`` flat uint16 (F32: the float32 bits as uint32) [rows * D]: query i of sequence b, head h, is row
  ``work[0, b] + h * stride_h + i * stride_i`` (dense [B, H, Sq, D] or ragged token-major [T, H, D])
- ``k``, ``v`` flat uint16 (F32: uint32) [N * bs * Hkv * D]: the pools [N, bs, Hkv, D]
- ``table`` int32 [B, M], ``seq_lens`` int32 [B], ``work`` int32 [4, B] (row 0 first q row, row
  1 q_len), ``H``, ``stride_h``, ``stride_i``, ``bs``, ``Hkv``, ``scale``, ``causal``
  (bottom-right), ``window`` (WINDOW flag: a query at p sees keys j >= p - window)
- ``lse2`` float32 [rows]: lse * log2 e; ``delta`` float32 [rows]: rowsum(dout * out)
  (``paged_attention_bwd.delta_kernel``)
- ``dk``, ``dv`` float32 [N * bs * Hkv * D], ``dq`` float32 [rows * D], zeroed: gradients are added
  with ``cuda.atomic.add`` (a pool slot shared by several sequences gets the sum, in any order)

Grid (B * Hkv, ceil(longest key span / BK)), 32 * NW threads. A block owns BK keys of one
(sequence, KV head), from the first key the window lets the sequence's queries see; its K and V
tiles are gathered through the block table with ``cp.async`` into shared memory (rows padded to DP:
``ldmatrix`` without bank conflicts) and stay there. It walks the query rows that can see the tile
(causal: from the first row at or after its first key; window: up to the last row whose window
reaches its last key), BQ rows a step, the step's q / dout rows double buffered in shared memory
(the copy of step s + 1 runs during step s). Warp w owns keys 16 w .. 16 w + 15 and computes, on
``mma.sync``, S^T = K Q^T and dP^T = V dO^T (keys x rows, K / V fragments by ``ldmatrix``, q / dout
fragments by ``ldmatrix``), P^T = 2^(c S^T - lse2) and dS^T = P^T (dP^T - delta) in registers
(masked only in steps that cross a bound: causal diagonal, window edge, keys past L), repacks them
into A fragments without leaving registers, and accumulates dV += P^T dO and dK += dS^T Q
(``ldmatrix.trans``) in float32 registers for the whole walk. dS^T goes to shared memory as 16-bit
(double buffered); after the next step's barrier -- one barrier per step -- the block computes dQ =
scale dS K for the step (A fragments of dS by ``ldmatrix.trans``, K by ``ldmatrix.trans``) in
units of 16 rows x DC columns spread over the warps and adds it into ``dq`` with atomics (with
VRED, sm_90: one ``red.global.add.v2.f32`` per pair of adjacent columns). At the end dK (times
scale) and dV are added once into the pool gradients. Keys t >= L are zero-filled, never read;
rows past R get lse2 = +inf (P = 0), so NaN in unused slots or rows cannot reach a result. dQ
rows that get atomics from three or more key tiles are not bit-reproducible from run to run (the
order of float32 additions varies), as in FlashAttention-2.

F32 (3xTF32, ``TF``): the same walk over 32-bit tiles. ldmatrix moves 16-bit elements, so every
fragment element is read from shared memory (16-byte reads of rows g / g + 8 for the S^T and dP^T
operands, 8-byte reads of rows 2 t, 2 t + 1 for the dV / dK B operands and of rows t, t + 4 of K
for dQ), split into a TF32 high part and a residual (``tf32_split``) and every product is three
m16n8k8 TF32 mma (``mma3_rn``: each k-step's three into zeroed accumulators, then a float32
add -- longer tensor-core accumulation chains measured up to 2.7x the SIMT kernels' error). The
mma's k index is permuted within 16-dim chunks for S^T / dP^T (alike in both operands), and the
accumulators of P^T / dS^T are the A fragments of dV / dK (k = t <-> row 2 t, k = t + 4 <-> row
2 t + 1), whose n index pairs two n-tiles per 16 dims; dS^T goes to shared memory as float32.
Both read patterns are free of bank conflicts through row pitches and per-row shifts
(``tf32_pitches``, ``kv_shift``, ``q_shift``) rather than column swizzles, so each read's column is
a compile-time offset.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, int32, uint16, uint32

from ...dtypes import F32
from .codecs import SIM, f2u, i2f
from .mma import (cp_async16, cp_async_commit, cp_async_wait_all, exp2_approx, lds2, ldsm_x4, ldsm_x4_t, mma,
                  mma3_rn, pack2, red_add2, split4, tf32_split, udiv32)
from .paged_decode import LOG2E
from .prefill_staging import load_kv, q_row, resolve_slots


@cuda.jit(device=True, inline=True)
def _add2(a, i, x, y, VRED):
    """a[i] += x, a[i + 1] += y atomically (i even): one vector reduction with VRED (sm_90), else two."""
    if VRED:
        red_add2(a, i, x, y)
    else:
        cuda.atomic.add(a, i, x)
        cuda.atomic.add(a, i + 1, y)


@cuda.jit(device=True, inline=True)
def q_shift(row):
    """Words by which row ``row`` of a 32-bit q / dout tile of the 3xTF32 backward starts after row *
    pitch: 8 (row % 2 + (row >> 2) % 2). With a pitch of 8 (mod 32) words, the 16-byte reads of
    rows g, g + 1 and the 8-byte reads of rows 2 t (and 2 t + 1) at 2 g then hit 32 distinct banks
    (``tf32_pitches``)."""
    return 8 * ((row & 1) + ((row >> 2) & 1))


@cuda.jit(device=True, inline=True)
def _load_rows(sm, q, dout, R0, R, uG, kvh, row0, stride_h, stride_i, qoff, doff, tid, NT, BQ, D, DP, E, SWZ):
    """Start the 16-byte copies (E elements) of the q and dout rows R0 .. R0 + BQ - 1 (zeros past R)
    into the step buffers at qoff / doff (SWZ: rows shifted by ``q_shift``)."""
    CH = D // E
    for i in range((BQ * CH + NT - 1) // NT):
        c = tid + NT * i
        if BQ * CH % NT and c >= BQ * CH:
            break
        row = c // CH
        ch = c % CH
        r = R0 + np.uint32(row)
        src = np.int64(0)
        n = 0
        if r < R:
            qi = udiv32(r, uG)
            src = q_row(row0, kvh * uG + (r - qi * uG), qi, stride_h, stride_i) * D + ch * E
            n = 16
        col = q_shift(row) + ch * E if SWZ else ch * E
        cp_async16(sm, qoff + row * DP + col, q, src, n)
        cp_async16(sm, doff + row * DP + col, dout, src, n)


@cuda.jit(device=True, inline=True)
def _load_meta(l2s, dls, pos, lse2, delta, R0, R, uG, kvh, row0, stride_h, stride_i, first, tid, NT, BQ):
    """Per row of the step: lse2 (+inf past R and for rows without keys: P = 0), delta, position."""
    for rr in range(tid, BQ, NT):
        r = R0 + np.uint32(rr)
        l2 = float32(np.inf)
        dl = float32(0.0)
        p = int32(0)
        if r < R:
            qi = udiv32(r, uG)
            x = q_row(row0, kvh * uG + (r - qi * uG), qi, stride_h, stride_i)
            l2 = lse2[x]
            if not l2 > float32(-np.inf):
                l2 = float32(np.inf)
            dl = delta[x]
            p = first + int32(qi)
        l2s[rr] = l2
        dls[rr] = dl
        pos[rr] = p


def tf32_pitches(D: int) -> tuple:
    """(K / V, q / dout) row pitches in 32-bit words of the 3xTF32 backward's tiles: at least D + 8
    and 16 (mod 32), at least D + 16 and 8 (mod 32) -- room for the row shifts ``kv_shift`` (up to
    8) and ``q_shift`` (up to 16), and the residues that make the shifted rows' reads free of bank
    conflicts."""
    pk = D + 8 + (16 - (D + 8)) % 32
    pq = D + 16 + (8 - (D + 16)) % 32
    return pk, pq


@cuda.jit(device=True, inline=True)
def _tf32_rows_x_tile(acc, sm, xo, yo, ah, al, bh, bl, w, g, t4, PK, PQ, D, NS):
    """acc[0 : 4 NS] = X Y^T for this warp's 16 rows of the K / V tile X (rows 16 w ..) and the NS * 8
    rows of the q / dout tile Y (32-bit tiles at xo / yo): S^T = K Q^T, dP^T = V dO^T. Over 16-dim
    chunks, two k-steps each with the dims permuted alike in X and Y (k-step h: k = t is dim 4 t +
    2 h, k = t + 4 dim 4 t + 2 h + 1), so one 16-byte read gives a row's elements of both k-steps."""
    xa = xo + (16 * w + g) * PK + 8 * ((g >> 1) & 1) + 4 * t4     # kv_shift of rows 16 w + g (+ 8)
    ya = yo + g * PQ + 8 * ((g & 1) + ((g >> 2) & 1)) + 4 * t4     # q_shift of rows nt * 8 + g
    for i in range(4 * NS):
        acc[i] = 0.0
    for c in range(D // 16):
        split4(sm, xa + 16 * c, ah, al, 0, 2)               # row g: a0 / a2 of each k-step
        split4(sm, xa + 8 * PK + 16 * c, ah, al, 1, 2)      # row g + 8: a1 / a3
        for nt in range(NS):
            split4(sm, ya + nt * 8 * PQ + 16 * c, bh, bl, 0, 1)
            for h in range(2):
                mma3_rn(acc, nt * 4, ah, al, 4 * h, bh, bl, 2 * h)


@cuda.jit(device=True, inline=True)
def _tf32_grad(acc, src, sm, yo, ah, al, bh, bl, g, t4, PQ, D, NS):
    """acc[0 : D / 2] += A Y for A^T = the step's 16 x (NS * 8) accumulators ``src`` (P^T or dS^T of
    this warp's keys) and Y the step's q or dout tile: dV += P^T dO, dK += dS^T Q. k-step kk is
    n-tile kk of ``src`` with k = t <-> row 2 t, k = t + 4 <-> row 2 t + 1, so the accumulators are
    the A fragments; in the n-tiles 2 c, 2 c + 1, n = g is dim 16 c + 2 g, 16 c + 2 g + 1 (one 8-byte
    read of a Y row gives both); acc[8 c + i]: key g (+ 8 for i % 4 >= 2), dims 16 c + 4 t + (0, 2,
    0, 2, 1, 3, 1, 3)[i]."""
    y0 = yo + 2 * t4 * PQ + 8 * (t4 >> 1) + 2 * g           # row 2 t (q_shift: 8 (t >> 1), + 8 for 2 t + 1)
    for kk in range(NS):
        for j in range(4):
            ah[kk * 4 + j], al[kk * 4 + j] = tf32_split(src[kk * 4 + 2 * (j % 2) + j // 2])
    for c in range(D // 16):
        for kk in range(NS):
            for j in range(2):          # rows 2 t (b0) and 2 t + 1 (b1) of the k-step
                x0, x1 = lds2(sm, y0 + (kk * 8 + j) * PQ + 8 * j + 16 * c)
                bh[j], bl[j] = tf32_split(i2f(x0))
                bh[2 + j], bl[2 + j] = tf32_split(i2f(x1))
            mma3_rn(acc, 8 * c, ah, al, kk * 4, bh, bl, 0)
            mma3_rn(acc, 8 * c + 4, ah, al, kk * 4, bh, bl, 2)


@cuda.jit(device=True, inline=True)
def _tf32_dq(dqa, sm, so, ko, c0, ah, al, bh, bl, g, t4, PK, BQP, BK, DC):
    """dqa[0 : DC / 2] = dS K for 16 rows and the DC columns from c0: A from the dS^T tile at ``so``
    (this unit's first row; natural k: keys 8 kb + t, + 4), B from the K tile at ``ko`` (n-tiles
    paired as in ``_tf32_grad``). dqa[8 dd + i]: row g (+ 8 for i % 4 >= 2), dims 16 dd + 4 t +
    (0, 2, 0, 2, 1, 3, 1, 3)[i]."""
    kr = ko + t4 * PK + 8 * (t4 >> 1) + c0 + 2 * g          # K row t (kv_shift 8 (t >> 1), as row t + 4)
    for i in range(DC // 2):
        dqa[i] = 0.0
    for kb in range(BK // 8):
        a = so + (8 * kb + t4) * BQP + g
        ah[0], al[0] = tf32_split(i2f(sm[a]))
        ah[1], al[1] = tf32_split(i2f(sm[a + 8]))
        ah[2], al[2] = tf32_split(i2f(sm[a + 4 * BQP]))
        ah[3], al[3] = tf32_split(i2f(sm[a + 4 * BQP + 8]))
        for dd in range(DC // 16):
            x0, x1 = lds2(sm, kr + 8 * kb * PK + 16 * dd)
            y0, y1 = lds2(sm, kr + (8 * kb + 4) * PK + 16 * dd)
            bh[0], bl[0] = tf32_split(i2f(x0))
            bh[1], bl[1] = tf32_split(i2f(y0))
            bh[2], bl[2] = tf32_split(i2f(x1))
            bh[3], bl[3] = tf32_split(i2f(y1))
            mma3_rn(dqa, dd * 8, ah, al, 0, bh, bl, 0)
            mma3_rn(dqa, dd * 8 + 4, ah, al, 0, bh, bl, 2)


@cuda.jit(device=True, inline=True)
def _tf32_add(a, base, x, o, s, VRED):
    """a[base + 0 .. 3] += s * (x[o], x[o + 4], x[o + 1], x[o + 5]): one row's 4 adjacent gradient
    dims of a 3xTF32 accumulator chunk (``_tf32_grad`` / ``_tf32_dq`` layout)."""
    _add2(a, base, x[o] * s, x[o + 4] * s, VRED)
    _add2(a, base + 2, x[o + 1] * s, x[o + 5] * s, VRED)


@functools.cache
def dkdvq_kernel(D: int, kind: int, NW: int, BQ: int, WINDOW: bool = False, VRED: bool = False, MAXREG: int = 0):
    """The tensor-core backward for head dim D (a multiple of 16), type ``kind`` (BF16 / F16: q,
    dout, K / V of 16 bits, m16n8k16 mma; F32: float32 everywhere, every product as 3xTF32 m16n8k8
    mma on swizzled 32-bit tiles), NW warps (BK = 16 * NW keys per block) and BQ query rows per step
    (a multiple of 16); WINDOW turns the sliding window on; VRED adds each thread's gradient pairs
    with one vector reduction (sm_90) instead of two atomics; MAXREG caps the registers per thread
    (0: no cap)."""
    TF = kind == F32
    NT = 32 * NW
    BK = 16 * NW
    E = 4 if TF else 8           # tile elements per 16-byte copy
    DP = D + 8                   # 16-bit tiles: rows padded for ldmatrix
    PK, PQ = tf32_pitches(D) if TF else (DP, DP)    # row pitches of the K / V and the q / dout tiles
    BQP = BQ + 8
    TILE_T = uint32 if TF else uint16
    KS = D // 16                 # k-steps of S^T = K Q^T and dP^T = V dO^T
    NS = BQ // 8                 # n-tiles of S^T / dP^T (rows of the step)
    NO = D // 8                  # n-tiles of dK / dV
    MQ = BQ // 16                # m-tiles of dQ
    # dQ columns per unit of work: 32 where that still gives every warp a unit (else 16: at 16-row
    # steps and D 128, 32-column units would leave half the warps idle in the dQ phase)
    DC = 32 if D % 32 == 0 and (BQ // 16) * (D // 32) >= NW else 16
    UNITS = MQ * (D // DC)
    UPW = -(-UNITS // NW)        # units per warp (the last ones repeat a unit, without the atomics)
    KOFF, VOFF = 0, BK * PK      # smem (TILE_T elements): K | V | Q0 Q1 | dO0 dO1 | dS^T0 dS^T1
    QOFF = 2 * BK * PK
    DOFF = QOFF + 2 * BQ * PQ
    SOFF = DOFF + 2 * BQ * PQ
    TILE = BQ * PQ
    STILE = BK * BQP             # one dS^T buffer (TILE_T elements: 16-bit, F32 32-bit)
    S_N = NS * 4
    P_N = 1 if TF else BQ // 4
    G_N = NO * 4
    Q_N = DC // 2
    A_N, B_N = (max(4 * NS, 8), 4) if TF else (1, 1)     # TF32: split fragments (hi / lo)

    @cuda.jit(cache=True, **({} if SIM or not MAXREG else {"max_registers": MAXREG}))
    def kernel(q, dout, k, v, table, seq_lens, work, H, stride_h, stride_i, bs, Hkv, scale, causal, window,
               lse2, delta, dk, dv, dq):
        sm = cuda.shared.array(0, TILE_T)
        sm32 = cuda.shared.array(0, uint32)
        # MAXREG is named here so that it is a closure variable of the kernel, hence part of numba's
        # on-disk cache key (the max_registers option alone is not)
        tid = cuda.threadIdx.x + 0 * MAXREG
        lane = tid % 32
        w = tid // 32
        g = lane // 4
        t4 = lane % 4
        l8 = lane % 8
        m8 = lane // 8
        uG = np.uint32(H // Hkv)
        b = cuda.blockIdx.x // Hkv
        kvh = cuda.blockIdx.x % Hkv
        Sq = work[1, b]
        L = seq_lens[b]
        first = L - Sq                      # position of query 0
        kstart = 0
        if WINDOW:
            kstart = max(0, first - window)
        k0 = kstart + cuda.blockIdx.y * BK
        if k0 >= L or Sq == 0:              # the whole block
            return
        R = np.uint32(uG * np.uint32(Sq))
        row0 = work[0, b]
        # Rows that see a key of [k0, k0 + BK): causal, query positions >= k0; window, <= the
        # last key + window.
        r_lo = np.uint32(0)
        if causal:
            r_lo = np.uint32(np.uint32(max(0, k0 - first)) * uG)
        r_hi = R
        if WINDOW:
            r_hi = np.uint32(min(R, np.uint32(np.uint32(max(0, k0 + BK + window - first)) * uG)))
        if r_hi <= r_lo:                    # no row sees these keys: nothing to add
            return
        n_steps = int32((r_hi - r_lo + np.uint32(BQ - 1)) // np.uint32(BQ))

        slots = cuda.shared.array(BK, int32)
        l2s = cuda.shared.array((2, BQ), float32)
        dls = cuda.shared.array((2, BQ), float32)
        pos = cuda.shared.array((2, BQ), int32)
        resolve_slots(slots, table, b, kvh, k0, L, bs, Hkv, tid, BK, NT)
        cuda.syncthreads()
        load_kv(sm, k, v, slots, KOFF, VOFF, tid, NT, BK, D, PK, PK, E, TF)
        _load_rows(sm, q, dout, r_lo, R, uG, kvh, row0, stride_h, stride_i, QOFF, DOFF, tid, NT, BQ, D, PQ, E, TF)
        _load_meta(l2s[0], dls[0], pos[0], lse2, delta, r_lo, R, uG, kvh, row0, stride_h, stride_i, first,
                   tid, NT, BQ)
        cp_async_commit()

        ka = (16 * w + l8 + 8 * (m8 % 2)) * DP + 8 * (m8 // 2)     # this lane's K / V A-fragment row
        qb = (l8 + 8 * (m8 // 2)) * DP + 8 * (m8 % 2)              # ... of q / dout as B (rows = n)
        qt = (l8 + 8 * (m8 % 2)) * DP + 8 * (m8 // 2)              # ... of q / dout / K as B (.trans)
        sa = (l8 + 8 * (m8 // 2)) * BQP + 8 * (m8 % 2)             # ... of dS as A (.trans of dS^T)
        kf = cuda.local.array(4, uint32)
        bf = cuda.local.array(4, uint32)
        ah = cuda.local.array(A_N, uint32)      # TF32: split fragments
        al = cuda.local.array(A_N, uint32)
        bh = cuda.local.array(B_N, uint32)
        bl = cuda.local.array(B_N, uint32)
        s = cuda.local.array(S_N, float32)
        dp = cuda.local.array(S_N, float32)
        pf = cuda.local.array(P_N, uint32)
        df = cuda.local.array(P_N, uint32)
        dka = cuda.local.array(G_N, float32)
        dva = cuda.local.array(G_N, float32)
        dqa = cuda.local.array(Q_N, float32)
        for i in range(G_N):
            dka[i] = 0.0
            dva[i] = 0.0
        c = float32(scale * LOG2E)
        sc = float32(scale)
        kmine = k0 + 16 * w + g                 # this thread's keys: kmine, kmine + 8

        for st in range(n_steps + 1):      # iteration st: dQ of step st - 1, then step st
            cur = st & 1
            R0 = np.uint32(r_lo + np.uint32(st * BQ))
            cp_async_wait_all()
            cuda.syncthreads()      # step st landed; step st - 1 done (its dS^T complete)
            if st + 1 < n_steps:
                R1 = np.uint32(R0 + np.uint32(BQ))
                _load_rows(sm, q, dout, R1, R, uG, kvh, row0, stride_h, stride_i, QOFF + (1 - cur) * TILE,
                           DOFF + (1 - cur) * TILE, tid, NT, BQ, D, PQ, E, TF)
                _load_meta(l2s[1 - cur], dls[1 - cur], pos[1 - cur], lse2, delta, R1, R, uG, kvh, row0, stride_h,
                           stride_i, first, tid, NT, BQ)
            cp_async_commit()
            # dQ[rows of step st - 1, :] += scale dS K, in units of 16 rows x DC columns.
            if st > 0:
                Rp = np.uint32(R0 - np.uint32(BQ))
                for ui in range(UPW):
                    u = w + NW * ui
                    ok = u < UNITS
                    if not ok:
                        u = UNITS - 1
                    mq = u % MQ
                    dc = u // MQ
                    if TF:
                        _tf32_dq(dqa, sm32, SOFF + (1 - cur) * STILE + mq * 16, KOFF, dc * DC, ah, al, bh,
                                 bl, g, t4, PK, BQP, BK, DC)
                    else:
                        for i in range(Q_N):
                            dqa[i] = 0.0
                        for kb in range(BK // 16):
                            ldsm_x4_t(kf, 0, sm, SOFF + (1 - cur) * STILE + sa + kb * 16 * BQP + mq * 16)
                            for dd in range(DC // 16):
                                ldsm_x4_t(bf, 0, sm, KOFF + qt + kb * 16 * DP + dc * DC + dd * 16)
                                mma(kind, dqa, dd * 8, kf, 0, bf, 0)
                                mma(kind, dqa, dd * 8 + 4, kf, 0, bf, 2)
                    if ok:
                        for half in range(2):
                            r = Rp + np.uint32(mq * 16 + g + 8 * half)
                            if r < r_hi:
                                qi = udiv32(r, uG)
                                base = q_row(row0, kvh * uG + (r - qi * uG), qi, stride_h, stride_i) * D + dc * DC
                                if TF:
                                    for dd in range(DC // 16):
                                        _tf32_add(dq, base + 16 * dd + 4 * t4, dqa, 8 * dd + 2 * half, sc, VRED)
                                else:
                                    for nt in range(DC // 8):
                                        _add2(dq, base + nt * 8 + 2 * t4, dqa[nt * 4 + 2 * half] * sc,
                                              dqa[nt * 4 + 2 * half + 1] * sc, VRED)
            if st < n_steps:
                qo = QOFF + cur * TILE
                do = DOFF + cur * TILE

                if TF:
                    _tf32_rows_x_tile(s, sm32, KOFF, qo, ah, al, bh, bl, w, g, t4, PK, PQ, D, NS)
                    _tf32_rows_x_tile(dp, sm32, VOFF, do, ah, al, bh, bl, w, g, t4, PK, PQ, D, NS)
                else:
                    for i in range(S_N):
                        s[i] = 0.0
                        dp[i] = 0.0
                    for ks in range(KS):
                        ldsm_x4(kf, 0, sm, KOFF + ka + ks * 16)
                        for np2 in range(NS // 2):
                            ldsm_x4(bf, 0, sm, qo + qb + np2 * 16 * DP + ks * 16)
                            mma(kind, s, np2 * 8, kf, 0, bf, 0)
                            mma(kind, s, np2 * 8 + 4, kf, 0, bf, 2)
                        ldsm_x4(kf, 0, sm, VOFF + ka + ks * 16)
                        for np2 in range(NS // 2):
                            ldsm_x4(bf, 0, sm, do + qb + np2 * 16 * DP + ks * 16)
                            mma(kind, dp, np2 * 8, kf, 0, bf, 0)
                            mma(kind, dp, np2 * 8 + 4, kf, 0, bf, 2)

                # P^T = 2^(c S^T - lse2), dS^T = P^T (dP^T - delta); element j of n-tile nt is key
                # kmine + 8 (j // 2), row R0 + nt * 8 + 2 t4 + j % 2. Steps inside every bound skip the mask.
                r_last = np.uint32(min(R, np.uint32(R0 + np.uint32(BQ))) - np.uint32(1))
                p_first = first + int32(udiv32(R0, uG))
                masked = k0 + BK > L or (causal and k0 + BK - 1 > p_first)
                if WINDOW:
                    masked = masked or k0 < first + int32(udiv32(r_last, uG)) - window
                for nt in range(NS):
                    for j in range(4):
                        col = nt * 8 + 2 * t4 + j % 2
                        x = s[nt * 4 + j]
                        p = exp2_approx(x * c - l2s[cur, col])
                        if masked:
                            kj = kmine + 8 * (j // 2)
                            ps = pos[cur, col]
                            vis = kj < L and (not causal or kj <= ps)
                            if WINDOW:
                                vis = vis and kj >= ps - window
                            p = p if vis else float32(0.0)
                        s[nt * 4 + j] = p
                        dp[nt * 4 + j] = p * (dp[nt * 4 + j] - dls[cur, col])
                if TF:
                    for nt in range(NS):    # dS^T (float32 bits) for the dQ of the next iteration
                        for j in range(4):
                            sm32[SOFF + cur * STILE + (16 * w + g + 8 * (j // 2)) * BQP + nt * 8 + 2 * t4
                                 + j % 2] = f2u(dp[nt * 4 + j])
                    _tf32_grad(dva, s, sm32, do, ah, al, bh, bl, g, t4, PQ, D, NS)
                    _tf32_grad(dka, dp, sm32, qo, ah, al, bh, bl, g, t4, PQ, D, NS)
                for kk in range(0 if TF else BQ // 16):
                    for j in range(4):
                        src = (2 * kk + j // 2) * 4 + 2 * (j % 2)
                        pf[kk * 4 + j] = pack2(kind, s[src], s[src + 1])
                        x = pack2(kind, dp[src], dp[src + 1])
                        df[kk * 4 + j] = x
                        # dS^T row 16 w + g + 8 (j % 2), columns (2 kk + j // 2) * 8 + 2 t4 (+1)
                        sm32[(SOFF + cur * STILE + (16 * w + g + 8 * (j % 2)) * BQP + (2 * kk + j // 2) * 8
                              + 2 * t4) // 2] = x
                for kk in range(0 if TF else BQ // 16):
                    for dd in range(D // 16):
                        ldsm_x4_t(bf, 0, sm, do + qt + kk * 16 * DP + dd * 16)
                        mma(kind, dva, dd * 8, pf, kk * 4, bf, 0)
                        mma(kind, dva, dd * 8 + 4, pf, kk * 4, bf, 2)
                        ldsm_x4_t(bf, 0, sm, qo + qt + kk * 16 * DP + dd * 16)
                        mma(kind, dka, dd * 8, df, kk * 4, bf, 0)
                        mma(kind, dka, dd * 8 + 4, df, kk * 4, bf, 2)

        for half in range(2):
            kj = kmine + 8 * half
            if kj < L:
                blk = udiv32(np.uint32(kj), np.uint32(bs))
                prow = (np.int64(table[b, blk]) * bs + (kj - int32(blk) * bs)) * Hkv + kvh
                if TF:
                    base = prow * D + 4 * t4
                    for cc in range(D // 16):
                        _tf32_add(dk, base + 16 * cc, dka, 8 * cc + 2 * half, sc, VRED)
                        _tf32_add(dv, base + 16 * cc, dva, 8 * cc + 2 * half, float32(1.0), VRED)
                else:
                    base = prow * D + 2 * t4
                    for nt in range(NO):
                        _add2(dk, base + nt * 8, dka[nt * 4 + 2 * half] * sc, dka[nt * 4 + 2 * half + 1] * sc,
                              VRED)
                        _add2(dv, base + nt * 8, dva[nt * 4 + 2 * half], dva[nt * 4 + 2 * half + 1], VRED)

    return kernel


def smem_bytes(D: int, NW: int, BQ: int, tf32: bool = False) -> int:
    """Dynamic shared memory of ``dkdvq_kernel(D, kind, NW, BQ)``: the K and V tiles, two q and two
    dout step buffers, and two dS^T buffers (F32, ``tf32``: 32-bit elements, rows ``tf32_pitches``
    apart)."""
    BK = 16 * NW
    if tf32:
        pk, pq = tf32_pitches(D)
        return (2 * BK * pk + 4 * BQ * pq) * 4 + 2 * BK * (BQ + 8) * 4
    return (2 * BK + 4 * BQ) * (D + 8) * 2 + 2 * BK * (BQ + 8) * 2
