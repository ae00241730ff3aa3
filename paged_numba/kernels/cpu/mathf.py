"""float32 elementary functions the CPU kernels call per score, written so that LLVM vectorizes the
loops that call them: no libm call (``math.exp2`` / ``math.tanh`` are scalar libm calls, which stop
vectorization), no branch (both sides computed, one selected), coefficients as immediates.

- ``exp2_poly(f)``: 2 ** f for f in [0, 1), degree-5 fit, relative error < 8e-8.
- ``exp2_f32(y)``: 2 ** y for -126 <= y < 128 (``exp2_poly`` of the fraction times the exponent
  bits); y = -127 gives exactly 0, the value the kernels clamp masked scores to.
- ``tanh_f32(x)``: tanh, a rational fit, relative error < 4e-7 (against float64 ``np.tanh`` on
  float32 inputs: ``tests/test_mathf.py``); NaN gives NaN.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import FASTMATH
from .codecs import as_float32

LOG2E = 1.4426950408889634    # log2(e): natural-log scores -> base 2 for exp2


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def exp2_poly(f):
    """2 ** f for float32 f in [0, 1): degree-5 fit, relative error < 8e-8 (under float32's
    half-ulp). The coefficients are written in the body, so they compile to immediate constants
    (module-level NumPy scalars would be loaded from memory in every iteration)."""
    return np.float32(0.99999993) + f * (np.float32(0.69315297) + f * (np.float32(0.24015453) + f * (
        np.float32(0.0558236) + f * (np.float32(0.00899258) + f * np.float32(0.00187623)))))


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def exp2_f32(y):
    """2 ** y for float32 -126 <= y < 128 (the caller clamps; -127 gives exactly 0: exponent field 0):
    the fraction through ``exp2_poly``, the integer part as exponent bits (float32 ``llvm.floor``:
    ``math.floor`` goes through an int)."""
    yf = np.floor(y)
    return exp2_poly(y - yf) * as_float32((np.int32(yf) + np.int32(127)) << np.int32(23))


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def tanh_f32(x):
    """tanh(x) for float32 x: x P(x^2) / Q(x^2) on x clamped to [-8.3, 8.3], P of degree 5 and Q of
    degree 3 (a relative-error minimax fit made for this module, Lawson-weighted least squares);
    relative error < 4e-7 (about 6 float32 ulps) everywhere, tanh(+-inf) = +-0.99999994, NaN gives
    NaN. One division and no branch, so a loop over scores vectorizes."""
    c = min(max(x, np.float32(-8.3)), np.float32(8.3))
    u = c * c
    p = np.float32(0.999999973) + u * (np.float32(1.29618299e-01) + u * (np.float32(2.96685950e-03) + u * (
        np.float32(9.69639582e-06) + u * (np.float32(-1.41088983e-08) + u * np.float32(2.18017243e-11)))))
    q = np.float32(1.0) + u * (np.float32(4.62951390e-01) + u * (np.float32(2.39510169e-02) + u * np.float32(
        2.34523169e-04)))
    t = c * p / q
    t = np.float32(1.0) if t > np.float32(1.0) else t   # the fit overshoots 1 by an ulp near 7.5; NaN passes
    return np.float32(-1.0) if t < np.float32(-1.0) else t
