"""Fused paged-attention forward on the CPU: parallel ``@njit`` loops over the block table.

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq queries per sequence, D head_dim,
N physical blocks, bs block_size, M max blocks per sequence.

Arguments (storage dtypes, C-contiguous, validated by ``ops/config.py``):

- ``q``        [B, H, Sq, D]  float32, or uint16 / uint8 bits decoded through ``qtab``
- ``k``, ``v`` [N, bs, Hkv, D] float32, or uint16 / uint8 bits decoded through ``kvtab``
- ``table``    int32 [B, M]; token t of sequence b is slot ``t % bs`` of block ``table[b, t // bs]``;
  only entries with ``t < seq_lens[b]`` are read
- ``seq_lens`` int32 [B]
- ``out``      float32 [B, H, Sq, D] (written), ``lse`` float32 [B, H, Sq] (written, natural log)

One parallel work item is (sequence b, KV head, tile of queries): it serves the whole GQA group
(G query heads x the tile's queries), so each K/V block is read from memory once per tile. Keys are
visited block by block with an online softmax in base 2 (q is pre-scaled by ``scale * log2(e)``);
only the ``nj`` valid tokens of a block are decoded, so whatever sits in unused slots (NaN included)
never reaches a result. Causal is bottom-right aligned: query i sees keys j <= L - Sq + i.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ...dtypes import BF16, F32

# fastmath without nnan/ninf: -inf must stay -inf (SPEC: lse = -inf for empty rows).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# 2 ** f on [0, 1): degree-5 fit, relative error < 8e-8 (under float32's half-ulp).
_C0, _C1, _C2, _C3, _C4, _C5 = (np.float32(c) for c in (
    0.99999993, 0.69315297, 0.24015453, 0.0558236, 0.00899258, 0.00187623))


@njit(inline="always", fastmath=FASTMATH, cache=True)
def load_row(src, n, dst, code, tab):
    """float32 values of the first ``n`` storage elements of 1-D ``src`` into ``dst``: F32 copies,
    BF16 shifts the bits into place, F16 / FP8 look the bits up in ``tab``."""
    if code == F32:
        for i in range(n):
            dst[i] = src[i]
    elif code == BF16:
        bits = dst.view(np.uint32)
        for i in range(n):
            bits[i] = np.uint32(src[i]) << np.uint32(16)
    else:
        for i in range(n):
            dst[i] = tab[np.intp(src[i])]


@njit(inline="always", fastmath=FASTMATH, cache=True)
def exp2_shifted(s, n, m, ebits):
    """``s[:n] = 2 ** (s[:n] - m)`` for finite ``s <= m``, as two loops LLVM vectorizes (libm's
    scalar ``exp2`` does not vectorize). Arguments below -126 give ~1e-38 instead of 0."""
    scale = ebits.view(np.float32)
    for j in range(n):
        x = max(s[j] - m, np.float32(-126.0))
        xf = np.float32(math.floor(x))
        f = x - xf
        s[j] = _C0 + f * (_C1 + f * (_C2 + f * (_C3 + f * (_C4 + f * _C5))))
        ebits[j] = (np.int32(xf) + np.int32(127)) << np.int32(23)
    for j in range(n):
        s[j] *= scale[j]


@njit(inline="always", fastmath=FASTMATH, cache=True)
def scores(Qs, Kb, nj, S):
    """``S[r, j] = dot(Qs[r], Kb[j])`` for all rows and j < nj; four rows share each key load."""
    R, D = Qs.shape
    R4 = R - R % 4
    for r in range(0, R4, 4):
        for j in range(nj):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for d in range(D):
                kd = Kb[j, d]
                a0 += Qs[r, d] * kd
                a1 += Qs[r + 1, d] * kd
                a2 += Qs[r + 2, d] * kd
                a3 += Qs[r + 3, d] * kd
            S[r, j] = a0
            S[r + 1, j] = a1
            S[r + 2, j] = a2
            S[r + 3, j] = a3
    for r in range(R4, R):
        for j in range(nj):
            a0 = np.float32(0.0)
            for d in range(D):
                a0 += Qs[r, d] * Kb[j, d]
            S[r, j] = a0


@njit(inline="always", fastmath=FASTMATH, cache=True)
def accumulate(acc, r, p, Vb, n):
    """``acc[r] += sum_j p[j] * Vb[j]`` for j < n, four keys per pass over acc[r]."""
    D = acc.shape[1]
    j = 0
    while j + 4 <= n:
        p0 = p[j]
        p1 = p[j + 1]
        p2 = p[j + 2]
        p3 = p[j + 3]
        for d in range(D):
            acc[r, d] += p0 * Vb[j, d] + p1 * Vb[j + 1, d] + p2 * Vb[j + 2, d] + p3 * Vb[j + 3, d]
        j += 4
    while j < n:
        p0 = p[j]
        for d in range(D):
            acc[r, d] += p0 * Vb[j, d]
        j += 1


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def paged_attention_fwd(q, k, v, table, seq_lens, qk_scale, out_scale, causal, tq,
                        q_code, qtab, kv_code, kvtab, out, lse):
    """The fused forward. ``qk_scale`` multiplies q . k (softmax scale times any dequantization
    scales of q and k); ``out_scale`` multiplies the normalized output (v's dequantization scale over
    the output scale). ``q_code`` / ``kv_code`` are DType codes of the storage; ``qtab`` / ``kvtab``
    their decode tables (F16, FP8). A row with non-finite scores (inf / NaN in q or k, or scale * q . k
    overflowing float32) gets ``lse = +inf``; the client raises."""
    B, H, Sq, D = q.shape
    bs = k.shape[1]
    Hkv = k.shape[2]
    G = H // Hkv
    n_qt = (Sq + tq - 1) // tq
    qscale = np.float32(qk_scale * LOG2E)
    for item in prange(B * Hkv * n_qt):
        # Interleave heavy and light query tiles so static chunks stay balanced under causal.
        pair = item % n_qt
        qt = pair // 2 if pair % 2 == 0 else n_qt - 1 - pair // 2
        b = item // n_qt // Hkv
        kvh = item // n_qt % Hkv
        L = seq_lens[b]
        q0 = qt * tq
        nq = min(Sq, q0 + tq) - q0
        R = nq * G  # rows: (GQA head g, query q0 + r % nq) for r = g * nq + ...
        Qs = np.empty((R, D), np.float32)
        acc = np.zeros((R, D), np.float32)
        m = np.full(R, -np.inf, np.float32)
        lsum = np.zeros(R, np.float32)
        lim = np.empty(R, np.int64)  # keys visible to the row
        kmax = 0
        for r in range(R):
            i = q0 + r % nq
            load_row(q[b, kvh * G + r // nq, i], D, Qs[r], q_code, qtab)
            for d in range(D):
                Qs[r, d] *= qscale
            lim[r] = min(L, max(0, L - Sq + i + 1)) if causal else L
            kmax = max(kmax, lim[r])
        Kb = np.empty((bs, D), np.float32)
        Vb = np.empty((bs, D), np.float32)
        S = np.empty((R, bs), np.float32)
        ebits = np.empty(bs, np.int32)
        for lb in range((kmax + bs - 1) // bs):
            phys = table[b, lb]
            t0 = lb * bs
            nj = min(bs, kmax - t0)  # valid tokens of this block that some row sees
            for j in range(nj):
                load_row(k[phys, j, kvh], D, Kb[j], kv_code, kvtab)
                load_row(v[phys, j, kvh], D, Vb[j], kv_code, kvtab)
            scores(Qs, Kb, nj, S)
            for r in range(R):
                nvis = min(nj, lim[r] - t0)
                if nvis <= 0 or m[r] == np.inf:
                    continue
                mb = S[r, 0]
                for j in range(1, nvis):
                    mb = max(mb, S[r, j])
                if not abs(mb) < np.inf:  # inf / NaN scores (float32 overflow): flag the row
                    m[r] = np.inf
                    continue
                m_new = max(m[r], mb)
                alpha = np.float32(math.exp2(m[r] - m_new))
                exp2_shifted(S[r], nvis, m_new, ebits)
                psum = np.float32(0.0)
                for j in range(nvis):
                    psum += S[r, j]
                lsum[r] = lsum[r] * alpha + psum
                m[r] = m_new
                if alpha != 1.0:
                    for d in range(D):
                        acc[r, d] *= alpha
                accumulate(acc, r, S[r], Vb, nvis)
        for r in range(R):
            i = q0 + r % nq
            h = kvh * G + r // nq
            if m[r] == -np.inf:  # no visible key
                for d in range(D):
                    out[b, h, i, d] = 0.0
                lse[b, h, i] = -np.inf
            elif m[r] == np.inf:  # non-finite scores: flagged for the client
                for d in range(D):
                    out[b, h, i, d] = np.nan
                lse[b, h, i] = np.inf
            else:
                inv = np.float32(out_scale) / lsum[r]
                for d in range(D):
                    out[b, h, i, d] = acc[r, d] * inv
                lse[b, h, i] = np.float32((m[r] + math.log2(lsum[r])) * LN2)
