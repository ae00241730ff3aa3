"""Device-side codecs for the CUDA kernels: raw element bits -> float32 and float32 -> storage.

Kernels see storage integers (STYLE: F16 / BF16 as ``uint16``, FP8 as ``uint8``, float32 K/V read
as 32-bit or 64-bit words) and decode them here with integer operations and bit casts, so no
NVRTC-linked half / bf16 / fp8 helper is needed and ``cache=True`` works. On the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) the bit casts go through NumPy scalar views instead of libdevice.

Kernels pass DType codes as compile-time constants and reference these functions as globals (a
kernel closure holding a compiled function would change numba's cache key in every process).
Every function is ``inline=True``: a non-inlined device function makes ``cuda.compile`` ask the
driver for the current device, which the CI compile check does not have.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from ...dtypes import BF16, E4M3, E5M2, F16, F32, FP8_E4M3_PARAMS, FP8_E5M2_PARAMS, fp8_encode_bits

SIM = bool(numba.config.ENABLE_CUDASIM)

if SIM:
    @cuda.jit(device=True, inline=True)
    def i2f(u):
        return np.uint32(u & 0xFFFFFFFF).view(np.float32)

    @cuda.jit(device=True, inline=True)
    def f2u(x):
        return np.uint32(np.float32(x).view(np.uint32))

    @cuda.jit(device=True, inline=True)
    def half_to_f32(h):
        return np.float32(np.uint16(h).view(np.float16))

    @cuda.jit(device=True, inline=True)
    def f32_to_half(x):
        return np.uint16(np.float16(x).view(np.uint16))
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def i2f(u):
        return libdevice.int_as_float(np.int32(u))

    @cuda.jit(device=True, inline=True)
    def f2u(x):
        return np.uint32(libdevice.float_as_int(x))

    @cuda.jit(device=True, inline=True)
    def half_to_f32(h):
        return libdevice.half2float(np.uint16(h))

    @cuda.jit(device=True, inline=True)
    def f32_to_half(x):
        return np.uint16(libdevice.float2half_rn(x))

_E4M3_UP = np.float32(2.0 ** 120)  # float32 exponent bias 127 minus E4M3's 7
_E5M2_UP = np.float32(2.0 ** 112)  # minus E5M2's 15

fp8_encode = cuda.jit(device=True, inline=True)(fp8_encode_bits)
_E4M3_P = FP8_E4M3_PARAMS
_E5M2_P = FP8_E5M2_PARAMS


@cuda.jit(device=True, inline=True)
def decode_bits(bits, code):
    """float32 value of the raw bits of one element of DType code ``code`` (a compile-time constant
    of the calling kernel, so the branches fold away)."""
    u = np.uint32(bits)
    if code == F32:
        return i2f(u)
    if code == BF16:
        return i2f(u << np.uint32(16))
    if code == F16:
        return half_to_f32(u)
    em = u & np.uint32(0x7F)
    if code == E4M3:
        # E4M3 bits shifted into float32 position give a float 2**-120 too small (exact for
        # subnormals too); NaN is S.1111.111 (no infinities).
        x = i2f(em << np.uint32(20)) * _E4M3_UP
        if em == np.uint32(0x7F):
            x = np.float32(np.nan)
    else:  # E5M2: IEEE-like, exponent 11111 is inf / NaN
        if (em & np.uint32(0x7C)) == np.uint32(0x7C):
            x = i2f(np.uint32(0x7F800000) | ((em & np.uint32(3)) << np.uint32(21)))
        else:
            x = i2f(em << np.uint32(21)) * _E5M2_UP
    if u & np.uint32(0x80):
        x = -x
    return x


@cuda.jit(device=True, inline=True)
def encode_bits(x, code):
    """Storage bits (as uint32) of float32 ``x`` in DType code ``code`` (not F32), rounding to
    nearest even; FP8 saturates to +-max and keeps NaN."""
    if code == BF16:
        u = f2u(x)
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            return (u >> np.uint32(16)) | np.uint32(0x40)  # quiet NaN
        u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
        return u >> np.uint32(16)
    if code == F16:
        return np.uint32(f32_to_half(x))
    if code == E4M3:
        return np.uint32(fp8_encode(f2u(x), _E4M3_P[0], _E4M3_P[1], _E4M3_P[2], _E4M3_P[3]))
    return np.uint32(fp8_encode(f2u(x), _E5M2_P[0], _E5M2_P[1], _E5M2_P[2], _E5M2_P[3]))


# Two FP8 codes -> two F16 values (the low byte to the low half). Every E4M3 and E5M2 value is an
# F16 value, so this is exact. E5M2 is the top byte of an F16, so its pair is two shifts on any GPU;
# E4M3 pairs go through the hardware converter of sm_89+ (``cvt.rn.f16x2.e4m3x2``, one instruction
# per two codes, against about seven integer operations per code in ``decode_bits``). A kernel
# uses it only when its factory flag says the device has the instruction; on the simulator the twin
# decodes each byte with ``decode_bits`` and rounds it to F16 (exact), the same bits.
if SIM:
    @cuda.jit(device=True, inline=True)
    def fp8x2_to_f16x2(bits, code):
        u = np.uint32(bits)
        lo = f32_to_half(decode_bits(u & np.uint32(0xFF), code))
        hi = f32_to_half(decode_bits((u >> np.uint32(8)) & np.uint32(0xFF), code))
        return np.uint32(lo) | (np.uint32(hi) << np.uint32(16))
else:
    from llvmlite import ir as _ir
    from numba import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic

    @_intrinsic
    def _cvt_e4m3x2(typingctx, bits):
        sig = _types.uint32(_types.uint32)

        def codegen(context, builder, sg, args):
            b16 = builder.trunc(args[0], _ir.IntType(16))
            fnty = _ir.FunctionType(_ir.IntType(32), [_ir.IntType(16)])
            asm = _ir.InlineAsm(fnty, "cvt.rn.f16x2.e4m3x2 $0, $1;", "=r,h", side_effect=False)
            return builder.call(asm, [b16])

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def fp8x2_to_f16x2(bits, code):
        u = np.uint32(bits)
        if code == E4M3:
            return _cvt_e4m3x2(u)
        return ((u & np.uint32(0xFF00)) << np.uint32(16)) | ((u & np.uint32(0xFF)) << np.uint32(8))


def fp8_pairs(kv_code: int, hwcvt: bool) -> bool:
    """Whether a kernel factory decodes K/V of DType code ``kv_code`` in pairs (``fp8x2_*``): E5M2
    always, E4M3 when the device has the converter (``hwcvt``), nothing else."""
    return kv_code == E5M2 or (kv_code == E4M3 and hwcvt)


@cuda.jit(device=True, inline=True)
def fp8x2_decode(bits, code):
    """The float32 values (low byte, high byte) of two FP8 codes of DType code ``code`` in the low
    16 bits of ``bits``, through ``fp8x2_to_f16x2``."""
    h2 = fp8x2_to_f16x2(bits, code)
    return half_to_f32(h2 & np.uint32(0xFFFF)), half_to_f32(h2 >> np.uint32(16))
