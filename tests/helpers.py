"""Helpers shared by the test suite: the runtimes to test, a random paged-case builder with NaN
poisoning, per-dtype tolerances, deterministic seeds and comparison against the float64 oracle.
Imported by test modules as ``from helpers import ...``; ``conftest.py`` (loaded first) turns the
CUDA simulator on when no GPU is present, before numba is imported here.

Symbols: B batch, H query heads, Hkv KV heads, Sq queries per sequence, D head_dim, N physical
blocks, bs block_size, M max blocks per sequence (block_table columns), L_b key length of b.
"""
from __future__ import annotations

import math
import os
import zlib

import ml_dtypes
import numpy as np
import pytest

import paged_numba as pn
from paged_numba.ops.reference import paged_attention_fwd_ref

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = [F32, F16, BF16]
DTYPE_IDS = {F32: "f32", F16: "f16", BF16: "bf16"}

# (atol, rtol) on out. The reference runs in float64 on the SAME low-precision inputs, so only the
# kernel's float32 accumulation and the final rounding of out to q's dtype differ.
OUT_TOL = {F32: (1e-5, 1e-5), F16: (2e-3, 2e-3), BF16: (2e-2, 2e-2)}
# lse is float32 whatever q's dtype, computed from the same (exactly representable) inputs.
LSE_TOL = {F32: (1e-5, 1e-5), F16: (1e-5, 1e-5), BF16: (1e-5, 1e-5)}


# ------------------------------------------------------------------------------- runtimes

def cudasim_enabled() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def is_sim(runtime_name: str) -> bool:
    """True when ``runtime_name`` runs on the numba CUDA simulator (tiny shapes only there)."""
    return runtime_name == "cuda" and cudasim_enabled()


#: Why a runtime of ALL_RUNTIMES cannot start here (its parametrized cases skip with this reason).
UNAVAILABLE: dict = {}


def _runtimes_to_test() -> list:
    names = ["cpu"]
    try:
        pn.get_runtime("cuda")
    except pn.RuntimeUnavailableError as exc:
        UNAVAILABLE["cuda"] = str(exc)
    else:
        names.append("cuda")
    return names


ALL_RUNTIMES = ["cpu", "cuda"]   # the runtime_name fixture's lanes: each runs, or skips saying why
RUNTIMES = _runtimes_to_test()   # the runtimes that start here


# Work (B * H * Sq * max L * D) above which a case is skipped on the simulator (~1 ms / thread).
SIM_MAX_WORK = 64 * 64 * 16


def skip_if_too_big_for_sim(runtime_name, q_shape, max_len):
    B, H, Sq, D = q_shape
    if is_sim(runtime_name) and B * H * Sq * max(max_len, 1) * D > SIM_MAX_WORK:
        pytest.skip("shape too large for the CUDA simulator")


# ------------------------------------------------------------------------------- cases

def make_case(rng, B, H, Hkv, Sq, D, bs, lens, dtype, shared=False, kv3d=False, *,
              spare_blocks=2, extra_cols=1):
    """A random paged-attention case -> (q, k_blocks, v_blocks, block_table, seq_lens).

    q [B, H, Sq, D], k_blocks / v_blocks [N, bs, Hkv, D] (``kv3d``: [N, bs, D], needs Hkv == 1),
    all of ``dtype``; block_table int32 [B, M] with M = max blocks needed + ``extra_cols`` and -1 in
    every entry that is not read; seq_lens int32 [B] = ``lens``.

    Physical blocks come from a random permutation of the pool, which has ``spare_blocks`` blocks
    no sequence references. Every slot no valid token reads (t >= L_b in a last block, spare
    blocks) holds NaN. With ``shared``, sequences b > 0 also reference physical blocks already used
    by earlier sequences (at least sequence 1's first block is sequence 0's first block), so a
    shared slot holds one K/V value read by several sequences.
    """
    dtype = np.dtype(dtype)
    lens = np.asarray(lens, dtype=np.int64).reshape(B)
    if kv3d:
        assert Hkv == 1
    need = [int(math.ceil(L / bs)) for L in lens]
    M = max(need + [0]) + extra_cols
    assert M >= 1
    N = sum(need) + spare_blocks
    perm = [int(p) for p in rng.permutation(N)]
    table = np.full((B, M), -1, dtype=np.int32)
    used_phys: list = []
    for b in range(B):
        for lb in range(need[b]):
            if shared and b > 0 and used_phys and (
                    (b == 1 and lb == 0 and need[0] > 0) or rng.random() < 0.5):
                phys = table[0, 0] if (b == 1 and lb == 0) else used_phys[rng.integers(len(used_phys))]
            else:
                phys = perm.pop()
            table[b, lb] = phys
            used_phys.append(int(phys))
    read = np.zeros((N, bs), dtype=bool)
    for b in range(B):
        for t in range(int(lens[b])):
            read[table[b, t // bs], t % bs] = True
    shape = (N, bs, Hkv, D)
    k = np.full(shape, np.nan)
    v = np.full(shape, np.nan)
    n_read = int(read.sum())
    k[read] = rng.standard_normal((n_read, Hkv, D))
    v[read] = rng.standard_normal((n_read, Hkv, D))
    if kv3d:
        k, v = k[:, :, 0, :], v[:, :, 0, :]
    q = rng.standard_normal((B, H, Sq, D))
    return (q.astype(dtype), np.ascontiguousarray(k.astype(dtype)),
            np.ascontiguousarray(v.astype(dtype)), table, lens.astype(np.int32))


def reference(q, k, v, table, *, seq_lens=None, seq_len_k=None, causal=False, scale=None):
    """float64 oracle on the same (low-precision) inputs, upcast exactly."""
    return paged_attention_fwd_ref(q, k, v, table, seq_lens=seq_lens, seq_len_k=seq_len_k,
                                   causal=causal, scale=scale)


def assert_fwd_close(out, lse, ref_out, ref_lse, dtype):
    """out / lse of the library against the oracle's, with ``dtype``'s tolerances; NaN nowhere,
    rows with no visible key exactly 0 / -inf."""
    dtype = np.dtype(dtype)
    out = np.asarray(out)
    lse = np.asarray(lse)
    assert out.dtype == dtype, f"out dtype {out.dtype}, expected {dtype}"
    assert lse.dtype == np.float32, f"lse dtype {lse.dtype}, expected float32"
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    out64 = out.astype(np.float64)
    assert not np.isnan(out64).any(), "NaN in out"
    assert not np.isnan(lse).any(), "NaN in lse"
    empty = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty, err_msg="lse = -inf rows differ")
    assert np.all(out64[empty] == 0.0), "rows with no visible key must give out == 0"
    atol, rtol = OUT_TOL[dtype]
    np.testing.assert_allclose(out64, ref_out, atol=atol, rtol=rtol, err_msg="out")
    atol, rtol = LSE_TOL[dtype]
    np.testing.assert_allclose(lse[~empty].astype(np.float64), ref_lse[~empty], atol=atol,
                               rtol=rtol, err_msg="lse")


def snapshot(*arrays) -> list:
    """Raw bytes (NaN payloads included) of each array, to check later that nothing changed."""
    return [(np.asarray(a).dtype, np.asarray(a).shape, np.asarray(a).tobytes()) for a in arrays]


def assert_unchanged(before, *arrays):
    after = snapshot(*arrays)
    for i, (x, y) in enumerate(zip(before, after)):
        assert x == y, f"input #{i} was modified"


def seed_of(*parts) -> int:
    """A deterministic RNG seed from test parameters (``hash(str)`` changes per process)."""
    return zlib.crc32(repr(parts).encode())


def spy_tensor_core_factory(monkeypatch, split: bool) -> list:
    """Record the calls of ``paged_prefill.prefill_kernel`` (the client imports the factory per
    call) that build the split-K decode (``split``: SPLIT=True) or the prefill (SPLIT off): a list of
    (args, kwargs) that grows as the client builds kernels."""
    from paged_numba.kernels.cuda import paged_prefill

    calls = []
    real = paged_prefill.prefill_kernel

    def counted(*a, **kw):
        if bool(kw.get("SPLIT")) == split:
            calls.append((a, kw))
        return real(*a, **kw)
    monkeypatch.setattr(paged_prefill, "prefill_kernel", counted)
    return calls
