"""Paged-attention backward on the CPU: dq, dk_blocks, dv_blocks, race-free and parallel.

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq queries per sequence, D head_dim,
N physical blocks, bs block_size, M max blocks per sequence.

Arguments (float32 unless said, C-contiguous, validated by ``ops/config.py``):

- ``qf``, ``dof``   [B, H, Sq, D]: q and dout decoded to float32
- ``k``, ``v``      [N, bs, Hkv, D] storage (float32, or uint16 / uint8 bits decoded in the kernel)
- ``delta``         [B, H, Sq]: rowsum(dout * out), the FlashAttention-2 preprocessing
- ``lse2``          [B, H, Sq]: the forward's lse in base 2 (lse * log2 e); -inf rows are skipped
- ``table`` int32 [B, M], ``seq_lens`` int32 [B]: token t of sequence b is slot ``t % bs`` of
  block ``table[b, t // bs]``; causal is bottom-right (query i sees keys j <= L - Sq + i)
- ``scale`` float (the softmax scale), ``causal`` bool
- the inputs may be read-only arrays; outputs are fresh float32 arrays

Kernels come from memoized factories (``dkdv_kernel(kv_code, gemm)``, ``dq_kernel(kv_code, gemm)``)
whose DType code and path are closure constants, so a call compiles only its dtype's decoder and
one path. Each kernel runs a range of work items as a ``prange`` loop; the client picks the thread
count (``launch``). ``delta`` is computed by the client (NumPy).

Two passes, each partitioned so that no two threads write the same element (no atomics, no
per-thread copies of the pool):

- dK/dV (``dkdv_kernel``): one work item per (KV head, physical block in use). It visits every (sequence,
  logical block) that reads the block -- the inverse of the block table, built by the client --
  and every query row of the G heads that sees it, so a slot shared by several sequences receives
  the sum of their gradients. Unread slots stay zero.
- dQ (``dq_kernel``): one work item per (sequence, KV head, tile of queries), the forward's partition.

P = 2 ** (c * q.k - lse2) with c = scale * log2 e; dP = dout . v; dS = P * (dP - delta);
dV += P^T dout; dK += scale * dS^T q; dQ += scale * dS k.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from . import FASTMATH
from .codecs import load_row
from .gemm import accumulate, accumulate_rows, matmul, prefer_512, scores
from .paged_attention import LOG2E, exp2_shifted

_QCHUNK = 64  # query rows per pass over a block in bwd_dkdv


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _probs_and_ds(S, dP, n_rows, nj, c, lse2_rows, delta_rows, first_vis, step_vis, ebits):
    """Turn scores S into P (in place) and dP into dS (in place) for ``n_rows`` rows and ``nj``
    keys; row r sees ``first_vis + r * step_vis`` keys (clamped to [0, nj]); others get 0."""
    prefer_512()
    for r in range(n_rows):
        nvis = min(nj, max(0, first_vis + r * step_vis))
        l2 = lse2_rows[r]
        if l2 == -np.inf:
            nvis = 0
        for j in range(nvis):
            S[r, j] *= c
        exp2_shifted(S[r], nvis, l2, ebits)
        dl = delta_rows[r]
        for j in range(nvis):
            dP[r, j] = S[r, j] * (dP[r, j] - dl)
        for j in range(nvis, nj):
            S[r, j] = 0.0
            dP[r, j] = 0.0


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def dkdv_item(item, qf, dof, k, v, delta, lse2, seq_lens, scale, causal, blocks, rd_start, rd_b, rd_lb, dk, dv,
              kv_code, gemm):
    """Work item ``item`` of the dK/dV pass (see ``dkdv_kernel``), inlined into the kernel, whose
    closure constants ``kv_code`` and ``gemm`` prune the other dtypes and the other path."""
    ONE, ADD, OVERWRITE = np.intp(1), np.bool_(True), np.bool_(False)  # not literals: see matmul
    B, H, Sq, D = qf.shape
    bs = k.shape[1]
    Hkv = k.shape[2]
    G = H // Hkv
    c = np.float32(scale * LOG2E)
    n_used = blocks.shape[0]
    kvh = item // n_used
    n = blocks[item % n_used]
    # Slots that some reader reads: decode those only (unused slots may hold NaN).
    nread = 0
    for x in range(rd_start[item % n_used], rd_start[item % n_used + 1]):
        nread = max(nread, min(bs, seq_lens[rd_b[x]] - rd_lb[x] * bs))
    Kb = np.zeros((bs, D), np.float32)
    Vb = np.zeros((bs, D), np.float32)
    for j in range(nread):
        load_row(k[n, j, kvh], D, Kb[j], kv_code)
        load_row(v[n, j, kvh], D, Vb[j], kv_code)
    KbT = np.empty(D * bs, np.float32)   # [D, bs] for the GEMM path
    VbT = np.empty(D * bs, np.float32)
    if gemm:
        for j in range(bs):
            for d in range(D):
                KbT[d * bs + j] = Kb[j, d]
                VbT[d * bs + j] = Vb[j, d]
    Qp = np.zeros(_QCHUNK * D, np.float32)
    dOp = np.zeros(_QCHUNK * D, np.float32)
    Sf = np.empty(_QCHUNK * bs, np.float32)
    dPf = np.empty(_QCHUNK * bs, np.float32)
    S = Sf.reshape((_QCHUNK, bs))
    dP = dPf.reshape((_QCHUNK, bs))
    dKf = np.zeros(bs * D, np.float32)
    dVf = np.zeros(bs * D, np.float32)
    dKa = dKf.reshape((bs, D))
    dVa = dVf.reshape((bs, D))
    PT = np.empty((bs, _QCHUNK), np.float32)
    ebits = np.empty(bs, np.int32)
    for x in range(rd_start[item % n_used], rd_start[item % n_used + 1]):
        b = rd_b[x]
        L = seq_lens[b]
        t0 = rd_lb[x] * bs
        nj = min(bs, L - t0)
        # Causal: query i sees L - Sq + i + 1 - t0 keys of this block; rows below i0 see none.
        i0 = max(0, t0 - L + Sq) if causal else 0
        for g in range(G):
            h = kvh * G + g
            for c0 in range(i0, Sq, _QCHUNK):
                nr = min(_QCHUNK, Sq - c0)
                Qc = qf[b, h, c0:c0 + nr]
                dOc = dof[b, h, c0:c0 + nr]
                if gemm:
                    nr4 = (nr + 3) // 4 * 4
                    for r in range(nr):
                        for d in range(D):
                            Qp[r * D + d] = Qc[r, d]
                            dOp[r * D + d] = dOc[r, d]
                    for x2 in range(nr * D, nr4 * D):
                        Qp[x2] = 0.0
                        dOp[x2] = 0.0
                    matmul(Qp, D, ONE, KbT, bs, Sf, bs, nr4, bs, D, OVERWRITE)
                    matmul(dOp, D, ONE, VbT, bs, dPf, bs, nr4, bs, D, OVERWRITE)
                else:
                    scores(Qc, Kb, nj, S)
                    scores(dOc, Vb, nj, dP)
                first = L - Sq + c0 + 1 - t0 if causal else nj
                _probs_and_ds(S, dP, nr, nj, c, lse2[b, h, c0:c0 + nr], delta[b, h, c0:c0 + nr],
                              first, 1 if causal else 0, ebits)
                if gemm:
                    for r in range(nr):
                        for j in range(nj, bs):   # keys past this reader's length add nothing
                            S[r, j] = 0.0
                            dP[r, j] = 0.0
                    # A read transposed (a_rs 1, a_ks bs): P^T and dS^T.
                    matmul(Sf, ONE, bs, dOp, D, dVf, D, bs, D, nr, ADD)
                    matmul(dPf, ONE, bs, Qp, D, dKf, D, bs, D, nr, ADD)
                else:
                    for j in range(nj):
                        for r in range(nr):
                            PT[j, r] = S[r, j]
                    accumulate_rows(dVa, PT, dOc, nj, nr)
                    for j in range(nj):
                        for r in range(nr):
                            PT[j, r] = dP[r, j]
                    accumulate_rows(dKa, PT, Qc, nj, nr)
    for j in range(nread):
        for d in range(D):
            dk[n, j, kvh, d] = dKa[j, d] * scale
            dv[n, j, kvh, d] = dVa[j, d]


@functools.cache
def dkdv_kernel(kv_code: int, gemm: bool):
    """The dK/dV pass for K/V storage code ``kv_code``, on the GEMM path or the loop path.

    One work item per (KV head, physical block in use ``blocks[u]``), visiting its readers
    ``(rd_b[x], rd_lb[x])`` for x in ``rd_start[u]:rd_start[u + 1]``. Per reader and chunk of
    query rows: S = Q_c K^T and dP = dO_c V^T [rows, bs], P / dS in place, then dV += P^T dO_c and
    dK += dS^T Q_c [bs, D]. ``gemm`` (bs and D multiples of 16): the four products on the 512-bit
    microkernels (K / V transposed once per block, the chunk's rows copied into zero-padded
    scratch); otherwise dot-product loops.

    Kernel arguments ``(qf, dof, k, v, delta, lse2, seq_lens, scale, causal, blocks, rd_start, rd_b,
    rd_lb, dk, dv, start, stop)``, running work items ``start <= item < stop`` of
    ``Hkv * n_used`` (item = kvh * n_used + u) as a ``prange`` loop: ``blocks`` int64 [n_used]; ``rd_start`` int64 [n_used + 1]; ``rd_b``, ``rd_lb``
    int64 [n_readers]; ``dk``, ``dv`` float32 [N, bs, Hkv, D] (zero on entry; slots read are
    written); the others as in the module docstring.
    """
    KV_CODE, GEMM = int(kv_code), bool(gemm)

    @njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
    def bwd_dkdv(qf, dof, k, v, delta, lse2, seq_lens, scale, causal, blocks, rd_start, rd_b, rd_lb,
                 dk, dv, start, stop):
        for item in prange(start, stop):
            prefer_512()
            dkdv_item(item, qf, dof, k, v, delta, lse2, seq_lens, scale, causal, blocks, rd_start, rd_b,
                      rd_lb, dk, dv, KV_CODE, GEMM)

    return bwd_dkdv


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def dq_item(item, qf, dof, k, v, delta, lse2, table, seq_lens, scale, causal, tq, dq, kv_code, gemm):
    """Work item ``item`` of the dQ pass (see ``dq_kernel``), inlined like ``dkdv_item``."""
    ONE, ADD, OVERWRITE = np.intp(1), np.bool_(True), np.bool_(False)  # not literals: see matmul
    B, H, Sq, D = qf.shape
    bs = k.shape[1]
    Hkv = k.shape[2]
    G = H // Hkv
    c = np.float32(scale * LOG2E)
    n_qt = (Sq + tq - 1) // tq
    pair = item % n_qt
    qt = pair // 2 if pair % 2 == 0 else n_qt - 1 - pair // 2
    b = item // n_qt // Hkv
    kvh = item // n_qt % Hkv
    L = seq_lens[b]
    q0 = qt * tq
    nq = min(Sq, q0 + tq) - q0
    R = nq * G
    R4 = (R + 3) // 4 * 4
    Qf = np.zeros(R4 * D, np.float32)
    dOf = np.zeros(R4 * D, np.float32)
    Qs = Qf.reshape((R4, D))
    dOs = dOf.reshape((R4, D))
    l2 = np.empty(R, np.float32)
    dl = np.empty(R, np.float32)
    for r in range(R):
        h = kvh * G + r // nq
        i = q0 + r % nq
        for d in range(D):
            Qs[r, d] = qf[b, h, i, d]
            dOs[r, d] = dof[b, h, i, d]
        l2[r] = lse2[b, h, i]
        dl[r] = delta[b, h, i]
    kmax = min(L, max(0, L - Sq + q0 + nq)) if causal else L
    accf = np.zeros(R4 * D, np.float32)
    acc = accf.reshape((R4, D))
    Kb = np.zeros((bs, D), np.float32)   # rows past a block's valid keys stay finite (dS is 0 there)
    Vb = np.zeros((bs, D), np.float32)
    Kf = Kb.reshape(bs * D)
    KbT = np.zeros(D * bs, np.float32)   # [D, bs] for the GEMM path
    VbT = np.zeros(D * bs, np.float32)
    Sf = np.empty(R4 * bs, np.float32)
    dPf = np.empty(R4 * bs, np.float32)
    S = Sf.reshape((R4, bs))
    dP = dPf.reshape((R4, bs))
    ebits = np.empty(bs, np.int32)
    for lb in range((kmax + bs - 1) // bs):
        phys = table[b, lb]
        t0 = lb * bs
        nj = min(bs, kmax - t0)
        for j in range(nj):
            load_row(k[phys, j, kvh], D, Kb[j], kv_code)
            load_row(v[phys, j, kvh], D, Vb[j], kv_code)
        if gemm:
            for j in range(nj):
                for d in range(D):
                    KbT[d * bs + j] = Kb[j, d]
                    VbT[d * bs + j] = Vb[j, d]
            matmul(Qf, D, ONE, KbT, bs, Sf, bs, R4, bs, D, OVERWRITE)
            matmul(dOf, D, ONE, VbT, bs, dPf, bs, R4, bs, D, OVERWRITE)
        else:
            scores(Qs, Kb, nj, S)
            scores(dOs, Vb, nj, dP)
        for g in range(G):
            lo = g * nq
            first = L - Sq + q0 + 1 - t0 if causal else nj
            _probs_and_ds(S[lo:lo + nq], dP[lo:lo + nq], nq, nj, c, l2[lo:lo + nq], dl[lo:lo + nq],
                          first, 1 if causal else 0, ebits)
        if gemm:
            for r in range(R):
                for j in range(nj, bs):   # keys past kmax in this block add nothing
                    dP[r, j] = 0.0
            matmul(dPf, bs, ONE, Kf, D, accf, D, R4, D, bs, ADD)
        else:
            for r in range(R):
                accumulate(acc, r, dP[r], Kb, nj)
    for r in range(R):
        h = kvh * G + r // nq
        i = q0 + r % nq
        for d in range(D):
            dq[b, h, i, d] = acc[r, d] * scale


@functools.cache
def dq_kernel(kv_code: int, gemm: bool):
    """The dQ pass for K/V storage code ``kv_code``, on the GEMM path or the loop path.

    One work item per (sequence, KV head, query tile; rows (GQA head g, query q0 + r % nq)); per
    paged block: S = Q K^T and dP = dO V^T [rows, bs], P / dS in place, dQ += dS K. ``gemm`` (bs
    and D multiples of 16): the three products on the 512-bit microkernels (rows padded to a
    multiple of 4 with zeros); otherwise dot-product loops.

    Kernel arguments ``(qf, dof, k, v, delta, lse2, table, seq_lens, scale, causal, tq, dq, start,
    stop)``, running work items ``start <= item < stop`` of ``B * Hkv * ceil(Sq / tq)`` on the
    calling thread without the GIL: ``tq`` int, queries per tile; ``dq`` float32 [B, H, Sq, D] (written, every element); the
    others as in the module docstring.
    """
    KV_CODE, GEMM = int(kv_code), bool(gemm)

    @njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
    def bwd_dq(qf, dof, k, v, delta, lse2, table, seq_lens, scale, causal, tq, dq, start, stop):
        for item in prange(start, stop):
            prefer_512()
            dq_item(item, qf, dof, k, v, delta, lse2, table, seq_lens, scale, causal, tq, dq,
                    KV_CODE, GEMM)

    return bwd_dq


def gemm_ok(bs: int, D: int) -> bool:
    """Whether the backward can run its products on the 512-bit microkernels (whole 16-float
    vectors of keys and dims)."""
    return bs % 16 == 0 and D % 16 == 0
