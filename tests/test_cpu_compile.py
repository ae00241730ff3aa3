"""What the CPU runtime compiles, and how it spreads work over threads.

- Read-only inputs (``flags.writeable = False``, memory-mapped pools opened read-only) run on the
  kernels compiled for writable ones: the number of compiled specializations of every CPU kernel
  is unchanged after calls with read-only inputs, results are bit-identical, inputs untouched.
- A call compiles only what it runs: a float32 decode in a fresh process compiles no BF16 / F16 /
  FP8 decoder and no GEMM microkernel; a BF16 prefill compiles no float32 row loader and no
  decode-path dot products.
- ``cache=True``: a second process loads every kernel from the cache and saves nothing.
- ``launch``: one thread and numba's pool give the same results bit for bit; the caller's thread
  count is restored, also after an error.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numba
import numpy as np
import pytest

import paged_numba as pn
from helpers import assert_unchanged, make_case, seed_of, snapshot

ROOT = Path(__file__).resolve().parents[1]


def compiled_count() -> int:
    """Specializations compiled (or loaded from the cache) so far by every CPU kernel: the module
    level dispatchers and every kernel the memoized factories can build (asking a factory for a
    kernel it has not built yet builds an uncompiled one, which counts 0)."""
    from paged_numba.kernels.cpu import codecs, gemm, paged_attention, paged_attention_bwd, write_kv

    seen = {}
    for mod in (codecs, gemm, paged_attention, paged_attention_bwd, write_kv):
        for obj in vars(mod).values():
            if isinstance(obj, numba.core.registry.CPUDispatcher):
                seen[id(obj)] = obj
    kernels = []
    for path in (False, True):
        for a in range(5):
            kernels += [paged_attention_bwd.dkdv_kernel(a, path), paged_attention_bwd.dq_kernel(a, path)]
            kernels += [paged_attention.fwd_kernel(a, b, path) for b in range(5)]
    seen.update((id(k), k) for k in kernels)
    return sum(len(d.overloads) for d in seen.values())


def _read_only(*arrays):
    out = []
    for a in arrays:
        c = np.array(a, copy=True)
        c.flags.writeable = False
        out.append(c)
    return out


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("Sq", [1, 24], ids=["decode", "prefill"])
def test_read_only_inputs_share_the_compiled_kernels(dtype, Sq, tmp_path):
    rng = np.random.default_rng(seed_of("ro", Sq, np.dtype(dtype).name))
    q, k, v, table, lens = make_case(rng, 2, 4, 2, Sq, 32, 16, [40, 29], dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    out, lse = pn.paged_attention_fwd(q, k, v, table, seq_lens=lens, causal=True, runtime="cpu")
    grads = pn.paged_attention_bwd(dout, q, k, v, out, lse, table, seq_lens=lens, causal=True, runtime="cpu")
    before = compiled_count()

    ro = _read_only(q, k, v, table, lens, dout, out, lse)
    # a pool memory-mapped read-only, as a cache loaded from disk would be
    path = tmp_path / "k.bin"
    np.ascontiguousarray(k).view(np.uint8).tofile(path)
    k_map = np.memmap(path, dtype=k.dtype, mode="r", shape=k.shape)
    assert not k_map.flags.writeable and not ro[0].flags.writeable
    snap = snapshot(*ro, k_map)
    qr, kr, vr, tr, lr, dr, outr, lser = ro
    out2, lse2 = pn.paged_attention_fwd(qr, k_map, vr, tr, seq_lens=lr, causal=True, runtime="cpu")
    out3, lse3 = pn.paged_attention_fwd(q, kr, v, table, seq_lens=lens, causal=True, runtime="cpu")
    grads2 = pn.paged_attention_bwd(dr, qr, k_map, vr, outr, lser, tr, seq_lens=lr, causal=True,
                                    runtime="cpu")
    assert compiled_count() == before, "read-only inputs compiled new specializations"
    for a, b in [(out, out2), (lse, lse2), (out, out3), (lse, lse3)] + list(zip(grads, grads2)):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    assert_unchanged(snap, *ro, k_map)
    assert not qr.flags.writeable and not k_map.flags.writeable  # flags untouched too


def test_read_only_rows_share_the_write_kv_kernel():
    rng = np.random.default_rng(seed_of("ro-write"))
    k_pool = np.zeros((4, 8, 2, 16), np.float32)
    v_pool = np.zeros_like(k_pool)
    k, v = (rng.standard_normal((5, 2, 16), dtype=np.float32) for _ in range(2))
    pn.write_kv(k_pool, v_pool, k, v, np.array([0, 3, 9, -1, 17]), runtime="cpu")
    want = k_pool.copy(), v_pool.copy()
    before = compiled_count()
    kr, vr = _read_only(k, v)
    slots = np.array([0, 3, 9, -1, 17])
    slots.flags.writeable = False
    k_pool[:] = 0
    v_pool[:] = 0
    pn.write_kv(k_pool, v_pool, kr, vr, slots, runtime="cpu")
    assert compiled_count() == before
    np.testing.assert_array_equal(k_pool, want[0])
    np.testing.assert_array_equal(v_pool, want[1])


def _run(code, env):
    full = dict(os.environ, PYTHONPATH=str(ROOT), PAGED_NUMBA_RUNTIME="cpu", **env)
    proc = subprocess.run([sys.executable, "-c", code], env=full, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


_ONLY_WHAT_IT_RUNS = """
import numpy as np, ml_dtypes, paged_numba as pn
from paged_numba.kernels.cpu import codecs, gemm, paged_attention as pa
rng = np.random.default_rng(0)
k, v = (rng.standard_normal((8, 16, 2, 64), dtype=np.float32).astype({dt}) for _ in range(2))
q = rng.standard_normal((2, 8, {Sq}, 64), dtype=np.float32).astype({dt})
pn.paged_attention_fwd(q, k, v, np.arange(8, dtype=np.int32).reshape(2, 4), causal=True)
compiled = {{name for name, f in [*vars(codecs).items(), *vars(gemm).items(), *vars(pa).items()]
            if hasattr(f, "signatures") and f.signatures}}
print(sorted(compiled))
"""


@pytest.mark.parametrize("dt,Sq,want,unwanted", [
    # (the GEMM path's matmul and token loaders are inlined: they leave no signature)
    ("np.float32", 1, {"_row_f32", "scores", "accumulate", "exp2_shifted", "finish_row"},
     {"_row_bf16", "_row_f16", "_row_e4m3", "_row_e5m2"}),
    ("ml_dtypes.bfloat16", 64, {"_row_bf16", "finish_row"},
     {"_row_f32", "_row_f16", "_row_e4m3", "_row_e5m2", "scores", "accumulate", "exp2_shifted"}),
], ids=["f32-decode", "bf16-prefill"])
def test_a_call_compiles_only_its_dtype_and_path(dt, Sq, want, unwanted, tmp_path):
    out = _run(_ONLY_WHAT_IT_RUNS.format(dt=dt, Sq=Sq), {"NUMBA_CACHE_DIR": str(tmp_path)}).stdout
    compiled = set(eval(out.strip().splitlines()[-1]))
    assert want <= compiled, compiled
    assert not (unwanted & compiled), compiled


_ALL_OPS = """
import numpy as np, paged_numba as pn
rng = np.random.default_rng(0)
k, v = (rng.standard_normal((8, 16, 2, 32), dtype=np.float32) for _ in range(2))
t = np.arange(8, dtype=np.int32).reshape(2, 4)
q = rng.standard_normal((2, 4, 3, 32), dtype=np.float32)
out, lse = pn.paged_attention_fwd(q, k, v, t, causal=True)
pn.paged_attention_bwd(np.ones_like(q), q, k, v, out, lse, t, causal=True)
pn.write_kv(k.copy(), v.copy(), k[0], v[0], np.arange(16))
k8 = np.zeros((8, 16, 2, 32), np.uint8)
pn.write_kv(k8, k8.copy(), k[0], v[0], np.arange(16), fp8_format="e4m3")
pn.paged_attention_fwd_fp8(q, k8, k8, t, fp8_format="e4m3")
"""


def test_second_process_loads_every_kernel_from_the_cache(tmp_path):
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_DEBUG_CACHE": "1"}
    first = _run(_ALL_OPS, env).stdout
    assert "data saved to" in first
    second = _run(_ALL_OPS, env).stdout
    saved = [line for line in second.splitlines() if "data saved to" in line or "index saved" in line]
    assert not saved, "compiled again in the second process:\n" + "\n".join(saved)
    assert "data loaded from" in second


def test_launch_one_thread_and_pool_give_the_same_results():
    from paged_numba.kernels.cpu.launch import launch
    from paged_numba.kernels.cpu.paged_attention import fwd_kernel, n_items

    rng = np.random.default_rng(seed_of("launch"))
    q, k, v, table, lens = make_case(rng, 3, 8, 2, 40, 32, 16, [70, 33, 0], np.float32)
    table = np.where(table < 0, 0, table).astype(np.int32)
    tq = 16
    threads = numba.get_num_threads()
    outs = []
    for est_us in (0.0, 1e9):  # one thread, then numba's pool
        out = np.full(q.shape, np.nan, np.float32)
        lse = np.full(q.shape[:3], np.nan, np.float32)
        launch(fwd_kernel(0, 0, True), (q, k, v, table, lens, 0.25, 1.0, True, tq, out, lse),
               n_items(3, 8, 2, 40, tq), est_us)
        assert numba.get_num_threads() == threads  # restored
        outs.append((out, lse))
    assert not np.isnan(outs[1][0]).any()
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_launch_restores_the_thread_count_after_an_error():
    from paged_numba.kernels.cpu.launch import launch

    threads = numba.get_num_threads()
    seen = []

    def kernel(start, stop):
        seen.append(numba.get_num_threads())
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        launch(kernel, (), 8, 0.0)
    assert seen == [1] and numba.get_num_threads() == threads


def test_launch_chunks_serial_kernels_over_threads():
    """A serial ``nogil`` kernel (the backward's kind) runs every item exactly once whether on the
    calling thread or split into chunks over the pool, and an error in one chunk is raised after
    the other chunks finished."""
    import threading

    from numba import njit

    from paged_numba.kernels.cpu import launch as L

    @njit(nogil=True)
    def double(x, out, start, stop):
        for i in range(start, stop):
            out[i] += 2.0 * x[i]

    x = np.arange(37, dtype=np.float64)
    for est_us in (0.0, 1e9):
        out = np.zeros_like(x)
        L.launch(double, (x, out), x.size, est_us)
        np.testing.assert_array_equal(out, 2.0 * x)

    done, lock = [], threading.Lock()

    class Kernel:
        targetoptions = {"nogil": True}

        def __call__(self, start, stop):
            if start == 0:
                raise RuntimeError("boom")
            with lock:
                done.extend(range(start, stop))

    threads = min(numba.get_num_threads(), 40)
    with pytest.raises(RuntimeError, match="boom"):
        L.launch(Kernel(), (), 40, 1e9)
    if threads > 1:
        first = 40 // min(40, threads * L.CHUNKS_PER_THREAD)
        assert sorted(done) == list(range(first, 40))
