"""Paged-attention backward on the CPU: dq, dk_blocks, dv_blocks, race-free and parallel, with
ragged rows, sliding windows, softcap and ALiBi.

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, n_b queries of sequence b (Sq in the
dense layout), D head_dim, N physical blocks, bs block_size, M max blocks per sequence.

Arguments (float32 unless said, C-contiguous, validated by ``ops/config.py``):

- ``qf``, ``dof``   [rows, D]: q and dout decoded to float32, as rows: query i of sequence b, head
  h is row ``row0[b] + h * sh + i * si`` (``cfg.row_layout()``: the dense [B, H, Sq, D] layout or
  the ragged token-major [T, H, D] one)
- ``k``, ``v``      [N, bs, Hkv, D] storage (float32, or uint16 / uint8 bits decoded in the kernel)
- ``delta``         [rows]: rowsum(dout * out), the FlashAttention-2 preprocessing
- ``lse2``          [rows]: the forward's lse in base 2 (lse * log2 e); -inf rows are skipped
- ``table`` int32 [B, M], ``seq_lens`` int32 [B], ``q_lens`` int32 [B], ``row0`` int32 [B],
  ``sh``, ``si`` int: token t of sequence b is slot ``t % bs`` of block ``table[b, t // bs]``;
  query i of sequence b sits at p = L_b - n_b + i
- ``scale`` float (the softmax scale), ``causal`` bool, ``window_left`` int (-1 = none),
  ``softcap`` float (0 = none), ``slopes`` float32 [H] (ALiBi; zeros = none): query p sees key j
  when ``p - window_left <= j`` (with a window) and ``j <= p`` (causal); its score
  s = scale * q . k becomes softcap * tanh(s / softcap), then s - slope_h * |p - j|
- the inputs may be read-only arrays; outputs are fresh float32 arrays

Kernels come from memoized factories (``dkdv_kernel(kv_code, gemm)``, ``dq_kernel(kv_code, gemm)``)
whose DType code and path are closure constants, so a call compiles only its dtype's decoder and
one path; plain calls and calls with modifiers share them (the modifiers are run-time values, whose
branches sit outside the inner loops). Each kernel is a serial ``nogil`` loop over a range of work
items, which ``launch`` splits over threads (it compiles in half the time of a ``prange`` loop).
``delta`` is computed by the client (NumPy).

Two passes, each partitioned so that no two threads write the same element (no atomics, no
per-thread copies of the pool):

- dK/dV (``dkdv_kernel``): one work item per (KV head, physical block in use). It visits every (sequence,
  logical block) that reads the block -- the inverse of the block table, built by the client --
  and every query row of the G heads that sees it, so a slot shared by several sequences receives
  the sum of their gradients. Unread slots (and slots no query's window reaches) stay zero and are
  never decoded.
- dQ (``dq_kernel``): one work item per (sequence, KV head, tile of queries) of ``dq_items``; its
  paged blocks start at the first key its window lets in.

P = 2 ** (s * log2 e - lse2); dP = dout . v; dS = P * (dP - delta), times 1 - tanh^2(scale q.k /
softcap) with a softcap (ALiBi and the masks are constants); dV += P^T dout; dK += scale * dS^T q;
dQ += scale * dS k.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit

from . import FASTMATH
from .codecs import load_row
from .gemm import accumulate, accumulate_rows, matmul, no_alias, prefer_512, scores
from .mathf import tanh_f32
from .paged_attention import LOG2E, exp2_shifted, row_window

_QCHUNK = 64  # query rows per pass over a block in bwd_dkdv


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _probs_and_ds(S, dP, n_rows, nj, t0, L, n, i0, causal, window_left, scale, cap, slope, lse2_rows,
                  delta_rows, ebits, dtanh):
    """Turn the raw products S = q . k into P (in place) and dP = dout . v into dS (in place) for
    ``n_rows`` rows and ``nj`` keys: row r is query ``i0 + r`` of a sequence with L keys and n
    queries, key j is token ``t0 + j``. Keys the row does not see get P = dS = 0."""
    prefer_512()
    c = np.float32(scale * LOG2E)
    sc = np.float32(scale)
    cap32 = np.float32(cap)
    inv_cap = np.float32(1.0 / cap) if cap > 0.0 else np.float32(0.0)
    sl2 = np.float32(slope * LOG2E)
    for r in range(n_rows):
        p, lo, hi = row_window(L, n, i0 + r, causal, window_left)
        a = min(max(lo - t0, 0), nj)
        e = max(min(hi - t0, nj), a)
        l2 = lse2_rows[r]
        if l2 == -np.inf:
            e = a
        if cap > 0.0:
            for j in range(a, e):
                t = tanh_f32(S[r, j] * sc * inv_cap)
                dtanh[j] = np.float32(1.0) - t * t
                S[r, j] = cap32 * t * np.float32(LOG2E) - sl2 * np.float32(abs(p - t0 - j))
        elif slope != 0.0:
            for j in range(a, e):
                S[r, j] = S[r, j] * c - sl2 * np.float32(abs(p - t0 - j))
        else:
            for j in range(a, e):
                S[r, j] *= c
        exp2_shifted(S[r], e, l2, ebits)   # keys below a are garbage here, zeroed below
        dl = delta_rows[r]
        if cap > 0.0:
            for j in range(a, e):
                dP[r, j] = S[r, j] * (dP[r, j] - dl) * dtanh[j]
        else:
            for j in range(a, e):
                dP[r, j] = S[r, j] * (dP[r, j] - dl)
        for j in range(a):
            S[r, j] = 0.0
            dP[r, j] = 0.0
        for j in range(e, nj):
            S[r, j] = 0.0
            dP[r, j] = 0.0


@njit(inline="always", error_model="numpy", cache=True)
def _reader_rows(L, n, t0, nj, causal, window_left):
    """(ia, ie): the queries ia <= i < ie of a sequence (L keys, n queries) that see some key of
    tokens t0 .. t0 + nj - 1 (causal: p >= t0; window: p - window_left < t0 + nj)."""
    ia = max(0, t0 - L + n) if causal else 0
    ie = min(n, t0 + nj + window_left - L + n) if window_left >= 0 else n
    return ia, max(ia, ie)


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def dkdv_item(item, qf, dof, k, v, delta, lse2, seq_lens, q_lens, row0, sh, si, scale, causal,
              window_left, cap, slopes, blocks, rd_start, rd_b, rd_lb, dk, dv, kv_code, gemm):
    """Work item ``item`` of the dK/dV pass (see ``dkdv_kernel``), inlined into the kernel, whose
    closure constants ``kv_code`` and ``gemm`` prune the other dtypes and the other path."""
    ONE, ADD, OVERWRITE = np.intp(1), np.bool_(True), np.bool_(False)  # not literals: see matmul
    D = qf.shape[1]
    bs = k.shape[1]
    Hkv = k.shape[2]
    G = slopes.shape[0] // Hkv
    n_used = blocks.shape[0]
    kvh = item // n_used
    u = item % n_used
    nb = blocks[u]
    # Slots some reader's queries see: decode [jlo, nread) only (unused slots may hold NaN, and so
    # may keys no query's window reaches).
    nread = 0
    jlo = bs
    for x in range(rd_start[u], rd_start[u + 1]):
        b = rd_b[x]
        L = seq_lens[b]
        t0 = rd_lb[x] * bs
        nj = min(bs, L - t0)
        ia, ie = _reader_rows(L, q_lens[b], t0, nj, causal, window_left)
        if ie > ia:
            nread = max(nread, nj)
            lo = row_window(L, q_lens[b], ia, causal, window_left)[1]
            jlo = min(jlo, max(0, lo - t0))
    Kb = np.zeros((bs, D), np.float32)
    Vb = np.zeros((bs, D), np.float32)
    for j in range(jlo, nread):
        load_row(k[nb, j, kvh], D, Kb[j], kv_code)
        load_row(v[nb, j, kvh], D, Vb[j], kv_code)
    KbT = np.empty(D * bs, np.float32)   # [D, bs] for the GEMM path
    VbT = np.empty(D * bs, np.float32)
    if gemm:
        for j in range(bs):
            for d in range(D):
                KbT[d * bs + j] = Kb[j, d]
                VbT[d * bs + j] = Vb[j, d]
    Qp = np.zeros(_QCHUNK * D, np.float32)
    dOp = np.zeros(_QCHUNK * D, np.float32)
    Qs = Qp.reshape((_QCHUNK, D))
    dOs = dOp.reshape((_QCHUNK, D))
    l2c = np.empty(_QCHUNK, np.float32)
    dlc = np.empty(_QCHUNK, np.float32)
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
    dtanh = np.empty(bs, np.float32)
    for x in range(rd_start[u], rd_start[u + 1]):
        b = rd_b[x]
        L = seq_lens[b]
        n = q_lens[b]
        t0 = rd_lb[x] * bs
        nj = min(bs, L - t0)
        ia, ie = _reader_rows(L, n, t0, nj, causal, window_left)
        for g in range(G):
            h = kvh * G + g
            base = row0[b] + h * sh
            for c0 in range(ia, ie, _QCHUNK):
                nr = min(_QCHUNK, ie - c0)
                for r in range(nr):
                    row = base + (c0 + r) * si
                    for d in range(D):
                        Qs[r, d] = qf[row, d]
                        dOs[r, d] = dof[row, d]
                    l2c[r] = lse2[row]
                    dlc[r] = delta[row]
                if gemm:
                    nr4 = (nr + 3) // 4 * 4
                    for x2 in range(nr * D, nr4 * D):
                        Qp[x2] = 0.0
                        dOp[x2] = 0.0
                    matmul(Qp, D, ONE, KbT, bs, Sf, bs, nr4, bs, D, OVERWRITE)
                    matmul(dOp, D, ONE, VbT, bs, dPf, bs, nr4, bs, D, OVERWRITE)
                else:
                    scores(Qs[:nr], Kb, nj, S)
                    scores(dOs[:nr], Vb, nj, dP)
                _probs_and_ds(S, dP, nr, nj, t0, L, n, c0, causal, window_left, scale, cap, slopes[h],
                              l2c, dlc, ebits, dtanh)
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
                    accumulate_rows(dVa, PT, dOs[:nr], nj, nr)
                    for j in range(nj):
                        for r in range(nr):
                            PT[j, r] = dP[r, j]
                    accumulate_rows(dKa, PT, Qs[:nr], nj, nr)
    for j in range(jlo, nread):
        for d in range(D):
            dk[nb, j, kvh, d] = dKa[j, d] * scale
            dv[nb, j, kvh, d] = dVa[j, d]


@functools.cache
def dkdv_kernel(kv_code: int, gemm: bool):
    """The dK/dV pass for K/V storage code ``kv_code``, on the GEMM path or the loop path.

    One work item per (KV head, physical block in use ``blocks[u]``), visiting its readers
    ``(rd_b[x], rd_lb[x])`` for x in ``rd_start[u]:rd_start[u + 1]``. Per reader and chunk of the
    query rows that see the block: S = Q_c K^T and dP = dO_c V^T [rows, bs], P / dS in place, then
    dV += P^T dO_c and dK += dS^T Q_c [bs, D]. ``gemm`` (bs and D multiples of 16): the four
    products on the 512-bit microkernels (K / V transposed once per block, the chunk's rows copied
    into zero-padded scratch); otherwise dot-product loops.

    Kernel arguments ``(qf, dof, k, v, delta, lse2, seq_lens, q_lens, row0, sh, si, scale, causal,
    window_left, softcap, slopes, blocks, rd_start, rd_b, rd_lb, dk, dv, start, stop)``, running
    work items ``start <= item < stop`` of ``Hkv * n_used`` (item = kvh * n_used + u; ``launch``
    splits the range over threads): ``blocks`` int64 [n_used]; ``rd_start`` int64 [n_used + 1]; ``rd_b``,
    ``rd_lb`` int64 [n_readers]; ``dk``, ``dv`` float32 [N, bs, Hkv, D] (zero on entry; slots
    seen are written); the others as in the module docstring.
    """
    KV_CODE, GEMM = int(kv_code), bool(gemm)

    @njit(nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)
    def bwd_dkdv(qf, dof, k, v, delta, lse2, seq_lens, q_lens, row0, sh, si, scale, causal, window_left,
                 softcap, slopes, blocks, rd_start, rd_b, rd_lb, dk, dv, start, stop):
        no_alias()   # as numba's prange lowering marked its loop body's arrays
        for item in range(start, stop):
            prefer_512()
            dkdv_item(item, qf, dof, k, v, delta, lse2, seq_lens, q_lens, row0, sh, si, scale, causal,
                      window_left, softcap, slopes, blocks, rd_start, rd_b, rd_lb, dk, dv, KV_CODE, GEMM)

    return bwd_dkdv


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def dq_item(b, kvh, q0, nq, qf, dof, k, v, delta, lse2, table, seq_lens, q_lens, row0, sh, si, scale,
            causal, window_left, cap, slopes, dq, kv_code, gemm):
    """The dQ work item (sequence b, KV head kvh, queries q0 .. q0 + nq - 1 of the G heads; see
    ``dq_kernel``), inlined like ``dkdv_item``."""
    ONE, ADD, OVERWRITE = np.intp(1), np.bool_(True), np.bool_(False)  # not literals: see matmul
    D = qf.shape[1]
    bs = k.shape[1]
    G = slopes.shape[0] // k.shape[2]
    L = seq_lens[b]
    n = q_lens[b]
    R = nq * G
    R4 = (R + 3) // 4 * 4
    Qf = np.zeros(R4 * D, np.float32)
    dOf = np.zeros(R4 * D, np.float32)
    Qs = Qf.reshape((R4, D))
    dOs = dOf.reshape((R4, D))
    l2 = np.empty(R, np.float32)
    dl = np.empty(R, np.float32)
    for r in range(R):
        row = row0[b] + (kvh * G + r // nq) * sh + (q0 + r % nq) * si
        for d in range(D):
            Qs[r, d] = qf[row, d]
            dOs[r, d] = dof[row, d]
        l2[r] = lse2[row]
        dl[r] = delta[row]
    kmin = row_window(L, n, q0, causal, window_left)[1]
    kmax = row_window(L, n, q0 + nq - 1, causal, window_left)[2]
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
    dtanh = np.empty(bs, np.float32)
    for lb in range(kmin // bs, (kmax + bs - 1) // bs):
        phys = table[b, lb]
        t0 = lb * bs
        j0 = max(0, kmin - t0)   # keys before the window: never read (rows below j0 stay zero)
        nj = min(bs, kmax - t0)
        for j in range(j0, nj):
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
            _probs_and_ds(S[lo:lo + nq], dP[lo:lo + nq], nq, nj, t0, L, n, q0, causal, window_left, scale,
                          cap, slopes[kvh * G + g], l2[lo:lo + nq], dl[lo:lo + nq], ebits, dtanh)
        if gemm:
            for r in range(R):
                for j in range(nj, bs):   # keys past kmax in this block add nothing
                    dP[r, j] = 0.0
            matmul(dPf, bs, ONE, Kf, D, accf, D, R4, D, bs, ADD)
        else:
            for r in range(R):
                accumulate(acc, r, dP[r], Kb, nj)
    for r in range(R):
        row = row0[b] + (kvh * G + r // nq) * sh + (q0 + r % nq) * si
        for d in range(D):
            dq[row, d] = acc[r, d] * scale


@functools.cache
def dq_kernel(kv_code: int, gemm: bool):
    """The dQ pass for K/V storage code ``kv_code``, on the GEMM path or the loop path.

    One work item per (sequence, KV head, query tile) of ``dq_items`` (rows: GQA head g, query
    q0 + r % nq); per paged block the window lets in: S = Q K^T and dP = dO V^T [rows, bs], P / dS
    in place, dQ += dS K. ``gemm`` (bs and D multiples of 16): the three products on the 512-bit
    microkernels (rows padded to a multiple of 4 with zeros); otherwise dot-product loops.

    Kernel arguments ``(qf, dof, k, v, delta, lse2, table, seq_lens, q_lens, row0, sh, si, it_b,
    it_kvh, it_q0, it_nq, scale, causal, window_left, softcap, slopes, dq, start, stop)``, running
    work items ``start <= item < stop`` (``launch`` splits the range over threads): ``it_*`` int32
    [items]; ``dq`` float32 [rows, D] (every row of a sequence with queries written); the others as in the module
    docstring.
    """
    KV_CODE, GEMM = int(kv_code), bool(gemm)

    @njit(nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)
    def bwd_dq(qf, dof, k, v, delta, lse2, table, seq_lens, q_lens, row0, sh, si, it_b, it_kvh, it_q0,
               it_nq, scale, causal, window_left, softcap, slopes, dq, start, stop):
        no_alias()   # as numba's prange lowering marked its loop body's arrays
        for item in range(start, stop):
            prefer_512()
            dq_item(it_b[item], it_kvh[item], it_q0[item], it_nq[item], qf, dof, k, v, delta, lse2, table,
                    seq_lens, q_lens, row0, sh, si, scale, causal, window_left, softcap, slopes, dq,
                    KV_CODE, GEMM)

    return bwd_dq


def dq_items(q_lens: np.ndarray, Hkv: int, tq: int):
    """The dQ pass's work items ``(b, kvh, q0, nq)`` as int32 arrays: per sequence with queries, per
    KV head, tiles of ``tq`` queries, ordered heavy, light, heavy, ... (under causal the last tiles
    see the most keys) so that the static halves given to the threads stay balanced."""
    n = q_lens.astype(np.int64)
    n_qt = (n + tq - 1) // tq
    per_b = n_qt * Hkv
    b = np.repeat(np.arange(n.size), per_b)
    local = np.arange(int(per_b.sum())) - np.repeat(np.cumsum(per_b) - per_b, per_b)
    nqt_b = n_qt[b]
    pair = local % nqt_b
    q0 = np.where(pair % 2 == 0, pair // 2, nqt_b - 1 - pair // 2) * tq
    nq = np.minimum(n[b], q0 + tq) - q0
    return tuple(np.ascontiguousarray(x, dtype=np.int32) for x in (b, local // nqt_b, q0, nq))


def gemm_ok(bs: int, D: int) -> bool:
    """Whether the backward can run its products on the 512-bit microkernels (whole 16-float
    vectors of keys and dims)."""
    return bs % 16 == 0 and D % 16 == 0
