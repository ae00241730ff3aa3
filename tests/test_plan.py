"""pn.plan_attention: one plan, many runs (layers), against the one-shot ops, on every runtime.

The cpu cases run the real kernels; the cuda cases run on the simulator at tiny shapes in CI (and
on a GPU there, where the prepared launches and graph capture are exercised too: the GPU-only
cases skip on the simulator with a reason). CUDA cases carry "cuda" in their ids.
"""
from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paged_numba as pn
from helpers import BF16, F32, assert_unchanged, is_sim, make_case, snapshot

SIM_OK = True
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def _plan(table, lens, q, k, *, runtime, **kw):
    H, D = q.shape[1], q.shape[-1]
    Hkv = k.shape[2] if k.ndim == 4 else 1
    return pn.plan_attention(table, lens, num_heads=H, num_kv_heads=Hkv, head_dim=D, block_size=k.shape[1],
                             q_len=q.shape[2] if q.ndim == 4 else 1, runtime=runtime, **kw)


def _layers(rng, n, k, v, dtype):
    """n "layers": pools of the shape of k / v with fresh values (NaN where k / v hold NaN)."""
    out = []
    for _ in range(n):
        kk = np.where(np.isnan(k.astype(np.float32)), np.nan, rng.standard_normal(k.shape)).astype(dtype)
        vv = np.where(np.isnan(v.astype(np.float32)), np.nan, rng.standard_normal(v.shape)).astype(dtype)
        out.append((kk, vv))
    return out


def _eq(a, b):
    np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32))


# ------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("Sq,causal", [(1, False), (5, True)], ids=["decode", "prefill-causal"])
def test_plan_reused_across_layers_equals_ops(runtime_name, Sq, causal):
    rng = np.random.default_rng(1 + Sq)
    dtype = BF16 if runtime_name == "cpu" else F32
    q, k, v, table, lens = make_case(rng, 3, 4, 2, Sq, 16, 4, [9, Sq, 14], dtype)
    plan = _plan(table, lens, q, k, runtime=runtime_name, causal=causal)
    for kk, vv in _layers(rng, 3, k, v, dtype):
        out, lse = plan.run(q, kk, vv)
        ref_out, ref_lse = pn.paged_attention_fwd(q, kk, vv, table, seq_lens=lens, causal=causal,
                                                  runtime=runtime_name)
        _eq(out, ref_out)
        _eq(lse, ref_lse)
        assert out.dtype == q.dtype and lse.dtype == np.float32
    plan.check()


def test_plan_fp8_and_backward_equal_ops(runtime_name):
    rng = np.random.default_rng(7)
    q, k, v, table, lens = make_case(rng, 2, 4, 2, 2, 16, 4, [7, 12], F32)
    plan = _plan(table, lens, q, k, runtime=runtime_name, causal=True)
    k8, v8 = (np.nan_to_num(x).astype(E4M3) for x in (k, v))
    for scales in (dict(k_scale=0.5, v_scale=2.0), dict(q_scale=1.5, o_scale=0.25)):
        out, lse = plan.run_fp8(q, k8, v8, **scales)
        ref = pn.paged_attention_fwd_fp8(q, k8, v8, table, seq_lens=lens, causal=True, runtime=runtime_name, **scales)
        _eq(out, ref[0])
        _eq(lse, ref[1])
    out, lse = plan.run(q, k, v)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    got = plan.run_bwd(dout, q, k, v, out, lse)
    want = pn.paged_attention_bwd(dout, q, k, v, out, lse, table, seq_lens=lens, causal=True, runtime=runtime_name)
    for a, b in zip(got, want):
        _eq(np.nan_to_num(a), np.nan_to_num(b))


def test_plan_ragged_with_modifiers_equals_ops(runtime_name):
    """cu_seqlens_q replaces q_len; window / softcap / ALiBi go into the plan as into the ops."""
    rng = np.random.default_rng(3)
    _, k, v, table, lens = make_case(rng, 3, 2, 1, 1, 8, 4, [6, 9, 5], F32)
    cu = np.array([0, 1, 6, 8], np.int32)
    q = rng.standard_normal((8, 2, 8)).astype(np.float32)
    kw = dict(causal=True, cu_seqlens_q=cu, window_left=3, softcap=5.0, alibi_slopes=np.array([0.5, 0.25], np.float32))
    plan = pn.plan_attention(table, lens, num_heads=2, num_kv_heads=1, head_dim=8, block_size=4,
                             runtime=runtime_name, **kw)
    assert plan.q_shape == (8, 2, 8) and plan.lse_shape == (8, 2)
    out, lse = plan.run(q, k, v)
    ref = pn.paged_attention_fwd(q, k, v, table, seq_lens=lens, runtime=runtime_name, **kw)
    _eq(out, ref[0])
    _eq(lse, ref[1])


def test_plan_tensors_in_tensors_out(runtime_name):
    rng = np.random.default_rng(5)
    q, k, v, table, lens = make_case(rng, 2, 2, 2, 1, 8, 4, [5, 8], F32)
    plan = _plan(table, lens, q, k, runtime=runtime_name)
    qt, kt, vt = (pn.tensor(x, runtime=runtime_name) for x in (q, k, v))
    out, lse = plan.run(qt, kt, vt)
    assert isinstance(out, pn.Tensor) and out.runtime is pn.get_runtime(runtime_name)
    ref = pn.paged_attention_fwd(q, k, v, table, seq_lens=lens, runtime=runtime_name)
    _eq(out.numpy(), ref[0])
    with pytest.raises(ValueError, match="v_blocks: expected a pn.Tensor"):
        plan.run(qt, kt, v)


# ------------------------------------------------------------------------------ the plan's own copy

def test_plan_keeps_its_own_table_and_lengths(runtime_name):
    """Mutating the caller's table and lengths after planning (to ids far outside the pool, to longer
    lengths) changes nothing: the plan reads only its copy, in bounds."""
    rng = np.random.default_rng(11)
    q, k, v, table, lens = make_case(rng, 2, 2, 1, 1, 8, 4, [6, 11], F32)
    want = pn.paged_attention_fwd(q, k, v, table, seq_lens=lens, runtime=runtime_name)
    slopes = np.array([0.1, 0.2], np.float32)
    plan = _plan(table, lens, q, k, runtime=runtime_name)
    plan_mod = _plan(table, lens, q, k, runtime=runtime_name, alibi_slopes=slopes)
    want_mod = pn.paged_attention_fwd(q, k, v, table, seq_lens=lens, alibi_slopes=slopes.copy(), runtime=runtime_name)
    table[:] = 10 ** 6
    lens[:] = 4 * table.shape[1]
    slopes[:] = 100.0
    for p, w in ((plan, want), (plan_mod, want_mod)):
        out, lse = p.run(q, k, v)
        _eq(out, w[0])
        _eq(lse, w[1])


# ------------------------------------------------------------------------------ out= / lse=

def test_plan_out_buffers_are_reused(runtime_name):
    rng = np.random.default_rng(13)
    q, k, v, table, lens = make_case(rng, 2, 4, 2, 1, 8, 4, [5, 9], BF16)
    plan = _plan(table, lens, q, k, runtime=runtime_name)
    want = plan.run(q, k, v)
    qt, kt, vt = (pn.tensor(x, runtime=runtime_name) for x in (q, k, v))
    out_t = pn.tensor(np.full(q.shape, np.nan, BF16), runtime=runtime_name)
    lse_t = pn.tensor(np.full(plan.lse_shape, np.nan, np.float32), runtime=runtime_name)
    for _ in range(2):
        out, lse = plan.run(qt, kt, vt, out=out_t, lse=lse_t)
        assert out is out_t and lse is lse_t
        _eq(out.numpy(), want[0])
        _eq(lse.numpy(), want[1])
    out_np = np.full(q.shape, np.nan, BF16)           # NumPy in: NumPy buffers, written in place
    lse_np = np.empty(plan.lse_shape, np.float32)
    out, lse = plan.run(q, k, v, out=out_np, lse=lse_np)
    assert out is out_np and lse is lse_np
    _eq(out_np, want[0])
    _eq(lse_np, want[1])


@pytest.mark.parametrize("which,bad,exc,pattern", [
    ("out", np.zeros((2, 4, 2, 8), BF16), ValueError, r"out: expected shape \(2, 4, 1, 8\)"),
    ("out", np.zeros((2, 4, 1, 8), np.float32), TypeError, "out: expected dtype bf16"),
    ("lse", np.zeros((2, 4, 1), np.float16), TypeError, "lse: expected dtype f32"),
    ("lse", np.zeros((2, 4), np.float32), ValueError, r"lse: expected shape \(2, 4, 1\)"),
    ("out", [[0.0]], TypeError, "out: expected a NumPy array"),
], ids=["out-shape", "out-dtype", "lse-dtype", "lse-shape", "out-list"])
def test_plan_bad_out_buffers(runtime_name, which, bad, exc, pattern):
    rng = np.random.default_rng(17)
    q, k, v, table, lens = make_case(rng, 2, 4, 2, 1, 8, 4, [5, 9], BF16)
    plan = _plan(table, lens, q, k, runtime=runtime_name)
    before = snapshot(q, k, v)
    with pytest.raises(exc, match=pattern):
        plan.run(q, k, v, **{which: bad})
    assert_unchanged(before, q, k, v)


# ------------------------------------------------------------------------------ errors on the plan path

BASE = dict(num_heads=4, num_kv_heads=2, head_dim=8, block_size=4)


def _table():
    return np.array([[3, 7, -1], [1, -1, -1]], np.int32), np.array([6, 2], np.int32)


@pytest.mark.parametrize("change,exc,pattern", [
    (dict(block_table=np.zeros((2, 3), np.float32)), TypeError, "block_table: expected an integer array"),
    (dict(block_table=np.zeros(3, np.int32)), ValueError, r"block_table: expected 2-D \[B, M\]"),
    (dict(seq_lens=np.array([6, 13])), ValueError, r"seq_lens\[1\] = 13 is outside \[0, M \* block_size = 12\]"),
    (dict(seq_lens=np.array([6])), ValueError, r"seq_lens: expected 1-D \[B=2\]"),
    (dict(seq_lens=np.array([6, 5])), ValueError, re.escape("block_table[1, 1] = -1 is outside [0, N)")),
    (dict(num_heads=3), ValueError, "num_heads 3 must be a multiple of num_kv_heads 2"),
    (dict(num_heads=4.0), TypeError, "num_heads: expected an int"),
    (dict(head_dim=0), ValueError, "head_dim: expected an int >= 1, got 0"),
    (dict(block_size=-4), ValueError, "block_size: expected an int >= 1"),
    (dict(q_len=-1), ValueError, "q_len: expected an int >= 0"),
    (dict(q_len=2, cu_seqlens_q=[0, 1, 2]), ValueError, "q_len: leave it at 1 with cu_seqlens_q"),
    (dict(cu_seqlens_q=[0, 2, 1]), ValueError, "cu_seqlens_q: expected non-decreasing offsets"),
    (dict(cu_seqlens_q=[0, 1, 4]), ValueError, "cu_seqlens_q: sequence 1 has 3 queries"),
    (dict(scale=float("inf")), ValueError, "scale: expected a finite number"),
    (dict(causal="yes"), TypeError, "causal: expected a bool"),
    (dict(window_left=-2), ValueError, "window_left: expected -1"),
    (dict(softcap=-1.0), ValueError, "softcap: expected a finite number >= 0"),
    (dict(alibi_slopes=np.zeros(3, np.float32)), ValueError, r"alibi_slopes: expected shape \[H=4\]"),
    (dict(check_finite=1), TypeError, "check_finite: expected a bool"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_plan_attention_errors(runtime_name, change, exc, pattern):
    table, lens = _table()
    args = dict(BASE, block_table=table, seq_lens=lens, runtime=runtime_name)
    args.update(change)
    before = snapshot(table, lens)
    with pytest.raises(exc, match=pattern):
        pn.plan_attention(**args)
    assert_unchanged(before, table, lens)


def _run_case():
    rng = np.random.default_rng(19)
    q = rng.standard_normal((2, 4, 1, 8)).astype(np.float32)
    k = rng.standard_normal((8, 4, 2, 8)).astype(np.float32)
    return q, k, k.copy()


@pytest.mark.parametrize("what,exc,pattern", [
    ("q-shape", ValueError, re.escape("q: expected the plan's shape [B, H, Sq, D] = (2, 4, 1, 8), got (2, 4, 2, 8)")),
    ("q-dtype", TypeError, "q: expected dtype f32, f16 or bf16, got float64"),
    ("k-dtype", TypeError, "k_blocks: expected q's dtype f32, got bf16"),
    ("k-heads", ValueError, re.escape("k_blocks: expected the plan's [N, bs=4, Hkv=2, D=8]")),
    ("v-shape", ValueError, "v_blocks: expected the shape of k_blocks"),
    ("pool-small", ValueError, re.escape("block_table[0, 1] = 7 is outside the pool [0, 6)")),
    ("fp8-float-kv", TypeError, "k_blocks: expected FP8"),
    ("fp8-scale", ValueError, "k_scale: expected a finite number > 0"),
    ("bwd-lse", ValueError, re.escape("lse: expected shape [B, H, Sq] = (2, 4, 1)")),
    ("bwd-dout", TypeError, "dout: expected q's dtype f32"),
])
def test_plan_run_errors(runtime_name, what, exc, pattern):
    table, lens = _table()
    plan = pn.plan_attention(table, lens, runtime=runtime_name, **BASE)
    q, k, v = _run_case()
    before = snapshot(q, k, v)
    with pytest.raises(exc, match=pattern):
        if what == "q-shape":
            plan.run(np.zeros((2, 4, 2, 8), np.float32), k, v)
        elif what == "q-dtype":
            plan.run(q.astype(np.float64), k, v)
        elif what == "k-dtype":
            plan.run(q, k.astype(BF16), v)
        elif what == "k-heads":
            plan.run(q, k[:, :, :1].copy(), v[:, :, :1].copy())
        elif what == "v-shape":
            plan.run(q, k, v[:4])
        elif what == "pool-small":
            plan.run(q, k[:6], v[:6])
        elif what == "fp8-float-kv":
            plan.run_fp8(q, k, v)
        elif what == "fp8-scale":
            plan.run_fp8(q, k.astype(E4M3), v.astype(E4M3), k_scale=0.0)
        elif what == "bwd-lse":
            plan.run_bwd(q, q, k, v, q, np.zeros((2, 4), np.float32))
        else:
            plan.run_bwd(q.astype(BF16), q, k, v, q, np.zeros((2, 4, 1), np.float32))
    assert_unchanged(before, q, k, v)


def test_plan_on_other_runtime_tensors(runtime_name):
    table, lens = _table()
    other = "cuda" if runtime_name == "cpu" else "cpu"
    if other not in pn.available_runtimes():
        pytest.skip("one runtime only")
    plan = pn.plan_attention(table, lens, runtime=runtime_name, **BASE)
    q, k, v = (pn.tensor(x, runtime=other) for x in _run_case())
    with pytest.raises(ValueError, match=f"q: a Tensor on '{other}', but the plan is on '{runtime_name}'"):
        plan.run(q, k, v)


# ------------------------------------------------------------------------------ finite check, streams

def test_plan_non_finite_scores(runtime_name):
    """cpu: run raises at once. cuda: run does not wait for the device; plan.check() (or a plan
    made with check_finite=True) raises, and check() clears the flag."""
    table, lens = _table()
    q, k, v = _run_case()
    q[1, 2, 0, 3] = np.inf
    plan = pn.plan_attention(table, lens, runtime=runtime_name, **BASE)
    with pytest.raises(ValueError, match=r"q: expected finite values, got inf or NaN at q\[1, 2, 0, 3\]"):
        pn.paged_attention_fwd(q, k, v, table, seq_lens=lens, runtime=runtime_name)   # host q: checked first
    if runtime_name == "cpu":
        with pytest.raises(ValueError, match="not finite"):
            plan.run(q, k, v)
        return
    plan.run(q, k, v)
    with pytest.raises(ValueError, match="scale: some attention scores are not finite"):
        plan.check()
    plan.check()                                        # cleared
    strict = pn.plan_attention(table, lens, runtime=runtime_name, check_finite=True, **BASE)
    with pytest.raises(ValueError, match="not finite"):
        strict.run(q, k, v)


def test_cpu_plan_rejects_a_stream():
    table, lens = _table()
    with pytest.raises(ValueError, match="stream: the 'cpu' runtime has no streams"):
        pn.plan_attention(table, lens, runtime="cpu", stream=object(), **BASE)


def test_cuda_plan_stream_argument(runtime_name):
    if runtime_name != "cuda":
        pytest.skip("streams are a cuda feature")
    from numba import cuda

    table, lens = _table()
    q, k, v = _run_case()
    want = pn.paged_attention_fwd(q, k, v, table, seq_lens=lens, runtime="cuda")
    s = cuda.stream()
    plan = pn.plan_attention(table, lens, runtime="cuda", stream=s, **BASE)
    out, lse = plan.run(q, k, v)
    plan.synchronize()
    _eq(out, want[0])
    with pytest.raises(TypeError, match="stream: expected a numba stream"):
        pn.plan_attention(table, lens, runtime="cuda", stream="s", **BASE)
    if is_sim("cuda"):
        class Handle:                                    # torch-style: the raw handle in .cuda_stream
            cuda_stream = 1234

        with pytest.raises(TypeError, match="the CUDA simulator takes numba streams only"):
            pn.plan_attention(table, lens, runtime="cuda", stream=Handle(), **BASE)
        return

    class Proto:                                         # the CUDA stream protocol
        def __cuda_stream__(self):
            return (0, int(s.handle))

    for obj in (Proto(), int(s.handle)):
        plan = pn.plan_attention(table, lens, runtime="cuda", stream=obj, **BASE)
        out, _ = plan.run(q, k, v)
        plan.synchronize()
        _eq(out, want[0])


def test_plan_capture(runtime_name):
    table, lens = _table()
    plan = pn.plan_attention(table, lens, runtime=runtime_name, **BASE)
    if runtime_name == "cpu":
        with pytest.raises(NotImplementedError, match="CUDA graphs need the cuda runtime"):
            with plan.capture():
                pass
        return
    if is_sim("cuda"):
        with pytest.raises(NotImplementedError, match="simulator has no CUDA graphs"):
            with plan.capture():
                pass
        return
    with pytest.raises(RuntimeError, match="default stream cannot be captured"):
        with plan.capture():
            pass


def test_cuda_graph_capture_replay_parity(runtime_name):
    """GPU only: a captured 3-layer step replays to the results of plain runs."""
    if runtime_name != "cuda" or is_sim("cuda"):
        pytest.skip("CUDA graphs need a real GPU (the simulator has none)")
    from numba import cuda

    rng = np.random.default_rng(23)
    q, k, v, table, lens = make_case(rng, 4, 8, 2, 1, 64, 16, [100, 37, 1, 64], BF16)
    layers = [tuple(pn.tensor(x, runtime="cuda") for x in kv) for kv in _layers(rng, 3, k, v, BF16)]
    qt = pn.tensor(q, runtime="cuda")
    plan = _plan(table, lens, q, k, runtime="cuda", stream=cuda.stream())
    outs = [(pn.tensor(np.zeros(q.shape, BF16), runtime="cuda"),
             pn.tensor(np.zeros(plan.lse_shape, np.float32), runtime="cuda")) for _ in layers]
    want = [plan.run(qt, kk, vv) for kk, vv in layers]     # also compiles / prepares
    plan.synchronize()
    with plan.capture() as graph:
        for (kk, vv), (o, l) in zip(layers, outs):
            plan.run(qt, kk, vv, out=o, lse=l)
    for _ in range(2):
        graph.replay()
        plan.synchronize()
        for (o, l), (wo, wl) in zip(outs, want):
            _eq(o.numpy(), wo.numpy())
            _eq(l.numpy(), wl.numpy())


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_cuda_prepared_launch_parity(runtime_name):
    """GPU only: runs after the first (prepared launches through cuLaunchKernel) equal numba's,
    on decode (split-K + merge), SIMT prefill and tensor-core prefill, with pools of other sizes."""
    if runtime_name != "cuda" or is_sim("cuda"):
        pytest.skip("prepared launches need a real GPU (the simulator launches through numba)")
    rng = np.random.default_rng(29)
    for Sq, dtype in ((1, BF16), (9, F32), (33, BF16)):
        q, k, v, table, lens = make_case(rng, 3, 8, 2, Sq, 64, 16, [3000, 40, 700], dtype, spare_blocks=5)
        plan = _plan(table, lens, q, k, runtime="cuda", causal=True)
        qt = pn.tensor(q, runtime="cuda")
        for kk, vv in _layers(rng, 3, k, v, dtype):
            pad = np.full((4,) + k.shape[1:], np.nan, dtype)   # a larger pool: other N, same table
            kk, vv = (pn.tensor(np.concatenate([x, pad]), runtime="cuda") for x in (kk, vv))
            got = [plan.run(qt, kk, vv) for _ in range(3)]
            want = pn.paged_attention_fwd(qt, kk, vv, table, seq_lens=lens, causal=True)
            for out, lse in got:
                _eq(out.numpy(), want[0].numpy())
                _eq(lse.numpy(), want[1].numpy())
        assert plan._state.prepared, "the plan should have prepared its launches"
    assert pn.get_runtime("cuda").client.prepared_launch, "prepared launches were given up (see the warning)"


# ------------------------------------------------------------------------------ PagedKVCache.plan

def test_cache_plan_runs_every_layer(runtime_name):
    rng = np.random.default_rng(31)
    cache = pn.PagedKVCache(num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8, num_layers=2,
                            runtime=runtime_name)
    a, b = cache.add_sequence(), cache.add_sequence()
    for sid, T in ((a, 7), (b, 3)):
        slots = cache.reserve(sid, T)
        for layer in range(2):
            kp, vp = cache.layer_pools(layer)
            kv = (pn.tensor(rng.standard_normal((T, 2, 8)).astype(np.float32), runtime=runtime_name) for _ in range(2))
            pn.write_kv(kp, vp, *kv, slots)
    q = rng.standard_normal((2, 4, 1, 8)).astype(np.float32)
    plan = cache.plan([a, b], num_heads=4)
    table, lens = cache.block_table([a, b])
    for layer in range(2):
        kp, vp = cache.layer_pools(layer)
        out, lse = plan.run(pn.tensor(q, runtime=runtime_name), kp, vp)
        want = pn.paged_attention_fwd(pn.tensor(q, runtime=runtime_name), kp, vp, table, seq_lens=lens, causal=True)
        _eq(out.numpy(), want[0].numpy())
    _eq(plan.run(pn.tensor(q, runtime=runtime_name), *cache.layer_pools(0))[0].numpy(), cache.attention(q, [a, b])[0])


# ------------------------------------------------------------------------------ property

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_plan_property_cpu(data):
    """Any small shape: a plan's runs over two pools equal the one-shot ops on each (cpu)."""
    G = data.draw(st.integers(1, 3))
    Hkv = data.draw(st.integers(1, 2))
    B = data.draw(st.integers(1, 3))
    D = data.draw(st.sampled_from([4, 8, 16]))
    bs = data.draw(st.sampled_from([1, 2, 4, 16]))
    Sq = data.draw(st.integers(0, 6))
    lens = data.draw(st.lists(st.integers(Sq, Sq + 40), min_size=B, max_size=B))
    causal = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    q, k, v, table, sl = make_case(rng, B, G * Hkv, Hkv, Sq, D, bs, lens, F32)
    plan = _plan(table, sl, q, k, runtime="cpu", causal=causal)
    for kk, vv in _layers(rng, 2, k, v, F32):
        out, lse = plan.run(q, kk, vv)
        want = pn.paged_attention_fwd(q, kk, vv, table, seq_lens=sl, causal=causal, runtime="cpu")
        _eq(out, want[0])
        _eq(lse, want[1])
