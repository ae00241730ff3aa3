"""Array codecs on the CPU: the scalar FP8 encoder of ``dtypes.py`` compiled for numba's CPU target."""
from __future__ import annotations

from numba import njit, prange

from ...dtypes import fp8_encode_bits

_encode = njit(inline="always", cache=True)(fp8_encode_bits)


@njit(parallel=True, cache=True)
def fp8_encode_array(bits, out, mbits, bias, max_code, nan_code):
    """``out[i]`` = FP8 code of the float32 with bits ``bits[i]`` (1-D uint32 -> 1-D uint8)."""
    for i in prange(bits.shape[0]):
        out[i] = _encode(bits[i], mbits, bias, max_code, nan_code)
