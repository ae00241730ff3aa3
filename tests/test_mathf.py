"""The CPU kernels' vectorizable float32 functions (``kernels/cpu/mathf.py``) against float64 NumPy
on dense sweeps of float32 inputs."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from paged_numba.kernels.cpu import FASTMATH
from paged_numba.kernels.cpu.mathf import exp2_f32, tanh_f32


@njit(fastmath=FASTMATH, error_model="numpy")
def _tanh_all(x, out):
    for i in range(x.size):
        out[i] = tanh_f32(x[i])


@njit(fastmath=FASTMATH, error_model="numpy")
def _exp2_all(x, out):
    for i in range(x.size):
        out[i] = exp2_f32(x[i])


def _float32_range(lo, hi, step):
    """Every ``step``-th float32 in [lo, hi] (lo, hi > 0), by bit pattern."""
    a, b = np.float32(lo).view(np.uint32), np.float32(hi).view(np.uint32)
    return np.arange(a, b + 1, step, dtype=np.uint32).view(np.float32)


def test_tanh_f32_relative_error_on_a_float32_sweep():
    x = _float32_range(2.0 ** -30, 40.0, 97)   # ~11M values: tiny, the fit's joints, saturation
    x = np.concatenate([x, -x])
    got = np.empty_like(x)
    _tanh_all(x, got)
    ref = np.tanh(x.astype(np.float64))
    rel = np.abs(got - ref) / np.abs(ref)
    i = int(rel.argmax())
    assert rel[i] < 4e-7, f"tanh_f32({x[i]!r}) = {got[i]!r}, float64 tanh {ref[i]!r}: relative error {rel[i]:.3g}"
    assert np.all(np.abs(got) <= 1.0)
    assert np.all(np.sign(got) == np.sign(x))


@pytest.mark.parametrize("x,want", [(np.inf, 0.99999994), (-np.inf, -0.99999994), (1e30, 0.99999994),
                                    (0.0, 0.0), (1e-40, 1e-40)])
def test_tanh_f32_limits(x, want):
    got = np.empty(1, np.float32)
    _tanh_all(np.array([x], np.float32), got)
    assert got[0] == np.float32(want)


def test_tanh_f32_propagates_nan():
    got = np.empty(1, np.float32)
    _tanh_all(np.array([np.nan], np.float32), got)
    assert np.isnan(got[0])


def test_exp2_f32_relative_error():
    x = np.linspace(-126.0, 127.9, 2_000_001, dtype=np.float32)
    got = np.empty_like(x)
    _exp2_all(x, got)
    ref = np.exp2(x.astype(np.float64))
    rel = np.abs(got - ref) / ref
    i = int(rel.argmax())
    assert rel[i] < 2.5e-7, f"exp2_f32({x[i]!r}) = {got[i]!r}, float64 {ref[i]!r}: relative error {rel[i]:.3g}"
