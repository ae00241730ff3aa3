"""Fused paged-attention forward on the CPU: parallel ``@njit`` loops over the block table.

Symbols: B batch, H query heads, Hkv KV heads, G = H // Hkv, Sq queries per sequence, D head_dim,
N physical blocks, bs block_size, M max blocks per sequence.

Arguments (storage dtypes, C-contiguous, validated by ``ops/config.py``):

- ``q``        [B, H, Sq, D]  float32, or uint16 / uint8 bits decoded in the kernel (``load_row``)
- ``k``, ``v`` [N, bs, Hkv, D] float32, or uint16 / uint8 bits decoded in the kernel
- ``table``    int32 [B, M]; token t of sequence b is slot ``t % bs`` of block ``table[b, t // bs]``;
  only entries with ``t < seq_lens[b]`` are read
- ``seq_lens`` int32 [B]
- ``out``      float32 [B, H, Sq, D] (written), ``lse`` float32 [B, H, Sq] (written, natural log)

One parallel work item is (sequence b, KV head, tile of queries): it serves the whole GQA group
(G query heads x the tile's queries, about ``tq`` rows), so each K/V token is read from memory
once per tile. Keys are visited with an online softmax in base 2 (q is pre-scaled by
``scale * log2(e)``); only valid tokens are decoded, so whatever sits in unused slots (NaN
included) never reaches a result. Causal is bottom-right aligned: query i sees keys j <= L - Sq + i.

Two inner paths, chosen per work item by its row count R:

- R >= ROWS_GEMM (prefill, chunked prefill, wide GQA): key tiles of KT tokens spanning paged blocks
  are decoded into contiguous scratch and multiplied as small GEMMs by 512-bit register-blocked
  microkernels (LLVM IR through ``@intrinsic``): ``St[KT, Rp] = K[KT, D] @ Qt[D, Rp]`` puts rows on
  the vector lanes, so the online softmax (max, exp2, row sums) is vectorized over rows without
  horizontal reductions, then ``acc[Rp, Dp] += P[Rp, KT] @ V[KT, Dp]``.
- otherwise (decode): per paged block, row-by-key dot products vectorized over D.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...dtypes import BF16, E4M3, E5M2, F16, F32

# fastmath without nnan/ninf: -inf must stay -inf (SPEC: lse = -inf for empty rows).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# 2 ** f on [0, 1): degree-5 fit, relative error < 8e-8 (under float32's half-ulp).
_C0, _C1, _C2, _C3, _C4, _C5 = (np.float32(c) for c in (
    0.99999993, 0.69315297, 0.24015453, 0.0558236, 0.00899258, 0.00187623))


@njit(inline="always", fastmath=FASTMATH, cache=True)
def load_row(src, n, dst, code):
    """float32 values of the first ``n`` storage elements of 1-D ``src`` into ``dst``: F32 copies,
    BF16 shifts the bits into place, F16 and FP8 convert through IEEE half (vcvtph2ps)."""
    if code == F32:
        for i in range(n):
            dst[i] = src[i]
    elif code == BF16:
        bits = dst.view(np.uint32)
        for i in range(n):
            bits[i] = np.uint32(src[i]) << np.uint32(16)
    elif code == F16:
        for i in range(n):
            dst[i] = half_to_f32(np.uint16(src[i]))
    elif code == E4M3:  # constant format argument: the branch inside fp8_value folds away
        for i in range(n):
            dst[i] = fp8_value(np.uint32(src[i]), E4M3)
    else:
        for i in range(n):
            dst[i] = fp8_value(np.uint32(src[i]), E5M2)


@intrinsic
def half_to_f32(typingctx, h):
    """float32 of the IEEE half whose bits are the uint16 ``h`` (vectorizes to vcvtph2ps)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@njit(inline="always", fastmath=FASTMATH, cache=True)
def fp8_value(c, code):
    """float32 of the FP8 code ``c`` (uint32) through IEEE half, branch-free so loops vectorize.
    E5M2 is the top byte of a half. E4M3's bits moved into half position give a half 2**8 too
    small (exact for subnormals too, which become normal halves); S.1111.111 (E4M3's only NaN)
    gets the half exponent 11111 added, so it stays a NaN with its sign."""
    if code == E4M3:
        em = c & np.uint32(0x7F)
        nan = (em + np.uint32(1)) >> np.uint32(7)   # 1 only for em == 0x7F
        h = ((c & np.uint32(0x80)) << np.uint32(8)) | (em << np.uint32(7)) | (nan * np.uint32(0x7C00))
        return half_to_f32(np.uint16(h)) * np.float32(256.0)
    return half_to_f32(np.uint16(c << np.uint32(8)))


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




# ----------------------------------------------------------------------------- 512-bit microkernels
# LLVM's x86 tuning for AVX-512 server cores prefers 256-bit vectors unless a function asks for
# more; the microkernels (and the loops around them) ask, so FMAs run on zmm registers.
_WIDE = ('"prefer-vector-width"="512"', '"min-legal-vector-width"="512"')


def _widen(builder):
    for attr in _WIDE:  # string attributes: llvmlite's checked ``add`` only knows keyword ones
        set.add(builder.function.attributes, attr)


@intrinsic
def prefer_512(typingctx):
    """Marks the calling LLVM function for 512-bit vectorization (no-op elsewhere)."""
    def codegen(context, builder, sig, args):
        _widen(builder)
        return context.get_dummy_value()
    return types.void(), codegen


def _make_microkernel(MR, NV):
    """C[i, n] (+)= sum_k A[i, k] * B[k, n] for i < MR, n < 16 * NV on flat float32 arrays:
    A[i, k] = a[a_off + i * a_rs + k * a_ks], B[k, n] = b[b_off + k * ldb + n],
    C[i, n] = c[c_off + i * ldc + n]; MR x NV accumulators of 16 lanes stay in registers."""
    @intrinsic
    def microkernel(typingctx, a, a_off, a_rs, a_ks, b, b_off, ldb, c, c_off, ldc, K, accumulate):
        sig = types.void(a, types.intp, types.intp, types.intp, b, types.intp, types.intp,
                         c, types.intp, types.intp, types.intp, types.boolean)

        def codegen(context, builder, sig, args):
            _widen(builder)
            a_, a_off, a_rs, a_ks, b_, b_off, ldb, c_, c_off, ldc, K, accumulate = args
            ap = context.make_array(sig.args[0])(context, builder, a_).data
            bp = context.make_array(sig.args[4])(context, builder, b_).data
            cp = context.make_array(sig.args[7])(context, builder, c_).data
            vty = ir.VectorType(ir.FloatType(), 16)
            vptr = vty.as_pointer()
            i64 = ir.IntType(64)
            zero = ir.Constant(vty, [0.0] * 16)
            bcast = ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), "llvm.fma.v16f32")
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(NV)] for _ in range(MR)]
            with cgutils.for_range(builder, K) as loop:
                k = loop.index
                bo = builder.add(b_off, builder.mul(k, ldb))
                bv = [builder.load(builder.bitcast(builder.gep(bp, [builder.add(bo, ir.Constant(i64, 16 * v))]),
                                                   vptr), align=4) for v in range(NV)]
                ao = builder.add(a_off, builder.mul(k, a_ks))
                for i in range(MR):
                    x = builder.load(builder.gep(ap, [ao]))
                    xv = builder.shuffle_vector(builder.insert_element(ir.Constant(vty, None), x,
                                                                       ir.Constant(ir.IntType(32), 0)),
                                                ir.Constant(vty, None), bcast)
                    for v in range(NV):
                        builder.store(builder.call(fma, [xv, bv[v], builder.load(acc[i][v])]), acc[i][v])
                    if i + 1 < MR:
                        ao = builder.add(ao, a_rs)
            co = c_off
            ptrs = []
            for i in range(MR):
                ptrs.append([builder.bitcast(builder.gep(cp, [builder.add(co, ir.Constant(i64, 16 * v))]), vptr)
                             for v in range(NV)])
                co = builder.add(co, ldc)
            with builder.if_else(accumulate) as (add, store):
                with add:
                    for i in range(MR):
                        for v in range(NV):
                            builder.store(builder.fadd(builder.load(ptrs[i][v], align=4),
                                                       builder.load(acc[i][v])), ptrs[i][v], align=4)
                with store:
                    for i in range(MR):
                        for v in range(NV):
                            builder.store(builder.load(acc[i][v]), ptrs[i][v], align=4)
            return context.get_dummy_value()
        return sig, codegen
    return microkernel


@intrinsic
def as_float32(typingctx, x):
    """The float32 whose bits are the int32 ``x``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


_MR = 4
_mk1, _mk2, _mk3, _mk4 = (_make_microkernel(_MR, nv) for nv in (1, 2, 3, 4))


@njit(inline="always", fastmath=FASTMATH, cache=True)
def matmul(a, a_off, a_rs, a_ks, b, b_off, ldb, c, c_off, ldc, M, N, K, accumulate):
    """C (+)= A @ B with the layouts of ``_make_microkernel``: M a multiple of 4, N of 16."""
    for i in range(0, M, _MR):
        ao = a_off + i * a_rs
        co = c_off + i * ldc
        n = 0
        while n + 64 <= N:
            _mk4(a, ao, a_rs, a_ks, b, b_off + n, ldb, c, co + n, ldc, K, accumulate)
            n += 64
        rest = N - n
        if rest == 48:
            _mk3(a, ao, a_rs, a_ks, b, b_off + n, ldb, c, co + n, ldc, K, accumulate)
        elif rest == 32:
            _mk2(a, ao, a_rs, a_ks, b, b_off + n, ldb, c, co + n, ldc, K, accumulate)
        elif rest == 16:
            _mk1(a, ao, a_rs, a_ks, b, b_off + n, ldb, c, co + n, ldc, K, accumulate)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def load_tok(src, p, s, h, n, dst, dbits, off, code):
    """``dst[off:off + n]`` = float32 values of ``src[p, s, h, :n]`` (``dbits`` is ``dst`` viewed
    as uint32), indexing the 4-D pool directly: no array views per token."""
    if code == F32:
        for i in range(n):
            dst[off + i] = src[p, s, h, i]
    elif code == BF16:
        for i in range(n):
            dbits[off + i] = np.uint32(src[p, s, h, i]) << np.uint32(16)
    elif code == F16:
        for i in range(n):
            dst[off + i] = half_to_f32(np.uint16(src[p, s, h, i]))
    elif code == E4M3:
        for i in range(n):
            dst[off + i] = fp8_value(np.uint32(src[p, s, h, i]), E4M3)
    else:
        for i in range(n):
            dst[off + i] = fp8_value(np.uint32(src[p, s, h, i]), E5M2)


KT = 64  # keys per tile of the GEMM path


@njit(inline="always", fastmath=FASTMATH, cache=True)
def tile_item(q, k, v, table, b, kvh, q0, nq, L, Sq, causal, qscale, out_scale, q_code,
              kv_code, out, lse):
    """One work item with R = G * nq >= 16 rows, as GEMMs on key tiles of KT tokens:
    St[KT, Rp] = K_tile[KT, D] @ Qt[D, Rp] (rows along the vector lanes), an online softmax
    vectorized over rows, then Acc[Rp, Dp] += P[Rp, KT] @ V_tile[KT, Dp]."""
    H, D = q.shape[1], q.shape[3]
    bs = k.shape[1]
    G = H // k.shape[2]
    R = nq * G
    Rp = (R + 15) // 16 * 16
    Dp = (D + 15) // 16 * 16
    Qt = np.zeros(D * Rp, np.float32)
    row = np.empty(D, np.float32)
    lim = np.zeros(Rp, np.int32)  # keys visible to the row (0 for padding rows)
    kmax = 0
    minlim = L
    for r in range(R):
        i = q0 + r % nq
        load_row(q[b, kvh * G + r // nq, i], D, row, q_code)
        for d in range(D):
            Qt[d * Rp + r] = row[d] * qscale
        lim[r] = min(L, max(0, L - Sq + i + 1)) if causal else L
        kmax = max(kmax, lim[r])
        minlim = min(minlim, lim[r])
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
    for t0 in range(0, kmax, KT):
        nk = min(KT, kmax - t0)  # keys of the tile that some row sees
        for j in range(nk):
            t = t0 + j
            phys = table[b, t // bs]
            load_tok(k, phys, t % bs, kvh, D, Kf, Kbits, j * D, kv_code)
            load_tok(v, phys, t % bs, kvh, D, Vf, Vbits, j * Dp, kv_code)
        nk4 = (nk + 3) // 4 * 4
        for x in range(nk * D, nk4 * D):
            Kf[x] = 0.0
        matmul(Kf, 0, D, 1, Qt, 0, Rp, St, 0, Rp, nk4, Rp, D, False)
        for r in range(Rp):
            mt[r] = m[r]
            chk[r] = 0.0
            ps[r] = 0.0
        for j in range(nk):
            for r in range(Rp):
                s = St[j * Rp + r]
                chk[r] += s - s  # NaN where a score is inf / NaN
        if t0 + nk > minlim:  # causal diagonal / short rows: mask keys the row does not see
            for r in range(Rp):
                for j in range(max(0, lim[r] - t0), nk):
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
                xs = min(max(St[x] - msub[r], np.float32(-127.0)), np.float32(0.0))
                xf = np.float32(math.floor(xs))
                f = xs - xf
                p = (_C0 + f * (_C1 + f * (_C2 + f * (_C3 + f * (_C4 + f * _C5))))) * \
                    as_float32((np.int32(xf) + np.int32(127)) << np.int32(23))
                St[x] = p
                ps[r] += p
        for r in range(R):
            lsum[r] = lsum[r] * alpha[r] + ps[r]
            if alpha[r] != 1.0:
                for d in range(Dp):
                    acc[r * Dp + d] *= alpha[r]
        matmul(St, 0, 1, Rp, Vf, 0, Dp, acc, 0, Dp, Rp, Dp, nk, True)
    for r in range(R):
        finish_row(out, lse, b, kvh * G + r // nq, q0 + r % nq, acc[r * Dp:r * Dp + D], m[r], lsum[r],
                   out_scale)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def finish_row(out, lse, b, h, i, acc_row, m, lsum, out_scale):
    """out[b, h, i] and lse[b, h, i] from a row's accumulator, running max (base 2) and sum: 0 / -inf
    for a row that saw no key; NaN / +inf (flagged for the client) for non-finite scores."""
    D = out.shape[3]
    if m == -np.inf:
        for d in range(D):
            out[b, h, i, d] = 0.0
        lse[b, h, i] = -np.inf
    elif m == np.inf or not abs(lsum) < np.inf:
        for d in range(D):
            out[b, h, i, d] = np.nan
        lse[b, h, i] = np.inf
    else:
        inv = np.float32(out_scale) / lsum
        for d in range(D):
            out[b, h, i, d] = acc_row[d] * inv
        lse[b, h, i] = np.float32((m + math.log2(lsum)) * LN2)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def row_item(q, k, v, table, b, kvh, q0, nq, L, Sq, causal, qscale, out_scale, q_code,
             kv_code, out, lse):
    """One work item with few rows (decode): per paged block, row-by-key dot products."""
    H, D = q.shape[1], q.shape[3]
    bs = k.shape[1]
    G = H // k.shape[2]
    R = nq * G  # rows: (GQA head g, query q0 + r % nq) for r = g * nq + ...
    Qs = np.empty((R, D), np.float32)
    acc = np.zeros((R, D), np.float32)
    m = np.full(R, -np.inf, np.float32)
    lsum = np.zeros(R, np.float32)
    lim = np.empty(R, np.int64)  # keys visible to the row
    kmax = 0
    for r in range(R):
        i = q0 + r % nq
        load_row(q[b, kvh * G + r // nq, i], D, Qs[r], q_code)
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
            load_row(k[phys, j, kvh], D, Kb[j], kv_code)
            load_row(v[phys, j, kvh], D, Vb[j], kv_code)
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
        finish_row(out, lse, b, kvh * G + r // nq, q0 + r % nq, acc[r], m[r], lsum[r], out_scale)


ROWS_GEMM = 16  # work items with at least this many rows take the GEMM path


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def paged_attention_fwd(q, k, v, table, seq_lens, qk_scale, out_scale, causal, tq,
                        q_code, kv_code, out, lse):
    """The fused forward. ``qk_scale`` multiplies q . k (softmax scale times any dequantization
    scales of q and k); ``out_scale`` multiplies the normalized output (v's dequantization scale over
    the output scale). ``q_code`` / ``kv_code`` are DType codes of the storage. A row with non-finite scores (inf / NaN in q or k, or scale * q . k
    overflowing float32) gets ``lse = +inf``; the client raises."""
    B, H, Sq, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    tqq = max(1, tq // G)  # queries per tile: about tq rows (GQA heads x queries) per work item
    n_qt = (Sq + tqq - 1) // tqq
    qscale = np.float32(qk_scale * LOG2E)
    for item in prange(B * Hkv * n_qt):
        prefer_512()
        # Interleave heavy and light query tiles so static chunks stay balanced under causal.
        pair = item % n_qt
        qt = pair // 2 if pair % 2 == 0 else n_qt - 1 - pair // 2
        b = item // n_qt // Hkv
        kvh = item // n_qt % Hkv
        q0 = qt * tqq
        nq = min(Sq, q0 + tqq) - q0
        if nq * G >= ROWS_GEMM:
            tile_item(q, k, v, table, b, kvh, q0, nq, seq_lens[b], Sq, causal, qscale, out_scale,
                      q_code, kv_code, out, lse)
        else:
            row_item(q, k, v, table, b, kvh, q0, nq, seq_lens[b], Sq, causal, qscale, out_scale,
                     q_code, kv_code, out, lse)
