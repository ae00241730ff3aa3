"""Matrix primitives of the CPU kernels: 512-bit register-blocked GEMM microkernels and the
dot-product loops of the decode path.

All operands are float32. ``matmul`` takes flat 1-D arrays with explicit offsets and strides (so
one buffer can be read transposed); the loop helpers take 2-D arrays.

LLVM's x86 tuning for AVX-512 server cores prefers 256-bit vectors unless a function asks for
more; the microkernels (and kernels that call ``prefer_512`` in their loops) ask, so FMAs run on
zmm registers. On other CPUs the attributes are hints and the code stays correct.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import FASTMATH

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


@intrinsic
def no_alias(typingctx):
    """Marks every pointer argument of the calling LLVM function (array data, meminfo and parent
    pointers) ``noalias`` and ``captures(none)``, as numba's parfor lowering does for the body of
    a ``prange`` loop: LLVM then vectorizes the loops without runtime overlap checks and keeps
    values in registers across stores. Only for functions whose array arguments are never written
    through two of them at once (inputs that alias each other are read-only)."""
    def codegen(context, builder, sig, args):
        fn = builder.function
        for a in fn.args[2:]:  # after numba's return-value and exception-info pointers
            if isinstance(a.type, ir.PointerType):
                a.add_attribute("captures(none)")
                a.add_attribute("noalias")
        return context.get_dummy_value()
    return types.void(), codegen


def _make_microkernel(MR, NV):
    """An intrinsic ``microkernel(a, a_off, a_rs, a_ks, b, b_off, ldb, c, c_off, ldc, K, accumulate)``:
    C[i, n] (+)= sum_k A[i, k] * B[k, n] for i < MR, n < 16 * NV on flat float32 arrays, with
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


_MR = 4
_mk1, _mk2, _mk3, _mk4 = (_make_microkernel(_MR, nv) for nv in (1, 2, 3, 4))


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def matmul(a, a_rs, a_ks, b, ldb, c, ldc, M, N, K, accumulate):
    """C (+)= A @ B on flat float32 arrays.

    Parameters
    ----------
    a : float32 [*]; A[i, k] = a[i * a_rs + k * a_ks] for i < M, k < K (any strides, so a buffer
        can be read transposed)
    b : float32 [*]; B[k, n] = b[k * ldb + n] for n < N (rows contiguous)
    c : float32 [*] (written); C[i, n] = c[i * ldc + n]
    M : int, a multiple of 4;  N : int, a multiple of 16;  K : int >= 0
    accumulate : bool -- add into C (True) or overwrite it (False)

    Pass the ints and the flag as variables (``np.intp(1)``, ``np.bool_(True)``), not literals:
    numba compiles a callee once per combination of literal arguments.
    """
    for i in range(0, M, _MR):
        ao = i * a_rs
        co = i * ldc
        n = 0
        while n + 64 <= N:
            _mk4(a, ao, a_rs, a_ks, b, n, ldb, c, co + n, ldc, K, accumulate)
            n += 64
        rest = N - n
        if rest == 48:
            _mk3(a, ao, a_rs, a_ks, b, n, ldb, c, co + n, ldc, K, accumulate)
        elif rest == 32:
            _mk2(a, ao, a_rs, a_ks, b, n, ldb, c, co + n, ldc, K, accumulate)
        elif rest == 16:
            _mk1(a, ao, a_rs, a_ks, b, n, ldb, c, co + n, ldc, K, accumulate)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def scores(Qs, Kb, nj, S):
    """``S[r, j] = dot(Qs[r], Kb[j])`` for every row r and j < nj; four rows share each key load.

    Parameters
    ----------
    Qs : float32 [R, D];  Kb : float32 [>= nj, D];  nj : int;  S : float32 [R, >= nj] (written)
    """
    prefer_512()
    no_alias()
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


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def accumulate(acc, r, p, Vb, n):
    """``acc[r] += sum_j p[j] * Vb[j]`` for j < n, four keys per pass over ``acc[r]``.

    Parameters
    ----------
    acc : float32 [R, D] (updated);  r : int;  p : float32 [>= n];  Vb : float32 [>= n, D];  n : int
    """
    prefer_512()
    no_alias()
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


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def accumulate_rows(acc, W, X, nj, nr):
    """``acc[j] += sum_r W[j, r] * X[r]`` for j < nj, r < nr.

    Parameters
    ----------
    acc : float32 [>= nj, D] (updated);  W : float32 [>= nj, >= nr];  X : float32 [>= nr, D]
    """
    for j in range(nj):
        accumulate(acc, j, W[j], X, nr)
