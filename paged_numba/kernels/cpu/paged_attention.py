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

import functools
import math

import numpy as np
from numba import njit, prange

from ...dtypes import BF16, F32

# fastmath without nnan/ninf: -inf must stay -inf (SPEC: lse = -inf for empty rows).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@functools.cache
def decoder(code: int):
    """``load(src, n, dst, tab)``: float32 values of the first ``n`` storage elements of 1-D ``src``
    into ``dst``. F32 copies, BF16 shifts the bits, F16 / FP8 look them up in ``tab``."""
    if code == F32:
        @njit(inline="always", fastmath=FASTMATH, cache=True)
        def load(src, n, dst, tab):
            for i in range(n):
                dst[i] = src[i]
    elif code == BF16:
        @njit(inline="always", fastmath=FASTMATH, cache=True)
        def load(src, n, dst, tab):
            bits = dst.view(np.uint32)
            for i in range(n):
                bits[i] = np.uint32(src[i]) << np.uint32(16)
    else:
        @njit(inline="always", fastmath=FASTMATH, cache=True)
        def load(src, n, dst, tab):
            for i in range(n):
                dst[i] = tab[src[i]]
    return load


@functools.cache
def fwd_kernel(q_code: int, kv_code: int):
    """The forward kernel for q stored as ``q_code`` and K/V stored as ``kv_code`` (dtypes codes)."""
    load_q = decoder(q_code)
    load_kv = decoder(kv_code)

    @njit(parallel=True, fastmath=FASTMATH, cache=True)
    def fwd(q, k, v, table, seq_lens, scale, causal, tq, qtab, kvtab, out, lse):
        B, H, Sq, D = q.shape
        bs = k.shape[1]
        Hkv = k.shape[2]
        G = H // Hkv
        n_qt = (Sq + tq - 1) // tq
        n_items = B * Hkv * n_qt
        qscale = np.float32(scale * LOG2E)
        for item in prange(n_items):
            # Interleave heavy and light query tiles so static chunks stay balanced under causal.
            pair = item % n_qt
            qt = pair // 2 if pair % 2 == 0 else n_qt - 1 - pair // 2
            bh = item // n_qt
            b = bh // Hkv
            kvh = bh % Hkv
            L = seq_lens[b]
            q0 = qt * tq
            nq = min(Sq, q0 + tq) - q0
            R = nq * G
            Qs = np.empty((R, D), np.float32)
            acc = np.zeros((R, D), np.float32)
            m = np.full(R, -np.inf, np.float32)
            lsum = np.zeros(R, np.float32)
            lim = np.empty(R, np.int64)
            kmax = 0
            for r in range(R):
                g = r // nq
                i = q0 + r % nq
                load_q(q[b, kvh * G + g, i], D, Qs[r], qtab)
                for d in range(D):
                    Qs[r, d] *= qscale
                lr = L
                if causal:
                    lr = min(L, max(0, L - Sq + i + 1))
                lim[r] = lr
                kmax = max(kmax, lr)
            Kb = np.empty((bs, D), np.float32)
            Vb = np.empty((bs, D), np.float32)
            S = np.empty(bs, np.float32)
            n_blocks = (kmax + bs - 1) // bs
            for lb in range(n_blocks):
                phys = table[b, lb]
                t0 = lb * bs
                nj = min(bs, kmax - t0)
                for j in range(nj):
                    load_kv(k[phys, j, kvh], D, Kb[j], kvtab)
                    load_kv(v[phys, j, kvh], D, Vb[j], kvtab)
                for r in range(R):
                    nvis = min(nj, lim[r] - t0)
                    if nvis <= 0:
                        continue
                    mb = -np.inf
                    for j in range(nvis):
                        s = np.float32(0.0)
                        for d in range(D):
                            s += Qs[r, d] * Kb[j, d]
                        S[j] = s
                        mb = max(mb, s)
                    m_new = max(m[r], mb)
                    alpha = np.float32(math.exp2(m[r] - m_new))
                    psum = np.float32(0.0)
                    for j in range(nvis):
                        p = np.float32(math.exp2(S[j] - m_new))
                        S[j] = p
                        psum += p
                    lsum[r] = lsum[r] * alpha + psum
                    m[r] = m_new
                    for d in range(D):
                        acc[r, d] *= alpha
                    for j in range(nvis):
                        p = S[j]
                        for d in range(D):
                            acc[r, d] += p * Vb[j, d]
            for r in range(R):
                g = r // nq
                i = q0 + r % nq
                h = kvh * G + g
                if lsum[r] > 0:
                    inv = np.float32(1.0) / lsum[r]
                    for d in range(D):
                        out[b, h, i, d] = acc[r, d] * inv
                    lse[b, h, i] = np.float32((m[r] + math.log2(lsum[r])) * LN2)
                else:
                    for d in range(D):
                        out[b, h, i, d] = 0.0
                    lse[b, h, i] = -np.inf

    return fwd
