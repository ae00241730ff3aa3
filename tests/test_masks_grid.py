"""Ragged batches, windows, softcap and ALiBi at device-sized shapes (real GPUs; the CUDA simulator
runs the tiny versions in test_masks.py): every head dim in every dtype with a rotating modifier,
long decodes whose window spans several split-K partitions, prefills of several query tiles, a
large mixed batch, and the backward at prefill size. Parity with the float64 oracle, NaN in every
unused slot and in every key the window hides. Both runtimes run every case, the backward included."""
from __future__ import annotations

import numpy as np
import pytest

import paged_numba as pn
from helpers import BF16, DTYPE_IDS, F16, F32, FLOAT_DTYPES, assert_fwd_close, make_case, seed_of
from paged_numba.ops.reference import paged_attention_fwd_ref
from test_masks import check_bwd, poison_outside_window, ragged_case, rt, slopes_for  # noqa: F401 (fixture)

HEAD_DIMS = [16, 40, 64, 80, 128, 256]
MODS = [dict(window_left=37), dict(softcap=5.0), dict(alibi=True), dict(window_left=100, softcap=20.0, alibi=True)]


def _kw(mods, H, rng):
    kw = {k: v for k, v in mods.items() if k != "alibi"}
    if mods.get("alibi"):
        kw["alibi_slopes"] = slopes_for(H, rng)
    return kw


_CASES = [(dt, D, i) for i, (dt, D) in enumerate((dt, D) for dt in FLOAT_DTYPES for D in HEAD_DIMS)]


@pytest.mark.parametrize("Sq", [1, 3, 70])
@pytest.mark.parametrize("dtype,D,i", _CASES, ids=[f"{DTYPE_IDS[dt]}-D{D}" for dt, D, _ in _CASES])
def test_grid_head_dims(rt, dtype, D, i, Sq):
    mods = MODS[i % len(MODS)]
    rng = np.random.default_rng(seed_of("grid", str(dtype), D, Sq))
    H, Hkv = (8, 2) if i % 2 else (4, 4)
    lens = [0, 75, 300, 129]
    q, k, v, bt, sl = make_case(rng, 4, H, Hkv, Sq, D, 16, [max(L, Sq) if L else 0 for L in lens], dtype)
    kw = _kw(mods, H, rng)
    if "window_left" in kw:
        k, v = poison_outside_window(k, v, bt, sl, [Sq] * 4, kw["window_left"])
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=True, runtime=rt, **kw)
    assert_fwd_close(out, lse, *paged_attention_fwd_ref(q, k, v, bt, seq_lens=sl, causal=True, **kw), dtype)


@pytest.mark.parametrize("window", [0, 700, 3000, 9000])
def test_long_decode_window(rt, window):
    """Windows below one partition, across partitions and >= L over a 6000-token context."""
    rng = np.random.default_rng(seed_of("long", window))
    q, k, v, bt, sl = make_case(rng, 3, 32, 8, 1, 128, 16, [6000, 2500, 90], BF16)
    k, v = poison_outside_window(k, v, bt, sl, [1] * 3, window)
    kw = dict(window_left=window, softcap=30.0)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=True, runtime=rt, **kw)
    assert_fwd_close(out, lse, *paged_attention_fwd_ref(q, k, v, bt, seq_lens=sl, causal=True, **kw), BF16)


def test_large_mixed_batch(rt):
    """4 prefills (q_len > 4, one == L) and 20 decodes (q_len 1..4) and an idle sequence in one call."""
    rng = np.random.default_rng(31)
    qlens = [130, 70, 200, 5] + [1, 2, 3, 4] * 5 + [0]
    lens = [500, 70, 900, 40] + list(rng.integers(4, 3000, 20)) + [33]
    q, k, v, bt, sl, cu = ragged_case(rng, 8, 2, 64, 16, lens, qlens, F16)
    kw = dict(window_left=256, alibi_slopes=slopes_for(8, rng))
    k, v = poison_outside_window(k, v, bt, sl, qlens, 256)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=True, cu_seqlens_q=cu, runtime=rt, **kw)
    ref = paged_attention_fwd_ref(q, k, v, bt, seq_lens=sl, causal=True, cu_seqlens_q=cu, **kw)
    assert_fwd_close(out, lse, *ref, F16)


@pytest.mark.parametrize("mods", MODS, ids=["win", "softcap", "alibi", "all"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_grid_backward(rt, dtype, mods):
    rng = np.random.default_rng(seed_of("grid-bwd", str(dtype), sorted(mods)))
    q, k, v, bt, sl = make_case(rng, 3, 4, 2, 70, 64, 16, [70, 200, 90], dtype, shared=True)
    check_bwd(rt, q, k, v, bt, sl, dtype, True, _kw(mods, 4, rng))


def test_grid_backward_ragged(rt):
    rng = np.random.default_rng(41)
    q, k, v, bt, sl, cu = ragged_case(rng, 8, 2, 128, 16, [300, 64, 1000, 5], [100, 1, 64, 0], BF16)
    check_bwd(rt, q, k, v, bt, sl, BF16, True, dict(cu_seqlens_q=cu, window_left=50, softcap=10.0))
