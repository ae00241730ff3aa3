"""Paged-attention backward on the GPU: dq, dk_blocks, dv_blocks (FlashAttention-2's recomputation
scheme over a block table), float32 accumulation, ``cuda.atomic.add`` into the pool gradients.

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq queries per sequence, D head_dim,
N physical blocks, bs block_size, M max blocks per sequence.

Arguments (C-contiguous device arrays, validated by ``ops/config.py``):

- ``q``, ``dout``, ``out`` [rows, D] storage of q's dtype (float32 or uint16 bits): q [B, H, Sq, D]
  or a ragged token-major [T, H, D] viewed as rows; query i of sequence b, head h, is row
  ``work[0, b] + h * stride_h + i * stride_i`` (``work`` int32 [4, B] as in ``paged_decode``: row
  1 holds each sequence's query count q_len_b)
- ``k``, ``v`` [N * bs, Hkv, D] the pools with blocks and slots flattened (storage of the same dtype)
- ``table`` int32 [B, M], ``seq_lens`` int32 [B], ``bs``: token t of sequence b is pool row
  ``table[b, t // bs] * bs + t % bs``; query i sits at p = L - q_len + i; causal: it sees keys
  t <= p (bottom-right); ``window`` >= 0: also t >= p - window; SOFTCAP / ALIBI (factory flags) with
  ``softcap`` and ``slopes`` float32 [H] modify the scores as in the forward, and dS goes through
  the tanh: dS_raw = dS (1 - tanh^2)
- ``lse`` float32 [rows] from the forward; ``delta``, ``lse2`` float32 [rows] scratch
- ``dk``, ``dv`` float32 [N * bs, Hkv, D], zeroed; ``dq`` [rows, D] storage of q's dtype

Three kernels:

- ``delta_kernel``: per query row, ``delta = rowsum(dout * out)`` and ``lse2 = lse * log2 e`` (a
  group of lanes per row, ``plan.delta_lanes``).
- ``dkdv_kernel``: grid (B * Hkv, key tiles of BK tokens from the first key the window lets the
  sequence's queries see). A block keeps its K and V tile (read once
  through the block table) in shared memory, walks the G query heads and the query tiles that can
  see it (causal: from the first row that sees the tile's first key), recomputes
  P = 2^(c q.k - lse2) and dS = P (dout . v - delta), and accumulates dV += P^T dout and
  dK += dS^T q in registers. At the end it adds its tile into dk / dv with ``cuda.atomic.add``: a
  block of the pool shared by several sequences (forks, common prefixes) receives the sum of their
  gradients, whatever order the thread blocks run in.
- ``dq_kernel``: grid (B * H, query tiles of BQ rows), the forward's partition: dQ += dS K over the
  visible key tiles, written once in q's dtype (no atomics).

Rows with lse = -inf (no visible key) contribute nothing; keys t >= L are never read. Threads form
TY rows x 8 columns; shared tiles are padded to D + 1 floats per row (no bank conflicts down a
column).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32

from ...dtypes import F32
from .codecs import decode_bits, encode_bits
from .paged_decode import LOG2E, _modify


@cuda.jit(device=True, inline=True)
def _to_f32(x, code):
    """float32 value of one stored element of dtype ``code`` (F32 values or 16-bit bits)."""
    if code == F32:
        return float32(x)
    return decode_bits(x, code)


@cuda.jit(device=True, inline=True)
def _load_tile(src, dst, base, si, r0, nrows, n_valid, D, tid, NT, code):
    """dst[r, d] = float32 of src[base + (r0 + r) * si, d] for r < n_valid, 0 beyond (r < nrows)."""
    for idx in range(tid, nrows * D, NT):
        r = idx // D
        d = idx % D
        x = float32(0.0)
        if r < n_valid:
            x = _to_f32(src[base + (r0 + r) * si, d], code)
        dst[r, d] = x


@cuda.jit(device=True, inline=True)
def _load_kv(k, v, Ks, Vs, table, b, kvh, bs, k0, nrows, kmax, D, tid, NT, code):
    """Ks / Vs rows j = K / V of token k0 + j (float32), zeros for tokens >= kmax."""
    for idx in range(tid, nrows * D, NT):
        j = idx // D
        d = idx % D
        t = k0 + j
        xk = float32(0.0)
        xv = float32(0.0)
        if t < kmax:
            row = table[b, t // bs] * bs + t % bs
            xk = _to_f32(k[row, kvh, d], code)
            xv = _to_f32(v[row, kvh, d], code)
        Ks[j, d] = xk
        Vs[j, d] = xv


@cuda.jit(device=True, inline=True)
def _load_rows(q, dout, lse2, delta, Qs, dOs, l2s, dls, base, si, q0, BQ, nq, D, tid, NT, code):
    """The query tile's q and dout rows (float32) and its lse2 / delta (-inf / 0 past nq rows);
    row r of the tile is row ``base + (q0 + r) * si`` of q / dout / lse2 / delta."""
    _load_tile(q, Qs, base, si, q0, BQ, nq, D, tid, NT, code)
    _load_tile(dout, dOs, base, si, q0, BQ, nq, D, tid, NT, code)
    for r in range(tid, BQ, NT):
        l2 = float32(-np.inf)
        dl = float32(0.0)
        if r < nq:
            l2 = lse2[base + (q0 + r) * si]
            dl = delta[base + (q0 + r) * si]
        l2s[r] = l2
        dls[r] = dl


@cuda.jit(device=True, inline=True)
def _probs_and_ds(Qs, dOs, Ks, Vs, l2s, dls, s, dp, ty, tx, RT, KT, D, c, q0, k0, kend, first, causal,
                  window, scale, cap, inv_cap, slope, SOFTCAP, ALIBI):
    """This thread's RT x KT entries (rows ty * RT + rr, keys tx + 8 * kk) of the tile: P =
    2^(c q.k - lse2) into ``s`` and dS = P (dout . v - delta) into ``dp``; 0 for keys >= kend,
    causally hidden keys, keys before the window and rows without keys. With SOFTCAP / ALIBI the
    score is modified as in the forward (then c is unused) and dS is taken back through the tanh."""
    for x in range(RT * KT):
        s[x] = 0.0
        dp[x] = 0.0
    for d in range(D):
        for rr in range(RT):
            qv = Qs[ty * RT + rr, d]
            ov = dOs[ty * RT + rr, d]
            for kk in range(KT):
                s[rr * KT + kk] += qv * Ks[tx + 8 * kk, d]
                dp[rr * KT + kk] += ov * Vs[tx + 8 * kk, d]
    for rr in range(RT):
        r = ty * RT + rr
        l2 = l2s[r]
        pq = first + q0 + r                 # the row's query position
        for kk in range(KT):
            t = k0 + tx + 8 * kk
            p = float32(0.0)
            g = float32(1.0)
            if (l2 > float32(-np.inf) and t < kend and (not causal or t <= pq)
                    and (window < 0 or t >= pq - window)):
                if SOFTCAP or ALIBI:
                    x = scale * s[rr * KT + kk]
                    if SOFTCAP:
                        th = math.tanh(x * inv_cap)
                        g = float32(1.0) - th * th
                    p = math.exp2(_modify(x, cap, inv_cap, slope, pq - t, SOFTCAP, ALIBI) - l2)
                else:
                    p = math.exp2(c * s[rr * KT + kk] - l2)
            s[rr * KT + kk] = p
            dp[rr * KT + kk] = p * (dp[rr * KT + kk] - dls[r]) * g


@functools.cache
def delta_kernel(D: int, code: int, TX: int = 1):
    """TX consecutive threads per query row (TX a power of two up to 32: lane l of a row's group
    reads dims l, l + TX, ..., so a warp's loads are coalesced; the group's partial sums meet by warp
    shuffles), grid ceil(rows * TX / threads); dout, out [rows, D], lse, delta, lse2 [rows]. TX = 1
    (the simulator, which has no shuffles): one thread per row."""
    LOG_TX = TX.bit_length() - 1

    @cuda.jit(cache=True)
    def kernel(dout, out, lse, delta, lse2):
        t = cuda.grid(1)
        x = t // TX
        lane = t % TX
        ok = x < dout.shape[0]
        acc = float32(0.0)
        if ok:
            for d in range(lane, D, TX):
                acc += _to_f32(dout[x, d], code) * _to_f32(out[x, d], code)
        for sh in range(LOG_TX):        # every lane of a warp takes part (rows past the end add 0)
            acc += cuda.shfl_xor_sync(0xFFFFFFFF, acc, TX >> (sh + 1))
        if ok and lane == 0:
            delta[x] = acc
            lse2[x] = lse[x] * float32(LOG2E)

    return kernel


@functools.cache
def dkdv_kernel(D: int, code: int, BQ: int, BK: int, TY: int, SOFTCAP: bool = False, ALIBI: bool = False):
    """Grid (B * Hkv, ceil(longest key span / BK)), 8 * TY threads; see the module docstring."""
    NT = 8 * TY
    RT = BQ // TY           # score rows per thread
    KT = BK // 8            # score keys per thread
    KR = BK // TY           # gradient keys per thread
    DT = -(-D // 8)         # gradient dims per thread
    S_N = RT * KT
    G_N = KR * DT
    D1 = D + 1
    BK1 = BK + 1

    @cuda.jit(cache=True)
    def kernel(q, dout, k, v, table, seq_lens, work, bs, n_heads, stride_h, stride_i, scale, causal, window,
               softcap, slopes, delta, lse2, dk, dv):
        tid = cuda.threadIdx.x
        ty = tid // 8
        tx = tid % 8
        H = n_heads
        Hkv = k.shape[1]
        G = H // Hkv
        b = cuda.blockIdx.x // Hkv
        kvh = cuda.blockIdx.x % Hkv
        Sq = work[1, b]
        L = seq_lens[b]
        first = L - Sq            # query i sees keys t <= first + i (and t >= first + i - window)
        kstart = 0
        if window >= 0:
            kstart = max(0, first - window)
        k0 = kstart + cuda.blockIdx.y * BK
        if k0 >= L or Sq == 0:
            return

        Ks = cuda.shared.array((BK, D1), float32)
        Vs = cuda.shared.array((BK, D1), float32)
        Qs = cuda.shared.array((BQ, D1), float32)
        dOs = cuda.shared.array((BQ, D1), float32)
        Ps = cuda.shared.array((BQ, BK1), float32)
        dSs = cuda.shared.array((BQ, BK1), float32)
        l2s = cuda.shared.array(BQ, float32)
        dls = cuda.shared.array(BQ, float32)

        _load_kv(k, v, Ks, Vs, table, b, kvh, bs, k0, BK, L, D, tid, NT, code)
        c = float32(scale * LOG2E)
        sc32 = float32(scale)
        cap = float32(softcap)
        inv_cap = float32(1.0) / cap if SOFTCAP else float32(0.0)
        s = cuda.local.array(S_N, float32)
        dp = cuda.local.array(S_N, float32)
        dka = cuda.local.array(G_N, float32)
        dva = cuda.local.array(G_N, float32)
        for x in range(G_N):
            dka[x] = 0.0
            dva[x] = 0.0
        i_lo = 0
        if causal:
            i_lo = max(0, k0 - first) // BQ * BQ
        i_hi = Sq                 # rows past the tile's last key + window do not see it
        if window >= 0:
            i_hi = max(0, min(Sq, k0 + BK + window - first))
        for g in range(G):
            h = kvh * G + g
            base = work[0, b] + h * stride_h
            slope = float32(0.0)
            if ALIBI:
                slope = slopes[h]
            for q0 in range(i_lo, i_hi, BQ):
                nq = min(BQ, Sq - q0)
                cuda.syncthreads()  # K / V ready; the previous tile's Qs, dOs, Ps, dSs consumed
                _load_rows(q, dout, lse2, delta, Qs, dOs, l2s, dls, base, stride_i, q0, BQ, nq, D, tid, NT,
                           code)
                cuda.syncthreads()
                _probs_and_ds(Qs, dOs, Ks, Vs, l2s, dls, s, dp, ty, tx, RT, KT, D, c, q0, k0, L, first,
                              causal, window, sc32, cap, inv_cap, slope, SOFTCAP, ALIBI)
                for rr in range(RT):
                    for kk in range(KT):
                        Ps[ty * RT + rr, tx + 8 * kk] = s[rr * KT + kk]
                        dSs[ty * RT + rr, tx + 8 * kk] = dp[rr * KT + kk]
                cuda.syncthreads()
                for r in range(BQ):
                    for kr in range(KR):
                        j = ty * KR + kr
                        p = Ps[r, j]
                        ds = dSs[r, j]
                        for dd in range(DT):
                            d = tx + 8 * dd
                            if d < D:
                                dva[kr * DT + dd] += p * dOs[r, d]
                                dka[kr * DT + dd] += ds * Qs[r, d]
        sc = float32(scale)
        for kr in range(KR):
            t = k0 + ty * KR + kr
            if t < L:
                row = table[b, t // bs] * bs + t % bs
                for dd in range(DT):
                    d = tx + 8 * dd
                    if d < D:
                        cuda.atomic.add(dk, (row, kvh, d), dka[kr * DT + dd] * sc)
                        cuda.atomic.add(dv, (row, kvh, d), dva[kr * DT + dd])

    return kernel


@functools.cache
def dq_kernel(D: int, code: int, BQ: int, BK: int, TY: int, SOFTCAP: bool = False, ALIBI: bool = False):
    """Grid (B * H, ceil(max q_len / BQ)), 8 * TY threads; see the module docstring."""
    NT = 8 * TY
    RT = BQ // TY           # rows per thread
    KT = BK // 8            # score keys per thread
    DT = -(-D // 8)         # dq dims per thread
    S_N = RT * KT
    Q_N = RT * DT
    D1 = D + 1
    BK1 = BK + 1
    OUT_F32 = code == F32

    @cuda.jit(cache=True)
    def kernel(q, dout, k, v, table, seq_lens, work, bs, n_heads, stride_h, stride_i, scale, causal, window,
               softcap, slopes, delta, lse2, dq):
        tid = cuda.threadIdx.x
        ty = tid // 8
        tx = tid % 8
        H = n_heads
        Hkv = k.shape[1]
        G = H // Hkv
        b = cuda.blockIdx.x // H
        h = cuda.blockIdx.x % H
        kvh = h // G
        q0 = cuda.blockIdx.y * BQ
        Sq = work[1, b]
        if q0 >= Sq:              # a query tile this sequence does not have (whole block)
            return
        nq = min(BQ, Sq - q0)
        L = seq_lens[b]
        base = work[0, b] + h * stride_h
        cap = float32(softcap)
        inv_cap = float32(1.0) / cap if SOFTCAP else float32(0.0)
        slope = float32(0.0)
        if ALIBI:
            slope = slopes[h]

        Ks = cuda.shared.array((BK, D1), float32)
        Vs = cuda.shared.array((BK, D1), float32)
        Qs = cuda.shared.array((BQ, D1), float32)
        dOs = cuda.shared.array((BQ, D1), float32)
        dSs = cuda.shared.array((BQ, BK1), float32)
        l2s = cuda.shared.array(BQ, float32)
        dls = cuda.shared.array(BQ, float32)

        _load_rows(q, dout, lse2, delta, Qs, dOs, l2s, dls, base, stride_i, q0, BQ, nq, D, tid, NT, code)
        c = float32(scale * LOG2E)
        sc32 = float32(scale)
        s = cuda.local.array(S_N, float32)
        dp = cuda.local.array(S_N, float32)
        dqa = cuda.local.array(Q_N, float32)
        for x in range(Q_N):
            dqa[x] = 0.0
        first = L - Sq
        kmax = L
        if causal:
            kmax = min(L, max(0, first + q0 + nq))   # keys the tile's last row sees
        kmin = 0
        if window >= 0:
            kmin = min(kmax, max(0, first + q0 - window))   # the first key the tile's first row sees
        for k0 in range(kmin, kmax, BK):
            cuda.syncthreads()  # q / dout ready; the previous K, V, dS consumed
            _load_kv(k, v, Ks, Vs, table, b, kvh, bs, k0, BK, kmax, D, tid, NT, code)
            cuda.syncthreads()
            _probs_and_ds(Qs, dOs, Ks, Vs, l2s, dls, s, dp, ty, tx, RT, KT, D, c, q0, k0, kmax, first,
                          causal, window, sc32, cap, inv_cap, slope, SOFTCAP, ALIBI)
            for rr in range(RT):
                for kk in range(KT):
                    dSs[ty * RT + rr, tx + 8 * kk] = dp[rr * KT + kk]
            cuda.syncthreads()
            for j in range(BK):
                for rr in range(RT):
                    ds = dSs[ty * RT + rr, j]
                    for dd in range(DT):
                        d = tx + 8 * dd
                        if d < D:
                            dqa[rr * DT + dd] += ds * Ks[j, d]
        sc = float32(scale)
        for rr in range(RT):
            r = ty * RT + rr
            if r < nq:
                for dd in range(DT):
                    d = tx + 8 * dd
                    if d < D:
                        y = dqa[rr * DT + dd] * sc
                        if OUT_F32:
                            dq[base + (q0 + r) * stride_i, d] = y
                        else:
                            dq[base + (q0 + r) * stride_i, d] = encode_bits(y, code)

    return kernel


@functools.cache
def fill_kernel():
    """a[x] = 0 for a 1-D float32 array, grid-stride."""

    @cuda.jit(cache=True)
    def kernel(a):
        start, step = cuda.grid(1), cuda.gridsize(1)
        for x in range(start, a.shape[0], step):
            a[x] = 0.0

    return kernel


@functools.cache
def encode_kernel(code: int):
    """out[x] = storage bits of float32 src[x] in dtype ``code`` (F16 / BF16), grid-stride."""

    @cuda.jit(cache=True)
    def kernel(src, out):
        start, step = cuda.grid(1), cuda.gridsize(1)
        for x in range(start, src.shape[0], step):
            out[x] = encode_bits(src[x], code)

    return kernel
