"""Fused paged-attention forward on the CPU: ``@njit`` loops over the block table.

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq queries per sequence, D head_dim,
N physical blocks, bs block_size, M max blocks per sequence, R rows of a work item.

``fwd_kernel(q_code, kv_code, gemm)`` builds (once per argument tuple, cached on disk) the kernel
``kernel(q, k, v, table, seq_lens, qk_scale, out_scale, causal, tq, out, lse, start, stop)``,
which runs work items ``start <= item < stop`` of ``n_items(B, H, Hkv, Sq, tq)``. Arguments
(storage dtypes, C-contiguous, validated by ``ops/config.py``; the inputs may be read-only):

- ``q``        [B, H, Sq, D]   float32, or uint16 / uint8 bits (``q_code``), decoded in the kernel
- ``k``, ``v`` [N, bs, Hkv, D] float32, or uint16 / uint8 bits (``kv_code``)
- ``table``    int32 [B, M]; token t of sequence b is slot ``t % bs`` of block ``table[b, t // bs]``;
  only entries with ``t < seq_lens[b]`` are read
- ``seq_lens`` int32 [B]
- ``qk_scale`` float: multiplies q . k (the softmax scale times any dequantization scales of q, k)
- ``out_scale`` float: multiplies the normalized output (v's dequantization scale / o_scale)
- ``causal``   bool: bottom-right aligned, query i sees keys j <= L - Sq + i
- ``tq``       int: about ``tq`` rows (GQA heads x queries) per work item
- ``out``      float32 [B, H, Sq, D] (written), ``lse`` float32 [B, H, Sq] (written, natural log)

A row with non-finite scores (inf / NaN in the q or K tokens read, or qk_scale * q . k
overflowing float32) gets ``lse = +inf`` and NaN output; the client raises.

One parallel work item is (sequence b, KV head, tile of queries): it serves the whole GQA group
(G query heads x the tile's queries, R rows), so each K/V token is read from memory once per tile.
Keys are visited with an online softmax in base 2 (q is pre-scaled by ``qk_scale * log2(e)``);
only valid tokens are decoded, so whatever sits in unused slots (NaN included) never reaches a
result. Two inner paths, fixed per kernel (``gemm``, chosen by the client with ``uses_gemm``):

- ``gemm`` (prefill, chunked prefill, wide GQA: R >= ROWS_GEMM): key tiles of KT tokens spanning
  paged blocks are decoded into contiguous scratch and multiplied as small GEMMs by the 512-bit
  microkernels of ``gemm.py``: ``St[KT, Rp] = K[KT, D] @ Qt[D, Rp]`` puts rows on the vector lanes,
  so the online softmax (max, exp2, row sums) is vectorized over rows without horizontal
  reductions, then ``acc[Rp, Dp] += P[Rp, KT] @ V[KT, Dp]``.
- otherwise (decode): per paged block, row-by-key dot products vectorized over D.

Ragged batches, windows, softcap and ALiBi (``fwd_mods_kernel``) run the same two work items with
their modifiers on (``tile_item_mods`` / ``row_item_mods``; ``MODS`` a closure constant of the
factories ``tile_item_for`` / ``row_item_for``, pruned before the inlined body is typed): the plain
kernel compiles without the modifiers' code (1 s less cold compile at the prefill than when the
flag was an argument), and both address q / out / lse as rows (``row0 + h * sh + i * si``;
the plain kernel views its dense arrays that way).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange

from . import FASTMATH
from .codecs import load_row, load_tok
from .gemm import accumulate, matmul, no_alias, prefer_512, scores
from .mathf import LOG2E, exp2_f32, exp2_poly
from .score_mods import mod_row, mod_tile_any

LN2 = 0.6931471805599453


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def exp2_shifted(s, n, m, ebits):
    """``s[:n] = 2 ** (s[:n] - m)`` for finite ``s <= m``, as two loops LLVM vectorizes (libm's
    scalar ``exp2`` does not vectorize). Arguments below -126 give ~1e-38 instead of 0."""
    prefer_512()
    no_alias()
    scale = ebits.view(np.float32)
    for j in range(n):
        x = max(s[j] - m, np.float32(-126.0))
        xf = np.floor(x)  # float32 llvm.floor (math.floor goes through an int: a libm call per element)
        f = x - xf
        s[j] = exp2_poly(f)
        ebits[j] = (np.int32(xf) + np.int32(127)) << np.int32(23)
    for j in range(n):
        s[j] *= scale[j]


KT = 64  # keys per tile of the GEMM path
_NO_SLOPES = np.zeros(0, np.float32)   # the plain kernel's slopes argument (never read: mods off)


# ------------------------------------------------------------------ work items (both kernels)
# Ragged rows, sliding windows, softcap and ALiBi (ops/config.py: ``row_layout``, ``window_left``,
# ``softcap``, ``alibi_slopes``). Query i of sequence b (q_len n, L keys) sits at p = L - n + i and
# sees keys lo <= j < hi: hi = min(L, p + 1) if causal else L, lo = max(0, p - window_left) with a
# window, else 0. A visible score s = qk_scale * q . k (natural units) becomes
# softcap * tanh(s / softcap) (softcap > 0), then s - slope_h * |p - j|; keys outside [lo, hi) are
# masked, and blocks / tiles no row of a work item sees are never read.


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def row_window(L, n, i, causal, window_left):
    """(p, lo, hi) of query i of a sequence of L keys and n queries."""
    p = L - n + i
    hi = min(L, p + 1) if causal else L
    lo = max(0, p - window_left) if window_left >= 0 else 0
    return p, lo, hi


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def finish_row(out, lse, row, acc_row, m, lsum, out_scale):
    """out[row] and lse[row] (out [rows, D], lse [rows]) from a row's accumulator, running max (base
    2) and sum: 0 / -inf for a row that saw no key; NaN / +inf (flagged for the client) for
    non-finite scores."""
    D = out.shape[1]
    if m == -np.inf:
        for d in range(D):
            out[row, d] = 0.0
        lse[row] = -np.inf
    elif m == np.inf or not abs(lsum) < np.inf:
        for d in range(D):
            out[row, d] = np.nan
        lse[row] = np.inf
    else:
        inv = np.float32(out_scale) / lsum
        for d in range(D):
            out[row, d] = acc_row[d] * inv
        lse[row] = np.float32((m + math.log2(lsum)) * LN2)


@functools.cache
def tile_item_for(mods: bool):
    """``tile_item`` with the modifiers on or off (``MODS``, a closure constant: numba prunes its
    branches before the inlined body is typed, so the plain kernels compile none of the
    modifiers' code)."""
    MODS = bool(mods)

    @njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
    def tile_item(q, k, v, table, b, kvh, G, q0, nq, L, n, row0, sh, si, causal, window_left, cap, slopes,
                  qk_scale, out_scale, q_code, kv_code, out, lse):
        """One work item of R = G * nq rows (padded to Rp, a multiple of 16), as GEMMs on key tiles
        of KT tokens:
        St[KT, Rp] = K_tile[KT, D] @ Qt[D, Rp] (rows along the vector lanes), an online softmax
        vectorized over rows, then Acc[Rp, Dp] += P[Rp, KT] @ V_tile[KT, Dp]. ``MODS``: scores
        through ``mod_tile``, the window's first key tile; otherwise
        the plain scores, masked only on the tiles that cross some row's causal limit."""
        ONE, ADD, OVERWRITE = np.intp(1), np.bool_(True), np.bool_(False)  # not literals: see matmul
        D = q.shape[1]
        bs = k.shape[1]
        R = nq * G
        Rp = (R + 15) // 16 * 16
        Dp = (D + 15) // 16 * 16
        # Scores in base 2 (q times log2 e), except with a softcap: natural units into the tanh.
        qscale = np.float32(qk_scale) if cap > 0.0 else np.float32(qk_scale * LOG2E)
        capl = np.float32(cap * LOG2E)
        inv_cap = np.float32(1.0 / cap) if cap > 0.0 else np.float32(0.0)
        Qt = np.zeros(D * Rp, np.float32)
        row = np.empty(D, np.float32)
        lo = np.zeros(Rp, np.int32)   # int32: as wide as the float32 lanes of the score loops
        hi = np.zeros(Rp, np.int32)   # padding rows see nothing
        pos = np.zeros(Rp, np.int32)
        slope = np.zeros(Rp, np.float32)
        kmin = L
        kmax = 0
        minlim = L
        for r in range(R):
            h = kvh * G + r // nq
            i = q0 + r % nq
            load_row(q[row0 + h * sh + i * si], D, row, q_code)
            for d in range(D):
                Qt[d * Rp + r] = row[d] * qscale
            pos[r], lo[r], hi[r] = row_window(L, n, i, causal, window_left)
            if MODS:
                slope[r] = slopes[h] * np.float32(LOG2E)   # base 2
            if hi[r] > lo[r]:
                kmin = min(kmin, lo[r])
                kmax = max(kmax, hi[r])
            minlim = min(minlim, max(hi[r], 0))
        if MODS:
            alibi = False           # some row has a nonzero slope
            maxlo = 0               # tiles in [max lo, min hi) are visible to every row
            minhi = L
            for r in range(R):
                alibi |= slope[r] != 0.0
                maxlo = max(maxlo, lo[r])
                minhi = min(minhi, hi[r])
        Kf = np.zeros(KT * D, np.float32)
        Vf = np.zeros(KT * Dp, np.float32)
        Kbits = Kf.view(np.uint32)
        Vbits = Vf.view(np.uint32)
        St = np.empty(KT * Rp, np.float32)
        acc = np.zeros(Rp * Dp, np.float32)
        m = np.full(Rp, -np.inf, np.float32)
        lsum = np.zeros(Rp, np.float32)
        mt = np.empty(Rp, np.float32)
        chk = np.empty(Rp, np.float32)
        msub = np.empty(Rp, np.float32)
        alpha = np.empty(Rp, np.float32)
        ps = np.empty(Rp, np.float32)
        for t0 in range(kmin, kmax, KT):
            nk = min(KT, kmax - t0)  # keys of the tile that some row sees
            for j in range(nk):
                t = t0 + j
                phys = table[b, t // bs]
                load_tok(k, phys, t % bs, kvh, D, Kf, Kbits, j * D, kv_code)
                load_tok(v, phys, t % bs, kvh, D, Vf, Vbits, j * Dp, kv_code)
            nk4 = (nk + 3) // 4 * 4
            for x in range(nk * D, nk4 * D):
                Kf[x] = 0.0
            matmul(Kf, D, ONE, Qt, Rp, St, Rp, nk4, Rp, D, OVERWRITE)
            for r in range(Rp):
                mt[r] = m[r]
                chk[r] = 0.0
                ps[r] = 0.0
            if MODS:   # keys outside [lo, hi) masked, visible scores modified, the running max
                bare = not alibi and t0 >= maxlo and t0 + nk <= minhi   # no ALiBi term, no mask
                mod_tile_any(St, Rp, nk, t0, lo, hi, pos, slope, capl, inv_cap, cap > 0.0, bare, chk, mt)
            else:
                for j in range(nk):
                    for r in range(Rp):
                        s = St[j * Rp + r]
                        chk[r] += s - s  # NaN where a score is inf / NaN
                if t0 + nk > minlim:  # causal diagonal / short rows: mask keys the row does not see
                    for r in range(Rp):
                        for j in range(max(0, hi[r] - t0), nk):
                            St[j * Rp + r] = -np.inf
                for j in range(nk):
                    for r in range(Rp):
                        s = St[j * Rp + r]
                        mt[r] = s if s > mt[r] else mt[r]
            for r in range(Rp):
                if not chk[r] == 0.0 or not mt[r] < np.inf:  # non-finite scores: flag the row
                    m[r] = np.inf
                if m[r] == np.inf:
                    msub[r] = 0.0
                    alpha[r] = 1.0
                elif mt[r] == -np.inf:  # nothing visible yet
                    msub[r] = 0.0
                    alpha[r] = 1.0
                else:
                    alpha[r] = np.float32(math.exp2(m[r] - mt[r]))
                    m[r] = mt[r]
                    msub[r] = mt[r]
            for j in range(nk):
                for r in range(Rp):
                    x = j * Rp + r
                    # 2 ** (s - m): below -127 the exponent field is 0, so masked keys give exactly 0
                    p = exp2_f32(min(max(St[x] - msub[r], np.float32(-127.0)), np.float32(0.0)))
                    St[x] = p
                    ps[r] += p
            for r in range(R):
                lsum[r] = lsum[r] * alpha[r] + ps[r]
                if alpha[r] != 1.0:
                    for d in range(Dp):
                        acc[r * Dp + d] *= alpha[r]
            matmul(St, ONE, Rp, Vf, Dp, acc, Dp, Rp, Dp, nk, ADD)
        for r in range(R):
            h = kvh * G + r // nq
            i = q0 + r % nq
            finish_row(out, lse, row0 + h * sh + i * si, acc[r * Dp:r * Dp + D], m[r], lsum[r], out_scale)

    return tile_item


@functools.cache
def row_item_for(mods: bool):
    """``row_item`` with the modifiers on or off (``MODS``, a closure constant: numba prunes its
    branches before the inlined body is typed, so the plain kernels compile none of the
    modifiers' code)."""
    MODS = bool(mods)

    @njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
    def row_item(q, k, v, table, b, kvh, G, q0, nq, L, n, row0, sh, si, causal, window_left, cap, slopes,
                 qk_scale, out_scale, q_code, kv_code, out, lse):
        """One work item with few rows (decode): per paged block, row-by-key dot products. ``mods``:
        visible scores through ``mod_row`` into a scratch row, blocks from the window's first key."""
        D = q.shape[1]
        bs = k.shape[1]
        R = nq * G  # rows: (GQA head g, query q0 + r % nq) for r = g * nq + ...
        qscale = np.float32(qk_scale) if MODS else np.float32(qk_scale * LOG2E)   # MODS: natural units
        cap32 = np.float32(cap)
        inv_cap = np.float32(1.0 / cap) if cap > 0.0 else np.float32(0.0)
        Qs = np.empty((R, D), np.float32)
        acc = np.zeros((R, D), np.float32)
        m = np.full(R, -np.inf, np.float32)
        lsum = np.zeros(R, np.float32)
        lo = np.empty(R, np.int64)
        hi = np.empty(R, np.int64)
        pos = np.empty(R, np.int64)
        slope = np.zeros(R, np.float32)
        kmin = L
        kmax = 0
        for r in range(R):
            h = kvh * G + r // nq
            i = q0 + r % nq
            load_row(q[row0 + h * sh + i * si], D, Qs[r], q_code)
            for d in range(D):
                Qs[r, d] *= qscale
            pos[r], lo[r], hi[r] = row_window(L, n, i, causal, window_left)
            if MODS:
                slope[r] = slopes[h]
            if hi[r] > lo[r]:
                kmin = min(kmin, lo[r])
                kmax = max(kmax, hi[r])
        Kb = np.zeros((bs, D), np.float32)   # slots before the window stay 0 (never read)
        Vb = np.zeros((bs, D), np.float32)
        S = np.empty((R, bs), np.float32)
        P = np.empty(bs, np.float32)
        ebits = np.empty(bs, np.int32)
        for lb in range(kmin // bs, (kmax + bs - 1) // bs):
            phys = table[b, lb]
            t0 = lb * bs
            j0 = max(0, kmin - t0)
            nj = min(bs, kmax - t0)  # valid tokens of this block that some row sees
            for j in range(j0, nj):
                load_row(k[phys, j, kvh], D, Kb[j], kv_code)
                load_row(v[phys, j, kvh], D, Vb[j], kv_code)
            scores(Qs, Kb, nj, S)
            for r in range(R):
                a = max(lo[r] - t0, 0)
                e = min(hi[r] - t0, nj)
                nvis = e - a
                if nvis <= 0 or m[r] == np.inf:
                    continue
                w = P if MODS else S[r]     # the row's scores, from key a (MODS) or 0 (plain: a == 0)
                mb = np.float32(-np.inf)
                bad = np.float32(0.0)
                if MODS:
                    mb, bad = mod_row(S[r], a, nvis, P, cap32, inv_cap, slope[r], pos[r] - (t0 + a))
                else:
                    for j in range(nvis):
                        mb = max(mb, S[r, j])
                if not bad == 0.0 or not abs(mb) < np.inf:  # inf / NaN scores (float32 overflow): flag the row
                    m[r] = np.inf
                    continue
                m_new = max(m[r], mb)
                alpha = np.float32(math.exp2(m[r] - m_new))
                exp2_shifted(w, nvis, m_new, ebits)
                psum = np.float32(0.0)
                for j in range(nvis):
                    psum += w[j]
                lsum[r] = lsum[r] * alpha + psum
                m[r] = m_new
                if alpha != 1.0:
                    for d in range(D):
                        acc[r, d] *= alpha
                if MODS:
                    accumulate(acc, r, P, Vb[a:], nvis)
                else:
                    accumulate(acc, r, S[r], Vb, nvis)
        for r in range(R):
            h = kvh * G + r // nq
            i = q0 + r % nq
            finish_row(out, lse, row0 + h * sh + i * si, acc[r], m[r], lsum[r], out_scale)

    return row_item


ROWS_GEMM = 16  # work items with at least this many rows take the GEMM path


def uses_gemm(Sq: int, G: int, tq: int) -> bool:
    """Whether a forward of ``Sq`` queries per sequence and GQA group ``G`` takes the GEMM path:
    its first query tile has at least ROWS_GEMM rows (the last, shorter tile then takes it too)."""
    return min(Sq, max(1, tq // G)) * G >= ROWS_GEMM


def n_items(B: int, H: int, Hkv: int, Sq: int, tq: int) -> int:
    """Work items of a forward: (sequence, KV head, query tile) for B * Hkv * ceil(Sq / tqq)."""
    tqq = max(1, tq // (H // Hkv))
    return B * Hkv * ((Sq + tqq - 1) // tqq)


# The work items' two variants, as module globals (a kernel that captured them as closure variables
# could not be cached): each kernel calls one, chosen by its closure constants.
tile_item_plain, tile_item_mods = tile_item_for(False), tile_item_for(True)
row_item_plain, row_item_mods = row_item_for(False), row_item_for(True)


@functools.cache
def fwd_kernel(q_code: int, kv_code: int, gemm: bool):
    """The forward kernel for storage codes ``q_code`` / ``kv_code`` and one inner path:
    ``kernel(q, k, v, table, seq_lens, qk_scale, out_scale, causal, tq, out, lse, start, stop)``
    runs work items ``start <= item < stop`` (of ``n_items(...)``) as a ``prange`` loop (the
    client picks the thread count with ``launch``).

    The three values are closure constants: numba prunes the other dtypes' decoders and the other
    path before typing, so a call compiles only what it runs, and each tuple is its own entry of
    the on-disk cache. See the module docstring for the other arguments.
    """
    Q_CODE, KV_CODE, GEMM = int(q_code), int(kv_code), bool(gemm)

    @njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
    def paged_attention_fwd(q, k, v, table, seq_lens, qk_scale, out_scale, causal, tq, out, lse,
                            start, stop):
        B, H, Sq, D = q.shape
        Hkv = k.shape[2]
        G = H // Hkv
        tqq = max(1, tq // G)  # queries per tile: about tq rows (GQA heads x queries) per work item
        n_qt = (Sq + tqq - 1) // tqq
        q2 = q.reshape((B * H * Sq, D))     # the items address rows: b * H * Sq + h * Sq + i
        out2 = out.reshape((B * H * Sq, D))
        lse1 = lse.reshape(B * H * Sq)
        for item in prange(start, stop):
            prefer_512()  # the parfor body is its own LLVM function
            # Interleave heavy and light query tiles so that static chunks stay balanced under causal.
            pair = item % n_qt
            qt = pair // 2 if pair % 2 == 0 else n_qt - 1 - pair // 2
            b = item // n_qt // Hkv
            kvh = item // n_qt % Hkv
            q0 = qt * tqq
            nq = min(Sq, q0 + tqq) - q0
            if GEMM:
                tile_item_plain(q2, k, v, table, b, kvh, G, q0, nq, seq_lens[b], Sq, b * H * Sq, Sq, 1, causal,
                                -1, 0.0, _NO_SLOPES, qk_scale, out_scale, Q_CODE, KV_CODE, out2, lse1)
            else:
                row_item_plain(q2, k, v, table, b, kvh, G, q0, nq, seq_lens[b], Sq, b * H * Sq, Sq, 1, causal,
                               -1, 0.0, _NO_SLOPES, qk_scale, out_scale, Q_CODE, KV_CODE, out2, lse1)

    return paged_attention_fwd


def mod_items(cfg, tq: int):
    """The work items of a forward with modifiers, split by inner path: ``{gemm: (b, kvh, q0, nq)
    int32 arrays}`` -- per sequence with queries, per KV head, tiles of about ``tq`` rows."""
    G = cfg.H // cfg.Hkv
    tqq = max(1, tq // G)
    lists = {False: [], True: []}
    for b in range(cfg.B):
        n = int(cfg.q_lens[b])
        if n == 0:
            continue
        g = uses_gemm(n, G, tq)
        for kvh in range(cfg.Hkv):
            for q0 in range(0, n, tqq):
                lists[g].append((b, kvh, q0, min(n, q0 + tqq) - q0))
    return {g: tuple(np.ascontiguousarray(np.array(x, np.int32).reshape(-1, 4)[:, c]) for c in range(4))
            for g, x in lists.items() if x}


@functools.cache
def fwd_mods_kernel(q_code: int, kv_code: int, gemm: bool, mods: bool = True):
    """The forward over a work list (ragged batches, modifiers): the same work items as
    ``fwd_kernel``, their ``mods`` flag on when a window, softcap or ALiBi is (``mods`` False: a
    ragged batch with plain causal / full masks, which runs the plain score loops), with
    ``kernel(...)`` as follows:
    ``kernel(q, k, v, table, seq_lens, q_lens, row0, sh, si, it_b, it_kvh, it_q0, it_nq, qk_scale,
    out_scale, causal, window_left, softcap, slopes, out, lse, start, stop)`` with q / out viewed
    as [rows, D], lse [rows] (``cfg.row_layout()``), work items ``it_*`` from ``mod_items`` and
    ``slopes`` float32 [H] (zeros without ALiBi); softcap 0 = none, window_left -1 = none."""
    Q_CODE, KV_CODE, GEMM, MODS = int(q_code), int(kv_code), bool(gemm), bool(mods)

    @njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
    def paged_attention_fwd_mods(q, k, v, table, seq_lens, q_lens, row0, sh, si, it_b, it_kvh, it_q0,
                                 it_nq, qk_scale, out_scale, causal, window_left, softcap, slopes, out,
                                 lse, start, stop):
        G = slopes.shape[0] // k.shape[2]
        for item in prange(start, stop):
            prefer_512()
            b = it_b[item]
            if GEMM and MODS:
                tile_item_mods(q, k, v, table, b, it_kvh[item], G, it_q0[item], it_nq[item], seq_lens[b],
                               q_lens[b], row0[b], sh, si, causal, window_left, softcap, slopes, qk_scale,
                               out_scale, Q_CODE, KV_CODE, out, lse)
            elif GEMM:
                tile_item_plain(q, k, v, table, b, it_kvh[item], G, it_q0[item], it_nq[item], seq_lens[b],
                                q_lens[b], row0[b], sh, si, causal, window_left, softcap, slopes, qk_scale,
                                out_scale, Q_CODE, KV_CODE, out, lse)
            elif MODS:
                row_item_mods(q, k, v, table, b, it_kvh[item], G, it_q0[item], it_nq[item], seq_lens[b],
                              q_lens[b], row0[b], sh, si, causal, window_left, softcap, slopes, qk_scale,
                              out_scale, Q_CODE, KV_CODE, out, lse)
            else:
                row_item_plain(q, k, v, table, b, it_kvh[item], G, it_q0[item], it_nq[item], seq_lens[b],
                               q_lens[b], row0[b], sh, si, causal, window_left, softcap, slopes, qk_scale,
                               out_scale, Q_CODE, KV_CODE, out, lse)

    return paged_attention_fwd_mods
