"""Paged-attention prefill on tensor cores (FlashAttention-2 structure over a block table), for
F16 / BF16 q (K/V of q's dtype, or FP8 codes decoded into it) and F32 q / K / V (3xTF32), head dims
that are multiples of 16.

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq_b queries of sequence b, D
head_dim, N physical blocks, bs block_size, M max blocks per sequence; R = G * Sq_b query rows per
(sequence, KV head); BQ = 16 * MT * NW rows per thread block, BK keys per tile, DP = D + 8 (F32:
D + 4) tile elements per row.

``prefill_kernel(...)`` arguments (C-contiguous device arrays, validated by ``ops/config.py``):

- ``q``        flat uint16 (F32: float32) [rows * D]: q as [rows, D]; query i of sequence b, head h, is row
  ``work[0, b] + h * stride_h + i * stride_i`` (the dense [B, H, Sq, D] and the ragged token-major
  [T, H, D] layouts differ only in the strides: ``q_row``)
- ``k``, ``v`` flat [N * bs * Hkv * D] pools [N, bs, Hkv, D]: uint16 bits, uint8 FP8 codes, or
  float32
- ``table``    int32 [B, M]: token t of sequence b is slot ``t % bs`` of block ``table[b, t // bs]``
- ``seq_lens`` int32 [B]; ``work`` int32 [4, B]: row 0 first q row, row 1 q_len, row 3 the tiled
  work list (the sequences this launch serves); ``H``, ``stride_h``, ``stride_i``, ``bs``, ``Hkv``;
  ``qk_scale`` multiplies q . k, ``out_scale`` the output; ``causal`` bottom-right aligned,
  ``window`` (>= 0: a query at p sees keys j >= p - window), ``softcap``, ``slopes`` float32 [H]
  (ALiBi; SOFTCAP / ALIBI factory flags)
- ``out``      flat uint32 [rows * D / 2]: out as pairs of 16-bit elements (F32: [rows * D], the
  float32 bits)
- ``lse``      float32 [rows] (natural log); ``flag`` int32 [1], set when a visible score is not
  finite (the client raises)
- ``part_len``, ``po``, ``pml`` (SPLIT only; placeholders otherwise): keys per split-K partition,
  and the partial states float32 [n_dec, H, SQ, P, D] / [n_dec, H, SQ, P, 2] in the layout of
  ``paged_decode.decode_kernel`` (normalized output; max in base 2 and sum)

Grid (len(work list) * Hkv, ceil(max R / BQ)), 32 * NW threads; a row tile past its sequence's R
returns at once. SPLIT (the decode on tensor cores): the decode work list (``work`` row 2), and
grid z = partitions -- partition z covers keys [s + z * part_len, s + (z + 1) * part_len) from the
sequence's first visible key s, every row's visible range clamped to it; with one partition the
block writes out / lse, else its partial state for the merge. A block owns BQ rows of one
(sequence, KV head): row r is query ``r // G`` of head ``kvh * G + r % G``, so the GQA group's rows share every K/V tile. Each warp owns 16 * MT rows;
with MT = 1 and D <= 128 their Q fragments stay in registers for the whole walk, else they are
re-read from shared memory per k-step (each K / V fragment then feeds MT mma). K / V tiles of BK
tokens are gathered through the block table (token -> pool row resolved two tiles ahead into a
ring of slot lists) with 16-byte ``cp.async`` copies into shared memory (rows padded to DP so
``ldmatrix`` is free of bank conflicts), double buffered: the copy of tile j + 1 runs while the
block computes on tile j. FP8 codes are staged the same way and decoded (exactly) into the 16-bit
tile after tile j's math. Per tile, S = Q K^T on ``mma.sync`` (K fragments by ``ldmatrix``), the
online softmax in registers (base 2; row max and sum over a quad's 4 lanes; softcap / ALiBi
applied to visible scores first), P repacked from the S accumulators into A fragments without
leaving registers, and O += P V (V fragments by ``ldmatrix.trans``). The block walks only the keys
its rows can see (from the first row's window start to the last row's causal limit); tiles that
cross a row's bounds are masked; tokens past the last visible key are zero-filled, never read, so
NaN in unused slots cannot reach a result. Row tiles are scheduled heaviest (latest queries) first.

F32 (3xTF32): the tiles hold float32 (rows ``tf32_pads`` apart, so the fragment reads below hit
distinct banks); each fragment element is read from shared memory (16-byte reads of Q / K rows,
8-byte reads of V rows) and split into a TF32 high part and a residual (``tf32_split``, ``split4``), and every
product is three m16n8k8 TF32 mma (lo hi, hi lo, hi hi), which keeps float32 accuracy. The mma's
k index is permuted within each 16-dim chunk of Q K^T (alike in Q and K), the n index of P V
within each 16-dim chunk of V and O, and P V takes its A fragments straight from the S
accumulators (k = t is key 2 t, k = t + 4 key 2 t + 1, in P and V alike): P never leaves
registers and a thread's 4 output elements of a chunk are adjacent.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int32, uint8, uint16, uint32

from ...dtypes import E4M3, E5M2, F32
from .codecs import f2u, fp8_pairs, i2f
from .mma import (cp_async16, cp_async_commit, cp_async_wait_all, exp2_approx, ldsm_x4, ldsm_x4_t, mma, pack2,
                  lds2, mma3, quad_max, quad_sum, rcp_approx, split4, tf32_split, udiv32)
from .paged_decode import LN2, LOG2E
from .prefill_staging import convert_codes, load_codes, load_kv, q_row, resolve_slots


@cuda.jit(device=True, inline=True)
def _key_range(p, L, causal, window, WINDOW):
    """[lo, hi): the keys a query at position p sees (causal: j <= p; WINDOW, a compile-time flag:
    j >= p - window)."""
    hi = L
    if causal:
        hi = min(L, max(0, p + 1))
    lo = 0
    if WINDOW:
        lo = min(hi, max(0, p - window))
    return lo, hi


@cuda.jit(device=True, inline=True)
def _modify2(x, cap, inv_cap, slope, dist, SOFTCAP, ALIBI):
    """``paged_decode._modify`` (softcap, then ALiBi; base-2 units out) with tanh(y) computed as
    1 - 2 / (2 ** (2 y log2 e) + 1) on the SFU (exp2 and reciprocal): a libdevice tanhf call inside the unrolled score
    loop would keep the accumulators out of registers. Absolute error ~1e-7 (+-1 at the ends)."""
    if SOFTCAP:
        e = exp2_approx(x * inv_cap * float32(2.0 * LOG2E))
        x = cap * (float32(1.0) - float32(2.0) * rcp_approx(e + float32(1.0)))
    if ALIBI:
        x -= slope * float32(abs(dist))
    return x * float32(LOG2E)


@cuda.jit(device=True, inline=True)
def _online_step(s, o, m, lsum, rr, mx, c2, S1, O1, NS, NO):
    """The online-softmax step of a thread's row rr over a tile (``mx``: the thread's largest
    exponent-unit score of the row in the tile): the new row max over the quad, the scores
    turned into probabilities in place, the running sum and the O accumulators rescaled."""
    so = (rr // 2) * S1 + 2 * (rr % 2)
    mnew = max(m[rr], quad_max(mx) * c2)
    ms = mnew if mnew > float32(-np.inf) else float32(0.0)
    alpha = exp2_approx(m[rr] - ms)
    m[rr] = mnew
    part = float32(0.0)
    for nt in range(NS):
        for e in range(2):
            p = exp2_approx(s[so + nt * 4 + e] * c2 - ms)
            s[so + nt * 4 + e] = p
            part += p
    lsum[rr] = lsum[rr] * alpha + part
    oo = (rr // 2) * O1 + 2 * (rr % 2)
    for dt in range(NO):
        o[oo + dt * 4] *= alpha
        o[oo + dt * 4 + 1] *= alpha


def tf32_pads(D: int) -> tuple:
    """(Q / K, V) tile row pitch in 32-bit words of the 3xTF32 prefill: 16-byte reads of Q / K rows
    g, g + 1 at 4 t need a pitch of 16 (mod 32) to hit 32 banks per quarter warp, 8-byte reads of V
    rows 2 t at 2 g one of 4 (mod 16) per half warp."""
    return D + (16 if D % 32 == 0 else 32), D + 4


@functools.cache
def prefill_kernel(D: int, kind: int, NW: int, BK: int, MT: int = 1, kv_code: int = None, SOFTCAP: bool = False,
                   ALIBI: bool = False, WINDOW: bool = False, HWCVT: bool = False, SPLIT: bool = False):
    """The tensor-core prefill for head dim D (a multiple of 16), type ``kind`` (BF16 / F16 code: q,
    out and the m16n8k16 mma; F32: q, K/V and out float32, every product as 3xTF32 m16n8k8 mma --
    ``tf32_split``), K/V of ``kv_code`` (``kind``, or E4M3 / E5M2 codes decoded into the
    tiles), NW warps of MT m-tiles (16 rows each: BQ = 16 * MT * NW rows) and BK keys per tile (a
    multiple of 16); SOFTCAP / ALIBI turn the score modifiers on and WINDOW the sliding window (plain
    attention pays nothing for them); HWCVT: the device has the FP8 -> F16 pair converter (sm_89+),
    which E4M3 codes then go through (E5M2 pairs need none). SPLIT: the split-K decode on tensor
    cores -- the decode work list (``work`` row 2), grid z = partitions of ``part_len`` keys from
    the sequence's first visible key, and with more than one partition each block writes its
    normalized partial output and (max, sum) into ``po`` / ``pml`` for ``paged_decode.merge_kernel``
    (the decode kernel's layout) instead of ``out`` / ``lse``."""
    kv_code = kind if kv_code is None else kv_code
    MOD = SOFTCAP or ALIBI
    KV8 = kv_code in (E4M3, E5M2)
    PAIRS = fp8_pairs(kv_code, HWCVT)   # FP8 codes decoded two at a time
    TF = kind == F32             # 3xTF32: 32-bit tiles, fragments read element by element
    NT = 32 * NW
    WR = 16 * MT                 # rows per warp
    BQ = WR * NW
    E = 4 if TF else 8           # tile elements per 16-byte copy
    DP = D + 8                   # padded tile rows (16-bit elements): ldmatrix free of bank conflicts
    DPQ, DPV = tf32_pads(D) if TF else (DP, DP)    # ... of Q / K and of V (TF32: lds4 / lds2 reads)
    DPK = DPQ
    TILE_T = uint32 if TF else uint16
    KS = D // 16                 # k-steps of S = Q K^T
    NS = BK // 8                 # n-tiles of S
    NO = D // 8                  # n-tiles of O
    TILEK, TILEV = BK * DPK, BK * DPV
    KOFF = BQ * DPQ              # smem (TILE_T elements): Q | K0 K1 | V0 V1
    VOFF = KOFF + 2 * TILEK
    ROFF = 2 * (VOFF + 2 * TILEV)  # FP8: byte offset of the staged codes (BK * D bytes each of K, V)
    NEG_INF = float32(-np.inf)
    CH = D // E
    Q_REGS = MT == 1 and D <= 128 and not TF   # Q fragments kept in registers; else re-read per k-step
    QF_N = KS * 4 if Q_REGS else 4 * MT
    S1, O1, P1 = NS * 4, NO * 4, BK // 4   # per m-tile: S / O accumulators, P fragments
    S_N, O_N, P_N, R_N = MT * S1, MT * O1, MT * P1, 2 * MT
    PVG = NS                     # TF32: k-steps of 8 keys per group of the P V products
    A_N, B_N = (max(8, 4 * PVG) * MT, 4) if TF else (1, 1)   # TF32 fragments (hi / lo)
    C_N = max(S_N, 8 * MT) if TF else 1     # TF32: a chunk's partial sums
    assert not (TF and SPLIT), "the split-K decode on tensor cores takes 16-bit q"

    @cuda.jit(cache=True)
    def kernel(q, k, v, table, seq_lens, work, H, stride_h, stride_i, bs, Hkv, qk_scale, out_scale, causal,
               window, softcap, slopes, out, lse, flag, part_len, po, pml):
        sm = cuda.shared.array(0, TILE_T)
        sm8 = cuda.shared.array(0, uint8)       # the same dynamic shared memory (FP8 staging)
        sm32 = cuda.shared.array(0, uint32)
        tid = cuda.threadIdx.x
        lane = tid % 32
        w = tid // 32
        g = lane // 4
        t4 = lane % 4
        l8 = lane % 8
        m8 = lane // 8
        uG = np.uint32(H // Hkv)
        wl = cuda.blockIdx.x // Hkv     # entry of the work list
        b = work[2 if SPLIT else 3, wl]
        kvh = cuda.blockIdx.x % Hkv
        Sq = work[1, b]
        R = np.uint32(uG * np.uint32(Sq))
        tile = cuda.gridDim.y - 1 - cuda.blockIdx.y      # heaviest row tiles first
        R0 = np.uint32(tile * BQ)
        if R0 >= R:                 # a row tile this sequence does not have (the whole block)
            return
        row0 = work[0, b]
        L = seq_lens[b]
        first = L - Sq              # position of query 0

        # Visible keys [lo, hi) of this thread's 2 * MT rows, and of the block's first and last rows:
        # both bounds grow with the query, so the block walks [lo(first), hi(last)) and tiles inside
        # [lo(last), hi(first)) need no mask.
        lo = cuda.local.array(R_N, int32)           # visible keys [lo, hi) of each row (lo: WINDOW)
        hi = cuda.local.array(R_N, int32)
        pos = cuda.local.array(R_N, int32)          # the rows' query positions (ALIBI)
        slope = cuda.local.array(R_N, float32)
        for rr in range(R_N):
            r = R0 + np.uint32(w * WR + 16 * (rr // 2) + g + 8 * (rr % 2))
            a, z = 0, 0                 # a row past R sees nothing (its output is dropped)
            if ALIBI:                   # ... and its (unmasked) zero scores stay finite
                pos[rr] = 0
                slope[rr] = 0.0
            if r < R:
                i = udiv32(r, uG)
                a, z = _key_range(first + int32(i), L, causal, window, WINDOW)
                if ALIBI:
                    pos[rr] = first + int32(i)
                    slope[rr] = slopes[kvh * uG + (r - i * uG)]
            lo[rr] = a
            hi[rr] = z
        r_last = min(R, R0 + np.uint32(BQ)) - np.uint32(1)
        kbeg, kfull = _key_range(first + int32(udiv32(R0, uG)), L, causal, window, WINDOW)
        klo, kend = _key_range(first + int32(udiv32(r_last, uG)), L, causal, window, WINDOW)
        if SPLIT:   # this block's partition: keys [pfrom, pfrom + part_len) of the walk, every row clamped
            pfrom = (max(0, first - window) if WINDOW else 0) + cuda.blockIdx.z * part_len
            kbeg = max(kbeg, pfrom)
            kend = min(kend, pfrom + part_len)
            kfull = min(kfull, kend)
            klo = max(klo, kbeg)
            for rr in range(R_N):
                lo[rr] = max(lo[rr], kbeg)
                hi[rr] = min(hi[rr], kend)
        n_tiles = (kend - kbeg + BK - 1) // BK if kend > kbeg else 0
        cap = float32(softcap)
        inv_cap = float32(1.0) / cap if SOFTCAP else float32(0.0)

        for c in range(tid, BQ * CH, NT):
            row = c // CH
            ch = c % CH
            r = R0 + np.uint32(row)
            src = np.int64(0)
            n = 0
            if r < R:
                i = udiv32(r, uG)
                src = q_row(row0, kvh * uG + (r - i * uG), i, stride_h, stride_i) * D + ch * E
                n = 16
            cp_async16(sm, row * DPQ + ch * E, q, src, n)
        # Pool rows of each tile's tokens, resolved two tiles ahead into a ring of 3 slot lists.
        slots = cuda.shared.array((3, BK), int32)
        resolve_slots(slots[0], table, b, kvh, kbeg, kend, bs, Hkv, tid, BK, NT)
        resolve_slots(slots[1], table, b, kvh, kbeg + BK, kend, bs, Hkv, tid, BK, NT)
        cuda.syncthreads()
        if n_tiles > 0:
            if KV8:
                load_codes(sm8, k, v, slots[0], ROFF, tid, NT, BK, D)
            else:
                load_kv(sm, k, v, slots[0], KOFF, VOFF, tid, NT, BK, D, DPK, DPV, E, False)
        cp_async_commit()
        cp_async_wait_all()
        cuda.syncthreads()
        if KV8 and n_tiles > 0:
            convert_codes(sm32, ROFF, KOFF, VOFF, tid, NT, BK, D, DP, kind, kv_code, PAIRS)

        qf = cuda.local.array(QF_N, uint32)
        qa = (w * WR + l8 + 8 * (m8 % 2)) * DP + 8 * (m8 // 2)      # this lane's Q fragment row
        if Q_REGS:
            for ks in range(KS):
                ldsm_x4(qf, ks * 4, sm, qa + ks * 16)
        ka = (l8 + 8 * (m8 // 2)) * DP + 8 * (m8 % 2)               # ... of K (rows = keys)
        va = (l8 + 8 * (m8 % 2)) * DP + 8 * (m8 // 2)               # ... of V (.trans)
        if TF:      # TF32: elements [g, 4 t .. 4 t + 3] of Q / K (rows: queries / keys), [2 t, 2 g .. 2 g + 1] of V
            qa = (w * WR + g) * DPQ + 4 * t4
            ka = g * DPK + 4 * t4
            va = 2 * t4 * DPV + 2 * g
        ah = cuda.local.array(A_N, uint32)          # TF32: A fragments (hi / lo) of each m-tile
        al = cuda.local.array(A_N, uint32)
        bh = cuda.local.array(B_N, uint32)          # ... B fragments
        bl = cuda.local.array(B_N, uint32)
        part = cuda.local.array(C_N, float32)
        kf = cuda.local.array(4, uint32)
        pf = cuda.local.array(P_N, uint32)
        s = cuda.local.array(S_N, float32)
        o = cuda.local.array(O_N, float32)
        m = cuda.local.array(R_N, float32)
        mrow = cuda.local.array(R_N, float32)       # a tile's row maxima
        lsum = cuda.local.array(R_N, float32)
        for i in range(O_N):
            o[i] = 0.0
        for rr in range(R_N):
            m[rr] = NEG_INF
            lsum[rr] = 0.0
        c2 = float32(1.0) if MOD else float32(qk_scale * LOG2E)     # raw score -> exponent units
        c_bad = float32(qk_scale) if MOD else c2
        amax = float32(0.0)             # largest |visible raw score| of this thread's rows

        ring = 0
        for it in range(n_tiles):
            cp_async_wait_all()
            cuda.syncthreads()          # tile it landed for everyone; tile it - 1 consumed
            k0 = kbeg + it * BK
            cur = it & 1
            r1 = ring + 1 if ring < 2 else 0          # slot lists of tiles it + 1, it + 2
            r2 = r1 + 1 if r1 < 2 else 0
            if it + 1 < n_tiles:
                if KV8:     # codes into the staging area now, decoded after this tile's math
                    load_codes(sm8, k, v, slots[r1], ROFF, tid, NT, BK, D)
                else:
                    load_kv(sm, k, v, slots[r1], KOFF + (1 - cur) * TILEK, VOFF + (1 - cur) * TILEV, tid, NT,
                            BK, D, DPK, DPV, E, False)
            cp_async_commit()
            if it + 2 < n_tiles:   # read after the next iteration's syncthreads
                resolve_slots(slots[r2], table, b, kvh, k0 + 2 * BK, kend, bs, Hkv, tid, BK, NT)
            ring = r1
            kb = KOFF + cur * TILEK + ka
            vb = VOFF + cur * TILEV + va

            for i in range(S_N):
                s[i] = 0.0
            if TF:
                # S = Q K^T over 16-dim chunks, two k-steps each with the dims permuted alike in Q and
                # K (k-step h: k = t is dim 4 t + 2 h, k = t + 4 dim 4 t + 2 h + 1), so one 16-byte
                # read gives a row's elements of both k-steps.
                # Each chunk's products go into zeroed partial sums, added to S by round-to-nearest
                # float32 adds: the mma's own accumulation truncates, which over a long chain biases.
                for c in range(D // 16):
                    for i in range(S_N):
                        part[i] = 0.0
                    for mt in range(MT):
                        a0 = qa + mt * 16 * DPQ + 16 * c
                        split4(sm, a0, ah, al, mt * 8, 2)             # row g: a0 / a2 of each k-step
                        split4(sm, a0 + 8 * DPQ, ah, al, mt * 8 + 1, 2)   # row g + 8: a1 / a3
                    for nt in range(NS):        # one n-tile's K fragments at a time (registers)
                        split4(sm, kb + nt * 8 * DPK + 16 * c, bh, bl, 0, 1)
                        for h in range(2):
                            for mt in range(MT):
                                mma3(part, mt * S1 + nt * 4, ah, al, mt * 8 + 4 * h, bh, bl, 2 * h)
                    for i in range(S_N):
                        s[i] += part[i]
            for ks in range(0 if TF else KS):
                if not Q_REGS:
                    for mt in range(MT):
                        ldsm_x4(qf, mt * 4, sm, qa + mt * 16 * DP + ks * 16)
                for np2 in range(NS // 2):
                    ldsm_x4(kf, 0, sm, kb + np2 * 16 * DP + ks * 16)
                    for mt in range(MT):
                        qs = ks * 4 if Q_REGS else mt * 4
                        mma(kind, s, mt * S1 + np2 * 8, qf, qs, kf, 0)
                        mma(kind, s, mt * S1 + np2 * 8 + 4, qf, qs, kf, 2)

            # Online softmax in base 2. Plain scores fold the scale into the exp2: p = 2 ** (s * c2 - m);
            # with softcap / ALiBi each visible score is modified (``_modify``) into base-2 units
            # first (c2 = 1). Visible scores that are not finite show as amax * c_bad = inf (+-inf,
            # overflow) or a NaN sum (NaN).
            masked = k0 + BK > kfull or (WINDOW and k0 < klo)
            for rr in range(R_N):
                so = (rr // 2) * S1 + 2 * (rr % 2)
                mx = NEG_INF
                if masked or MOD:
                    a = (lo[rr] if WINDOW else 0) - k0 - 2 * t4    # keys of this row: a <= nt * 8 + e < z
                    z = hi[rr] - k0 - 2 * t4
                    for nt in range(NS):
                        for e in range(2):
                            x = s[so + nt * 4 + e]
                            j = nt * 8 + e
                            vis = not masked or ((not WINDOW or j >= a) and j < z)
                            amax = max(amax, abs(x if vis else float32(0.0)))
                            if MOD:
                                x = _modify2(x * float32(qk_scale), cap, inv_cap, slope[rr],
                                             pos[rr] - (k0 + 2 * t4 + j), SOFTCAP, ALIBI)
                            x = x if vis else NEG_INF
                            s[so + nt * 4 + e] = x
                            mx = max(mx, x)
                else:
                    for nt in range(NS):
                        for e in range(2):
                            x = s[so + nt * 4 + e]
                            amax = max(amax, abs(x))
                            mx = max(mx, x)
                if MOD:
                    mrow[rr] = mx
                else:
                    _online_step(s, o, m, lsum, rr, mx, c2, S1, O1, NS, NO)
            if MOD:    # a second pass over the rows: one loop body of both sizes would not be unrolled
                for rr in range(R_N):
                    _online_step(s, o, m, lsum, rr, mrow[rr], c2, S1, O1, NS, NO)
            if TF:
                # O += P V over k-steps of 8 keys, the k index permuted (k = t <-> key 2 t, k = t + 4
                # <-> key 2 t + 1, the same in P and V): the S accumulators are the A fragments.
                # The n index is permuted too: in the n-tiles 2 c and 2 c + 1, n = g is dim 16 c + 2 g
                # and 16 c + 2 g + 1, so one 8-byte read gives both tiles' element of a V row.
                # A tile's products per 16-dim chunk go into zeroed partial sums added to O by
                # float32 adds (as for S: the rescaled O accumulates over every key of the walk).
                # Keys go in groups of PVG k-steps (the group's P fragments split once, in registers).
                for g0 in range(0, NS, PVG):
                    for mt in range(MT):
                        for kg in range(PVG):
                            c = mt * S1 + (g0 + kg) * 4
                            for j in range(4):
                                f = (mt * PVG + kg) * 4 + j
                                ah[f], al[f] = tf32_split(s[c + 2 * (j % 2) + j // 2])
                    for c in range(D // 16):
                        for i in range(8 * MT):
                            part[i] = 0.0
                        for kg in range(PVG):
                            for j in range(2):      # V rows of keys 2 t (b0) and 2 t + 1 (b1)
                                x0, x1 = lds2(sm, vb + ((g0 + kg) * 8 + j) * DPV + 16 * c)
                                bh[j], bl[j] = tf32_split(i2f(x0))
                                bh[2 + j], bl[2 + j] = tf32_split(i2f(x1))
                            for mt in range(MT):
                                mma3(part, mt * 8, ah, al, (mt * PVG + kg) * 4, bh, bl, 0)
                                mma3(part, mt * 8 + 4, ah, al, (mt * PVG + kg) * 4, bh, bl, 2)
                        for mt in range(MT):
                            for i in range(8):
                                o[mt * O1 + 8 * c + i] += part[mt * 8 + i]
            for mt in range(0 if TF else MT):
                for kk in range(BK // 16):
                    for j in range(4):
                        src = mt * S1 + (2 * kk + j // 2) * 4 + 2 * (j % 2)
                        pf[mt * P1 + kk * 4 + j] = pack2(kind, s[src], s[src + 1])
            for dp in range(0 if TF else D // 16):
                for kk in range(BK // 16):
                    ldsm_x4_t(kf, 0, sm, vb + kk * 16 * DP + dp * 16)
                    for mt in range(MT):
                        mma(kind, o, mt * O1 + dp * 8, pf, mt * P1 + kk * 4, kf, 0)
                        mma(kind, o, mt * O1 + dp * 8 + 4, pf, mt * P1 + kk * 4, kf, 2)
            if KV8 and it + 1 < n_tiles:
                cp_async_wait_all()
                cuda.syncthreads()      # everyone's codes of tile it + 1 landed
                convert_codes(sm32, ROFF, KOFF + (1 - cur) * TILEK, VOFF + (1 - cur) * TILEV, tid, NT, BK, D, DP,
                             kind, kv_code, PAIRS)

        bad = not amax * c_bad < np.inf
        for rr in range(R_N):
            bad |= lsum[rr] != lsum[rr]
        if bad:
            flag[0] = 1
        for rr in range(R_N):
            tot = quad_sum(lsum[rr])
            r = R0 + np.uint32(w * WR + 16 * (rr // 2) + g + 8 * (rr % 2))
            if r < R:
                i = udiv32(r, uG)
                h = kvh * uG + (r - i * uG)
                inv = float32(0.0)
                if tot > 0:
                    inv = float32(out_scale) / tot
                orow = q_row(row0, h, i, stride_h, stride_i)
                oo = (rr // 2) * O1 + 2 * (rr % 2)
                if SPLIT and cuda.gridDim.z > 1:    # a partial state for the merge (float32, base 2)
                    part = cuda.blockIdx.z
                    inv = float32(1.0) / tot if tot > 0 else float32(0.0)
                    for dt in range(NO):
                        po[wl, h, i, part, dt * 8 + 2 * t4] = o[oo + dt * 4] * inv
                        po[wl, h, i, part, dt * 8 + 2 * t4 + 1] = o[oo + dt * 4 + 1] * inv
                    if t4 == 0:
                        pml[wl, h, i, part, 0] = m[rr] if tot > 0 else NEG_INF
                        pml[wl, h, i, part, 1] = tot
                elif TF:      # out: float32 bits; dims 16 c + 4 t .. + 3 (the permuted n index)
                    for c in range(D // 16):
                        at = orow * D + 16 * c + 4 * t4
                        out[at] = f2u(o[oo + 8 * c] * inv)
                        out[at + 1] = f2u(o[oo + 8 * c + 4] * inv)
                        out[at + 2] = f2u(o[oo + 8 * c + 1] * inv)
                        out[at + 3] = f2u(o[oo + 8 * c + 5] * inv)
                else:       # out: pairs of 16-bit elements
                    for dt in range(NO):
                        out[orow * (D // 2) + dt * 4 + t4] = pack2(kind, o[oo + dt * 4] * inv,
                                                                  o[oo + dt * 4 + 1] * inv)
                if t4 == 0 and not (SPLIT and cuda.gridDim.z > 1):
                    lse[orow] = (m[rr] + math.log2(tot)) * LN2 if tot > 0 else NEG_INF

    return kernel


def smem_bytes(D: int, NW: int, BK: int, MT: int = 1, fp8: bool = False, tf32: bool = False) -> int:
    """Dynamic shared memory of ``prefill_kernel(D, kind, NW, BK, MT, kv_code)``: Q, two K and two V
    tiles of 16-bit elements (F32, ``tf32``: of 32-bit elements, rows ``tf32_pads`` apart) and, for
    FP8 K/V, the staged codes of one K and one V tile."""
    if tf32:
        dpq, dpv = tf32_pads(D)
        return ((16 * MT * NW + 2 * BK) * dpq + 2 * BK * dpv) * 4
    return (16 * MT * NW + 4 * BK) * (D + 8) * 2 + (2 * BK * D if fp8 else 0)
