"""The CUDA kernels' FP8 pair decode (``kernels/cuda/codecs.fp8x2_decode``): on a GPU of sm_89 or
later the E4M3 pairs go through the hardware converter (``cvt.rn.f16x2.e4m3x2``), E5M2 pairs through
shifts into F16; on the CUDA simulator through the twin. Every code, in the low and in the high byte
of a pair, must give the same float32 bits as the one-code decode (``decode_bits``) and as
ml_dtypes, NaN codes NaN."""
from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest

from helpers import RUNTIMES

pytestmark = pytest.mark.skipif("cuda" not in RUNTIMES, reason="no CUDA runtime (GPU or simulator)")

if "cuda" in RUNTIMES:
    from numba import cuda

    from paged_numba.dtypes import as_dtype
    from paged_numba.kernels.cuda.codecs import decode_bits, fp8x2_decode

FORMATS = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


@functools.cache
def _probe(code):
    @cuda.jit
    def probe(pairs, lo, hi, single):
        i = cuda.grid(1)
        if i < pairs.size:
            a, b = fp8x2_decode(np.uint32(pairs[i]), code)
            lo[i] = a
            hi[i] = b
            single[i] = decode_bits(np.uint32(pairs[i]) & np.uint32(0xFF), code)

    return probe


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_cuda_fp8_pair_decode_every_code(fmt):
    import paged_numba as pn

    rt = pn.get_runtime("cuda")
    from paged_numba.runtime.cuda.plan import fp8_hw_convert

    if fmt == "e4m3" and not (rt.simulator or fp8_hw_convert(rt.cc)):
        pytest.skip(f"the device (sm_{rt.cc[0]}{rt.cc[1]}) has no FP8 pair converter; the kernels decode per code")
    code = as_dtype(fmt).code
    codes = np.arange(256, dtype=np.uint16)
    # every code in the low byte (with its complement in the high byte) and in the high byte
    pairs = np.concatenate([codes | ((255 - codes) << 8), (255 - codes) | (codes << 8)]).astype(np.uint16)
    lo, hi, single = (np.zeros(pairs.size, np.float32) for _ in range(3))
    _probe(code)[(pairs.size + 127) // 128, 128](pairs, lo, hi, single)
    want_lo = (pairs & 0xFF).astype(np.uint8).view(FORMATS[fmt]).astype(np.float32)
    want_hi = (pairs >> 8).astype(np.uint8).view(FORMATS[fmt]).astype(np.float32)
    for got, want in ((lo, want_lo), (hi, want_hi), (single, want_lo)):
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
