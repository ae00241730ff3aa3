"""Tensor-core primitives for the CUDA kernels: ``mma.sync`` m16n8k16 (BF16 / F16 in, float32
accumulators) and m16n8k8 (TF32 in; ``to_tf32``, ``tf32_split`` and ``split4`` make 3xTF32
operands, ``mma3`` / ``mma3_rn`` the three products),
``ldmatrix`` (x4, and ``.trans``) from shared memory, ``cp.async`` 16-byte global -> shared copies
with commit / wait groups, the packing, quad-reduction and 32-bit division helpers, and a
two-element float32 atomic add (``red.global.add.v2.f32``, sm_90).

On a GPU each primitive is one PTX instruction emitted as llvmlite ``InlineAsm`` through numba's
``@intrinsic`` (no NVRTC-linked helper, so ``cache=True`` works). Inline PTX cannot run on the CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``), so there each primitive is a twin with the same fragment
semantics -- the PTX ISA's lane -> element mapping -- that exchanges the warp's fragments through
shared memory and ``syncthreads`` (every thread of the block must call it: the kernels call these
block-uniformly). CI runs every kernel's fragment indexing through the twins at tiny shapes.

Fragment layout of ``mma.m16n8k16.row.col`` (lane = 4 * g + t, g = lane // 4, t = lane % 4; a
uint32 register holds two 16-bit elements, the lower column / k index in the low half):

- A (16 x 16, row-major), 4 registers: a0 = A[g, 2t:2t+2], a1 = A[g+8, 2t:2t+2],
  a2 = A[g, 2t+8:2t+10], a3 = A[g+8, 2t+8:2t+10];
- B (16 x 8, k x n), 2 registers: b0 = B[2t:2t+2, g], b1 = B[2t+8:2t+10, g];
- C / D (16 x 8, float32), 4 registers: c0, c1 = C[g, 2t], C[g, 2t+1]; c2, c3 = C[g+8, 2t], C[g+8, 2t+1].

``mma.m16n8k8`` TF32 (one 32-bit element per register): A (16 x 8), a0 = A[g, t], a1 = A[g+8, t],
a2 = A[g, t+4], a3 = A[g+8, t+4]; B (8 x 8), b0 = B[t, g], b1 = B[t+4, g]; C / D as above.

``lds2`` / ``lds4``: 8- / 16-byte loads of a 32-bit shared array (``ld.shared.v2`` / ``.v4``).

``ldmatrix.m8n8.x4.b16``: lane 8 * i + r gives the address of row r of 8 x 8 matrix i (8
consecutive 16-bit elements, 16-byte aligned); register i of lane 4 * g + t receives matrix i's
elements [g, 2t], [g, 2t+1] -- with ``.trans``, [2t, g], [2t+1, g].

Arrays are passed with an element index (fragments are ``cuda.local.array`` slices, tiles flat
shared ``uint16`` arrays); indices must be in bounds and, for ldmatrix / cp.async, 16-byte aligned.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float32, int64

from ...dtypes import BF16, F32
from .codecs import SIM, f2u, i2f, half_to_f32, f32_to_half, encode_bits

NWMAX = 4          # warps per block the simulator twins have scratch for

if not SIM:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    _F32 = ir.FloatType()
    _I32 = ir.IntType(32)
    _I64 = ir.IntType(64)

    def _elem_ptr(context, builder, arrty, arr, idx):
        """Pointer to element ``idx`` (an int64 value) of a C-contiguous array (no wraparound)."""
        ary = context.make_array(arrty)(context, builder, value=arr)
        return builder.gep(ary.data, [idx])

    def _shared_addr(builder, ptr):
        """32-bit shared-window address of a generic pointer into shared memory."""
        sptr = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, addrspace=3))
        return builder.ptrtoint(sptr, _I32)

    def _asm(builder, ret, args, text, constraints, side_effect=True):
        fnty = ir.FunctionType(ret, [a.type for a in args])
        return builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=side_effect), args)

    def _mma_intrinsic(ptx_type, k=16):
        text = (f"mma.sync.aligned.m16n8k{k}.row.col.f32.{ptx_type}.{ptx_type}.f32 "
                "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")

        @intrinsic
        def impl(typingctx, d, di, a, ai, b, bi):
            sig = types.void(d, types.int64, a, types.int64, b, types.int64)

            def codegen(context, builder, sg, args):
                dty, _, aty, _, bty, _ = sg.args
                d_, di_, a_, ai_, b_, bi_ = args
                dp = [_elem_ptr(context, builder, dty, d_, builder.add(di_, _I64(j))) for j in range(4)]
                av = [builder.load(_elem_ptr(context, builder, aty, a_, builder.add(ai_, _I64(j))))
                      for j in range(4)]
                bv = [builder.load(_elem_ptr(context, builder, bty, b_, builder.add(bi_, _I64(j))))
                      for j in range(2)]
                cv = [builder.load(p) for p in dp]
                res = _asm(builder, ir.LiteralStructType([_F32] * 4), av + bv + cv, text,
                           "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3", side_effect=False)
                for j in range(4):
                    builder.store(builder.extract_value(res, j), dp[j])
                return context.get_dummy_value()

            return sig, codegen

        return impl

    _mma_bf16 = _mma_intrinsic("bf16")
    _mma_f16 = _mma_intrinsic("f16")
    _mma_tf32 = _mma_intrinsic("tf32", 8)

    @intrinsic
    def to_tf32(typingctx, x):
        """x rounded to TF32 (``cvt.rna.tf32.f32``: 10 mantissa bits, ties away from zero), as the
        bits of a float32 whose low 13 bits are zero."""
        sig = types.uint32(types.float32)

        def codegen(context, builder, sg, args):
            return _asm(builder, _I32, [args[0]], "cvt.rna.tf32.f32 $0, $1;", "=r,f", side_effect=False)

        return sig, codegen

    def _ldsm_intrinsic(trans):
        text = ("ldmatrix.sync.aligned.m8n8.x4" + (".trans" if trans else "")
                + ".shared.b16 {$0,$1,$2,$3}, [$4];")

        @intrinsic
        def impl(typingctx, frag, fi, smem, idx):
            sig = types.void(frag, types.int64, smem, types.int64)

            def codegen(context, builder, sg, args):
                fty, _, sty, _ = sg.args
                f_, fi_, s_, idx_ = args
                addr = _shared_addr(builder, _elem_ptr(context, builder, sty, s_, idx_))
                res = _asm(builder, ir.LiteralStructType([_I32] * 4), [addr], text,
                           "=r,=r,=r,=r,r,~{memory}")
                for j in range(4):
                    builder.store(builder.extract_value(res, j),
                                  _elem_ptr(context, builder, fty, f_, builder.add(fi_, _I64(j))))
                return context.get_dummy_value()

            return sig, codegen

        return impl

    _ldsm_x4 = _ldsm_intrinsic(False)
    _ldsm_x4_t = _ldsm_intrinsic(True)

    def _lds_intrinsic(n):
        regs = ",".join(f"${j}" for j in range(n))
        text = f"ld.shared.v{n}.u32 {{{regs}}}, [${n}];"

        @intrinsic
        def impl(typingctx, smem, idx):
            ret = types.UniTuple(types.uint32, n)
            sig = ret(smem, types.int64)

            def codegen(context, builder, sg, args):
                addr = _shared_addr(builder, _elem_ptr(context, builder, sg.args[0], args[0], args[1]))
                res = _asm(builder, ir.LiteralStructType([_I32] * n), [addr], text,
                           ",".join(["=r"] * n) + ",r,~{memory}")
                return context.make_tuple(builder, ret, [builder.extract_value(res, j) for j in range(n)])

            return sig, codegen

        return impl

    _lds_v2 = _lds_intrinsic(2)
    _lds_v4 = _lds_intrinsic(4)

    @cuda.jit(device=True, inline=True)
    def lds2(smem, idx):
        """(smem[idx], smem[idx + 1]) of a 32-bit shared array as one 8-byte load (idx even)."""
        return _lds_v2(smem, int64(idx))

    @cuda.jit(device=True, inline=True)
    def lds4(smem, idx):
        """smem[idx:idx + 4] of a 32-bit shared array as one 16-byte load (idx a multiple of 4)."""
        return _lds_v4(smem, int64(idx))

    @intrinsic
    def _cp_async16(typingctx, dst, di, src, si, nbytes):
        sig = types.void(dst, types.int64, src, types.int64, types.int32)

        def codegen(context, builder, sg, args):
            dty, _, sty, _, _ = sg.args
            d_, di_, s_, si_, n_ = args
            daddr = _shared_addr(builder, _elem_ptr(context, builder, dty, d_, di_))
            saddr = builder.ptrtoint(_elem_ptr(context, builder, sty, s_, si_), _I64)
            _asm(builder, ir.VoidType(), [daddr, saddr, n_],
                 "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r,~{memory}")
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _red_add_v2(typingctx, arr, idx, x, y):
        sig = types.void(arr, types.int64, types.float32, types.float32)

        def codegen(context, builder, sg, args):
            a_, i_, x_, y_ = args
            ptr = _elem_ptr(context, builder, sg.args[0], a_, i_)
            gptr = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, addrspace=1))
            _asm(builder, ir.VoidType(), [builder.ptrtoint(gptr, _I64), x_, y_],
                 "red.global.add.v2.f32 [$0], {$1, $2};", "l,f,f")   # no clobber: nothing here reads the sums
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _cp_async_commit(typingctx):
        def codegen(context, builder, sg, args):
            _asm(builder, ir.VoidType(), [], "cp.async.commit_group;", "~{memory}")
            return context.get_dummy_value()

        return types.void(), codegen

    @intrinsic
    def _cp_async_wait0(typingctx):
        def codegen(context, builder, sg, args):
            _asm(builder, ir.VoidType(), [], "cp.async.wait_group 0;", "~{memory}")
            return context.get_dummy_value()

        return types.void(), codegen

    def _pack_intrinsic(ptx_type):
        text = f"cvt.rn.{ptx_type}x2.f32 $0, $1, $2;"

        @intrinsic
        def impl(typingctx, lo, hi):
            sig = types.uint32(types.float32, types.float32)

            def codegen(context, builder, sg, args):
                lo_, hi_ = args     # PTX: d.hi = the first source, d.lo = the second
                return _asm(builder, _I32, [hi_, lo_], text, "=r,f,f", side_effect=False)

            return sig, codegen

        return impl

    _pack_bf16 = _pack_intrinsic("bf16")
    _pack_f16 = _pack_intrinsic("f16")

    @intrinsic
    def exp2_approx(typingctx, x):
        """2 ** x by the SFU (``ex2.approx.ftz.f32``: relative error ~2**-22; -inf -> 0)."""
        sig = types.float32(types.float32)

        def codegen(context, builder, sg, args):
            return _asm(builder, _F32, [args[0]], "ex2.approx.ftz.f32 $0, $1;", "=f,f", side_effect=False)

        return sig, codegen

    @intrinsic
    def rcp_approx(typingctx, x):
        """1 / x by the SFU (``rcp.approx.ftz.f32``: at most 1 ulp; inf -> 0): a full-precision
        division is a subroutine call whose code stops the unrolling of a score loop."""
        sig = types.float32(types.float32)

        def codegen(context, builder, sg, args):
            return _asm(builder, _F32, [args[0]], "rcp.approx.ftz.f32 $0, $1;", "=f,f", side_effect=False)

        return sig, codegen

    @intrinsic
    def udiv32(typingctx, a, b):
        """a // b in unsigned 32-bit arithmetic (numba widens integer division to 64 bits, a
        call on the GPU)."""
        sig = types.uint32(types.uint32, types.uint32)

        def codegen(context, builder, sg, args):
            return builder.udiv(args[0], args[1])

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def mma(kind, d, di, a, ai, b, bi):
        """d[di:di+4] += A @ B for the fragments a[ai:ai+4] and b[bi:bi+2] of type ``kind`` (a
        compile-time constant): BF16 / F16, m16n8k16 (A 16 x 16, B 16 x 8); F32, m16n8k8 on TF32
        operands (A 16 x 8, B 8 x 8: registers holding ``to_tf32`` bits)."""
        if kind == BF16:
            _mma_bf16(d, int64(di), a, int64(ai), b, int64(bi))
        elif kind == F32:
            _mma_tf32(d, int64(di), a, int64(ai), b, int64(bi))
        else:
            _mma_f16(d, int64(di), a, int64(ai), b, int64(bi))

    @cuda.jit(device=True, inline=True)
    def ldsm_x4(frag, fi, smem, idx):
        """frag[fi:fi+4] = ldmatrix x4; this lane gives the row at smem[idx]."""
        _ldsm_x4(frag, int64(fi), smem, int64(idx))

    @cuda.jit(device=True, inline=True)
    def ldsm_x4_t(frag, fi, smem, idx):
        """frag[fi:fi+4] = ldmatrix x4 .trans; this lane gives the row at smem[idx]."""
        _ldsm_x4_t(frag, int64(fi), smem, int64(idx))

    @cuda.jit(device=True, inline=True)
    def cp_async16(dst, di, src, si, nbytes):
        """Start copying 16 bytes from src[si] (global) to dst[di] (shared); only the first
        ``nbytes`` (16 or 0) are read, the rest of the 16 bytes is zero-filled."""
        _cp_async16(dst, int64(di), src, int64(si), np.int32(nbytes))

    @cuda.jit(device=True, inline=True)
    def red_add2(arr, i, x, y):
        """arr[i] += x and arr[i + 1] += y (float32, global memory, i even: 8-byte aligned) as one
        vector reduction, ``red.global.add.v2.f32`` (sm_90 and later)."""
        _red_add_v2(arr, int64(i), float32(x), float32(y))

    @cuda.jit(device=True, inline=True)
    def cp_async_commit():
        _cp_async_commit()

    @cuda.jit(device=True, inline=True)
    def cp_async_wait_all():
        """Wait for this thread's committed copies (then ``syncthreads`` to see everyone's)."""
        _cp_async_wait0()

    @cuda.jit(device=True, inline=True)
    def pack2(kind, lo, hi):
        """Two float32 rounded to nearest even into one register of 16-bit ``kind`` (lo in the low
        half)."""
        if kind == BF16:
            return _pack_bf16(lo, hi)
        return _pack_f16(lo, hi)

    @cuda.jit(device=True, inline=True)
    def quad_max(x):
        """max of x over the 4 lanes of this lane's quad (lanes 4g .. 4g + 3)."""
        x = max(x, cuda.shfl_xor_sync(0xFFFFFFFF, x, 1))
        return max(x, cuda.shfl_xor_sync(0xFFFFFFFF, x, 2))

    @cuda.jit(device=True, inline=True)
    def quad_sum(x):
        x += cuda.shfl_xor_sync(0xFFFFFFFF, x, 1)
        return x + cuda.shfl_xor_sync(0xFFFFFFFF, x, 2)

else:
    # ---------------------------------------------------------------- simulator twins
    # Fragments are exchanged through per-warp shared scratch; two syncthreads per call.

    @cuda.jit(device=True)
    def _u16_to_f32(h, kind):
        if kind == BF16:
            return i2f(np.uint32(h) << np.uint32(16))
        return half_to_f32(h)

    @cuda.jit(device=True)
    def to_tf32(x):
        u = f2u(np.float32(x))
        if u & np.uint32(0x7F800000) == np.uint32(0x7F800000):     # inf / NaN: kept
            return u
        return (u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)    # nearest, ties away from zero

    @cuda.jit(device=True)
    def mma(kind, d, di, a, ai, b, bi):
        A = cuda.shared.array((NWMAX, 16, 16), float32)
        Bm = cuda.shared.array((NWMAX, 16, 8), float32)
        lane = cuda.threadIdx.x % 32
        w = cuda.threadIdx.x // 32
        g = lane // 4
        t = lane % 4
        if kind == F32:     # m16n8k8 TF32: a_j = A[g + 8 (j % 2), t + 4 (j // 2)], b_j = B[t + 4 j, g]
            for j in range(4):
                A[w, g + 8 * (j % 2), t + 4 * (j // 2)] = i2f(np.uint32(a[ai + j]) & np.uint32(0xFFFFE000))
            for j in range(2):
                Bm[w, t + 4 * j, g] = i2f(np.uint32(b[bi + j]) & np.uint32(0xFFFFE000))
            cuda.syncthreads()
            for j in range(4):
                r = g + 8 * (j // 2)
                c = 2 * t + j % 2
                acc = np.float32(d[di + j])
                for kk in range(8):
                    acc = np.float32(acc + A[w, r, kk] * Bm[w, kk, c])
                d[di + j] = acc
            cuda.syncthreads()
            return
        for j in range(4):
            r = g + 8 * (j % 2)
            c = 2 * t + 8 * (j // 2)
            word = np.uint32(a[ai + j])
            A[w, r, c] = _u16_to_f32(word & np.uint32(0xFFFF), kind)
            A[w, r, c + 1] = _u16_to_f32(word >> np.uint32(16), kind)
        for j in range(2):
            word = np.uint32(b[bi + j])
            Bm[w, 2 * t + 8 * j, g] = _u16_to_f32(word & np.uint32(0xFFFF), kind)
            Bm[w, 2 * t + 8 * j + 1, g] = _u16_to_f32(word >> np.uint32(16), kind)
        cuda.syncthreads()
        for j in range(4):
            r = g + 8 * (j // 2)
            c = 2 * t + j % 2
            acc = np.float32(d[di + j])
            for kk in range(16):
                acc = np.float32(acc + A[w, r, kk] * Bm[w, kk, c])
            d[di + j] = acc
        cuda.syncthreads()

    @cuda.jit(device=True)
    def _ldsm(frag, fi, smem, idx, trans):
        P = cuda.shared.array((NWMAX, 32), int64)
        lane = cuda.threadIdx.x % 32
        w = cuda.threadIdx.x // 32
        g = lane // 4
        t = lane % 4
        P[w, lane] = idx
        cuda.syncthreads()
        for i in range(4):
            if trans:
                lo = smem[P[w, 8 * i + 2 * t] + g]
                hi = smem[P[w, 8 * i + 2 * t + 1] + g]
            else:
                lo = smem[P[w, 8 * i + g] + 2 * t]
                hi = smem[P[w, 8 * i + g] + 2 * t + 1]
            frag[fi + i] = np.uint32(lo) | (np.uint32(hi) << np.uint32(16))
        cuda.syncthreads()

    @cuda.jit(device=True)
    def ldsm_x4(frag, fi, smem, idx):
        _ldsm(frag, fi, smem, idx, False)

    @cuda.jit(device=True)
    def ldsm_x4_t(frag, fi, smem, idx):
        _ldsm(frag, fi, smem, idx, True)

    @cuda.jit(device=True)
    def lds2(smem, idx):
        return np.uint32(smem[idx]), np.uint32(smem[idx + 1])

    @cuda.jit(device=True)
    def lds4(smem, idx):
        return np.uint32(smem[idx]), np.uint32(smem[idx + 1]), np.uint32(smem[idx + 2]), np.uint32(smem[idx + 3])

    @cuda.jit(device=True)
    def cp_async16(dst, di, src, si, nbytes):
        n = 16 // dst.itemsize
        for e in range(n):
            dst[di + e] = src[si + e] if nbytes else 0

    @cuda.jit(device=True)
    def cp_async_commit():
        pass

    @cuda.jit(device=True)
    def red_add2(arr, i, x, y):
        cuda.atomic.add(arr, i, x)
        cuda.atomic.add(arr, i + 1, y)

    @cuda.jit(device=True)
    def exp2_approx(x):
        return np.float32(np.exp2(np.float32(x)))

    @cuda.jit(device=True)
    def rcp_approx(x):
        return np.float32(np.float32(1.0) / np.float32(x))

    @cuda.jit(device=True)
    def udiv32(a, b):
        return np.uint32(np.uint32(a) // np.uint32(b))

    @cuda.jit(device=True)
    def cp_async_wait_all():
        pass

    @cuda.jit(device=True)
    def pack2(kind, lo, hi):
        if kind == BF16:
            return np.uint32(encode_bits(lo, kind)) | (np.uint32(encode_bits(hi, kind)) << np.uint32(16))
        return np.uint32(f32_to_half(lo)) | (np.uint32(f32_to_half(hi)) << np.uint32(16))

    @cuda.jit(device=True)
    def _quad(x, is_max):
        Q = cuda.shared.array(32 * NWMAX, float32)
        tid = cuda.threadIdx.x
        Q[tid] = x
        cuda.syncthreads()
        base = tid - tid % 4
        r = Q[base]
        for j in range(1, 4):
            r = max(r, Q[base + j]) if is_max else np.float32(r + Q[base + j])
        cuda.syncthreads()
        return r

    @cuda.jit(device=True)
    def quad_max(x):
        return _quad(x, True)

    @cuda.jit(device=True)
    def quad_sum(x):
        return _quad(x, False)


@cuda.jit(device=True, inline=True)
def tf32_split(x):
    """(hi, lo): hi = x rounded to TF32 (``to_tf32``), lo = the float32 bits of x - hi (exact), which
    the TF32 mma reads truncated to TF32 (its low 13 bits ignored), so x = hi + lo to 2**-21 |x|:
    the operand pair of the 3xTF32 products (hi hi + hi lo + lo hi; lo lo is below 2**-22 |x y|)."""
    hi = to_tf32(x)
    return hi, f2u(x - i2f(hi))


@cuda.jit(device=True, inline=True)
def split4(sm, i, hi, lo, fi, step):
    """hi / lo[fi + step * e] = ``tf32_split`` of the float32 tile elements sm[i + e], e < 4 (one
    16-byte read of the 32-bit shared array ``sm``, i a multiple of 4)."""
    x0, x1, x2, x3 = lds4(sm, i)
    hi[fi], lo[fi] = tf32_split(i2f(x0))
    hi[fi + step], lo[fi + step] = tf32_split(i2f(x1))
    hi[fi + 2 * step], lo[fi + 2 * step] = tf32_split(i2f(x2))
    hi[fi + 3 * step], lo[fi + 3 * step] = tf32_split(i2f(x3))


@cuda.jit(device=True, inline=True)
def mma3(d, di, ah, al, ai, bh, bl, bi):
    """d[di:di+4] += A @ B as 3xTF32 m16n8k8 products of the split fragments (lo hi + hi lo first,
    then hi hi): float32 accuracy."""
    mma(F32, d, di, al, ai, bh, bi)
    mma(F32, d, di, ah, ai, bl, bi)
    mma(F32, d, di, ah, ai, bh, bi)


@cuda.jit(device=True, inline=True)
def mma3_rn(d, di, ah, al, ai, bh, bl, bi):
    """d[di:di+4] += A @ B as ``mma3`` into zeroed accumulators, added to d by round-to-nearest
    float32 adds: only the 3 products of one k-step share a tensor-core accumulation, whose rounding
    is coarser than float32's (chains of 6 mma per accumulator measured up to 2.7x the SIMT
    backward's error on the H200; per k-step, within 1.9x)."""
    t = cuda.local.array(4, float32)
    for i in range(4):
        t[i] = 0.0
    mma3(t, 0, ah, al, ai, bh, bl, bi)
    for i in range(4):
        d[di + i] += t[i]
