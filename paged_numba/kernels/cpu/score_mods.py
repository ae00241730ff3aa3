"""The CPU forward's score modifiers (softcap, ALiBi) and masks over a row's or a tile's scores,
vectorized: ``mod_row`` (the decode path: one row, a paged block's keys) and ``mod_tile`` (the
GEMM path: a key tile, rows on the vector lanes, with compile-time flags so a call pays only for
what is on; ``mod_tile_any`` chooses the copy from run-time values).
Scores come in natural units (q . k times the scale) and leave in base 2 for exp2."""
from __future__ import annotations

import numpy as np
from numba import njit

from . import FASTMATH
from .mathf import LOG2E, tanh_f32


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def mod_row(Sr, a, nvis, P, cap, inv_cap, slope, d0):
    """P[j] = visible natural-units score Sr[a + j] through the softcap (cap > 0), then ALiBi (minus
    slope * |d0 - j|), in base 2 for exp2; returns (max, NaN if some score is not finite else 0)."""
    mb = np.float32(-np.inf)
    bad = np.float32(0.0)
    for j in range(nvis):
        s = Sr[a + j]
        if cap > 0.0:
            s = cap * tanh_f32(s * inv_cap)
        s -= slope * np.float32(abs(d0 - j))
        s *= np.float32(LOG2E)
        P[j] = s
        bad += s - s
        mb = max(mb, s)
    return mb, bad


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def mod_tile(St, Rp, nk, t0, lo, hi, pos, slope2, capl, inv_cap, CAP, BARE, chk, mt):
    """One key tile of the GEMM path's scores ``St[j * Rp + r]`` (key t0 + j, row r) through the
    modifiers, in place and in base 2: softcap ``capl * tanh(s * inv_cap)`` when ``CAP`` (capl = cap
    log2 e, s in natural units), then -- unless ``BARE`` (no ALiBi slope and every row sees the
    whole tile) -- minus ``slope2[r] * |pos[r] - t|`` (slopes times log2 e) and keys outside
    [lo[r], hi[r]) set to -inf; ``chk[r]`` gets NaN for a non-finite visible score and ``mt[r]``
    the running max. Rows are the inner loop (the vector lanes); the flags are constants at each
    call site (``mod_tile_any``), so each copy compiles without the others' work."""
    for j in range(nk):
        t = np.int32(t0 + j)
        for r in range(Rp):
            x = j * Rp + r
            s = St[x]
            if CAP:
                s = capl * tanh_f32(s * inv_cap)
            if BARE:
                chk[r] += s - s     # NaN where a score is inf / NaN
            else:
                s -= slope2[r] * np.float32(abs(pos[r] - t))
                vis = (t >= lo[r]) & (t < hi[r])
                chk[r] += (s - s) if vis else np.float32(0.0)   # NaN where a visible score is inf / NaN
                s = s if vis else np.float32(-np.inf)
            St[x] = s
            mt[r] = s if s > mt[r] else mt[r]


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def mod_tile_any(St, Rp, nk, t0, lo, hi, pos, slope2, capl, inv_cap, cap_on, bare, chk, mt):
    """``mod_tile`` with its flags from run-time values (softcap on; no ALiBi slope and the tile
    inside every row's visible keys), in three copies: a bare softcap tile -- where the mask and the
    ALiBi term cost most next to the tanh -- and the full pass with and without the softcap. Each
    copy is compiled into every modifier kernel; all eight (softcap, ALiBi, mask) combinations
    would add about 5 s of cold compile."""
    if cap_on and bare:
        mod_tile(St, Rp, nk, t0, lo, hi, pos, slope2, capl, inv_cap, True, True, chk, mt)
    elif cap_on:
        mod_tile(St, Rp, nk, t0, lo, hi, pos, slope2, capl, inv_cap, True, False, chk, mt)
    else:
        mod_tile(St, Rp, nk, t0, lo, hi, pos, slope2, capl, inv_cap, False, False, chk, mt)
