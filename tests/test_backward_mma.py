"""The tensor-core backward (``kernels/cuda/paged_backward_mma.py``, F16 / BF16, and F32 as 3xTF32;
head dims that are multiples of 16 up to 128) against the float64 oracle ``paged_attention_bwd_ref``.

On the CUDA simulator (where the mma / ldmatrix / cp.async twins run the kernel's fragment
indexing) at tiny shapes: several key tiles and query steps (the double buffer), GQA 1 / 4, block
sizes 8 / 16, head dims 16 / 32, causal and not, Sq > L (rows without keys), L = 0, shared blocks
(the shared slot's gradient is the sum over the sequences), ragged batches (``cu_seqlens_q``) with
sliding windows, dense windows with a GQA group of 3, NaN in every unused pool slot; two tile
layouts (1 warp, and 2 warps with 32-row steps: the dQ work split over warps). GPU-only cases: head
dims 64 / 128 at the client's tiles and at 4 warps, prefill-sized Sq, ragged with windows. Every
case checks that the tensor-core kernel ran (and the routing cases that it did not) with the
tolerance style of ``test_backward.py`` (max error over max |ref|, floored at a tenth of the size
of the terms that cancel); F32 also against the SIMT kernels' own error (within 2x).
"""
from __future__ import annotations

import numpy as np
import pytest

import paged_numba as pn
from helpers import BF16, F16, F32, RUNTIMES, assert_unchanged, is_sim, make_case, seed_of, snapshot
from paged_numba.ops.reference import gather_kv, paged_attention_bwd_ref, to_float64
from test_backward import GRAD_TOL, assert_grad_close, read_mask

SIM_OK = True
SIM = is_sim("cuda")

pytestmark = pytest.mark.skipif("cuda" not in RUNTIMES, reason="no CUDA runtime (GPU or simulator)")
gpu_only = pytest.mark.skipif(SIM or "cuda" not in RUNTIMES, reason="GPU-sized case (no GPU here)")

DTYPES = [F16, BF16, F32]
DT_IDS = ["f16", "bf16", "f32"]


@pytest.fixture
def spy(monkeypatch):
    """Count the tensor-core backward's launches (the client imports the factory per call)."""
    from paged_numba.kernels.cuda import paged_backward_mma

    calls = []
    real = paged_backward_mma.dkdvq_kernel

    def counted(*a, **kw):
        calls.append((a, kw))
        return real(*a, **kw)
    monkeypatch.setattr(paged_backward_mma, "dkdvq_kernel", counted)
    return calls


@pytest.fixture
def tiles(request, monkeypatch):
    """The client's tiles, and (simulator) 2 warps over 32-row steps: two warps' keys per block and
    the dQ units split over warps; (GPU) 4 warps over 32-row steps, registers uncapped (the table's
    8 warps halved)."""
    if getattr(request, "param", "default") != "default":
        from paged_numba.runtime import cuda as cuda_rt
        monkeypatch.setattr(cuda_rt.plan, "mma_bwd_tiles",
                            lambda D, s, window=False, vred=True, tf32=False, cc=None: (2, 32, 0) if s else (4, 32, 0))
    return request.param


def floors(q, k, v, dout, bt, sl, causal, scale=None, cu=None, window=-1):
    """``test_backward.grad_floors`` for ragged batches and windows too: 1/10 of the largest element
    of dq / dk with every term made non-negative (where the terms cancel, float32 rounding is a few
    eps of these sums, far above max |ref|: a row that sees one key has dq = dk = 0)."""
    q64, do64 = to_float64(q), to_float64(dout)
    H, D = q64.shape[-2] if cu is not None else q64.shape[1], q64.shape[-1]
    pool = (k.shape[0], k.shape[1], k.shape[2])
    Hkv = pool[2]
    heads = np.arange(H) // (H // Hkv)
    sc = 1.0 / np.sqrt(D) if scale is None else float(scale)
    bq, bk = 0.0, np.zeros(pool)
    for b in range(bt.shape[0]):
        L = int(sl[b])
        if cu is not None:
            qb = np.transpose(q64[cu[b]:cu[b + 1]], (1, 0, 2))
            dob = np.transpose(do64[cu[b]:cu[b + 1]], (1, 0, 2))
        else:
            qb, dob = q64[b], do64[b]
        n = qb.shape[1]
        if L == 0 or n == 0:
            continue
        kh = np.transpose(gather_kv(k, bt, b, L)[:, heads], (1, 0, 2))
        vh = np.transpose(gather_kv(v, bt, b, L)[:, heads], (1, 0, 2))
        p_pos = (L - n + np.arange(n))[:, None]
        j = np.arange(L)[None, :]
        vis = np.ones((n, L), bool)
        if causal:
            vis &= j <= p_pos
        if window >= 0:
            vis &= j >= p_pos - window
        s = np.where(vis, sc * np.einsum("hqd,hkd->hqk", qb, kh), -np.inf)
        m = s.max(axis=-1, keepdims=True)
        e = np.where(vis, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
        p = e / np.maximum(e.sum(axis=-1, keepdims=True), 1e-300)
        out = np.einsum("hqk,hkd->hqd", p, vh)
        ds = p * (np.einsum("hqd,hkd->hqk", np.abs(dob), np.abs(vh)) + np.abs(dob * out).sum(-1)[..., None])
        bq = max(bq, abs(sc) * np.einsum("hqk,hkd->hqd", ds, np.abs(kh)).max(initial=0.0))
        dk_tok = abs(sc) * np.einsum("hqk,hqd->hkd", ds, np.abs(qb)).max(axis=-1)
        t = np.arange(L)
        for h in range(H):
            np.add.at(bk, (bt[b, t // pool[1]], t % pool[1], heads[h]), dk_tok[h])
    return 0.1 * bq, 0.1 * bk.max(initial=0.0), 0.0


def run_bwd(q, k, v, bt, sl, dout, **kw):
    """(dq, dk, dv) of the library on the cuda runtime, checking that no input is modified; output /
    lse come from the cpu runtime's forward (the same contract; on the simulator it saves the
    forward's time)."""
    out, lse = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime="cpu", **kw)
    before = snapshot(dout, q, k, v, out, lse, bt, sl)
    grads = pn.paged_attention_bwd(dout, q, k, v, out, lse, bt, seq_lens=sl, runtime="cuda", **kw)
    assert_unchanged(before, dout, q, k, v, out, lse, bt, sl)
    return grads


def run_bwd_simt(q, k, v, bt, sl, dout, **kw):
    """``run_bwd`` on the SIMT kernels (``client.backward_mma = False``, restored after)."""
    client = pn.get_runtime("cuda").client
    client.backward_mma = False
    try:
        return run_bwd(q, k, v, bt, sl, dout, **kw)
    finally:
        client.backward_mma = True


def check(grads, q, k, v, bt, sl, dout, dtype, **kw):
    """Each gradient against the oracle (dtype, shape, no NaN / inf, the floored relative error),
    and every slot no valid token reads -- NaN-poisoned -- exactly 0."""
    refs = paged_attention_bwd_ref(dout, q, k, v, bt, seq_lens=sl, **kw)
    fl = floors(q, k, v, dout, bt, sl, kw.get("causal", False), kw.get("scale"), kw.get("cu_seqlens_q"),
                kw.get("window_left", -1))
    for name, g, r, like, f in zip(("dq", "dk_blocks", "dv_blocks"), grads, refs, (q, k, k), fl):
        assert g.dtype == like.dtype and g.shape == like.shape, f"{name}: {g.dtype} {g.shape}"
        assert_grad_close(g, r, dtype, name, f)
    read = read_mask(bt, sl, k.shape)
    for name, g in (("dk_blocks", grads[1]), ("dv_blocks", grads[2])):
        assert np.all(np.asarray(g).astype(np.float64)[~read] == 0.0), f"{name}: unread slots must be 0"
    return refs


# (B, H, Hkv, Sq, D, bs, lens, causal, shared): simulator-sized
CASES = [
    (2, 4, 1, 6, 16, 8, [21, 13], True, True),     # GQA 4: 24 rows (2 steps), 2 key tiles, shared blocks
    (1, 2, 2, 9, 32, 16, [21], False, False),      # MHA, D 32, 2 key tiles, partial last block
    (2, 4, 1, 12, 16, 8, [7, 0], True, False),     # Sq > L (rows without keys), an empty sequence
]
IDS = ["gqa4-shared-causal", "mha-d32-full", "sq>L-empty"]


PARITY = [(c, dt, "default") for c in CASES for dt in DTYPES] + [(CASES[0], BF16, "2-warps-bq32"),
                                                                 (CASES[2], F16, "2-warps-bq32"),
                                                                 (CASES[1], F32, "2-warps-bq32")]


@pytest.mark.parametrize("case,dtype,tiles", PARITY, indirect=["tiles"],
                         ids=[f"{IDS[CASES.index(c)]}-{DT_IDS[DTYPES.index(dt)]}-{t}" for c, dt, t in PARITY])
def test_cuda_bwd_mma_parity(spy, tiles, dtype, case):
    B, H, Hkv, Sq, D, bs, lens, causal, shared = case
    rng = np.random.default_rng(seed_of("bwd-mma", str(dtype), IDS[CASES.index(case)], tiles))
    q, k, v, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, dtype, shared=shared)
    dout = rng.standard_normal(q.shape).astype(dtype)
    grads = run_bwd(q, k, v, bt, sl, dout, causal=causal)
    assert len(spy) == 1, "the tensor-core backward did not run"
    check(grads, q, k, v, bt, sl, dout, dtype, causal=causal)


@pytest.mark.parametrize("dtype", [F16, F32], ids=["f16", "f32"])
def test_cuda_bwd_mma_matches_simt(spy, dtype):
    """The tensor-core and the SIMT backward agree within the dtype's tolerance (and
    ``backward_mma = False`` selects the SIMT kernels)."""
    rng = np.random.default_rng(seed_of("bwd-mma-simt", str(dtype)))
    q, k, v, bt, sl = make_case(rng, 2, 2, 1, 5, 16, 8, [19, 9], dtype, shared=True)
    dout = rng.standard_normal(q.shape).astype(dtype)
    tc = run_bwd(q, k, v, bt, sl, dout, causal=True)
    simt = run_bwd_simt(q, k, v, bt, sl, dout, causal=True)
    assert len(spy) == 1, "backward_mma = False must select the SIMT kernels"
    for name, a, b in zip(("dq", "dk", "dv"), tc, simt):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        err = np.abs(a64 - b64).max() / max(np.abs(b64).max(), 1e-30)
        assert err <= GRAD_TOL[dtype], f"{name}: tensor-core vs SIMT {err:.3g}"


@pytest.mark.parametrize("window,causal,dtype", [(-1, True, F16), (3, True, BF16), (6, False, F16), (0, True, BF16),
                                                 (5, True, F32)],
                         ids=["nowin-causal-f16", "win3-causal-bf16", "win6-full-f16", "win0-causal-bf16",
                              "win5-causal-f32"])
def test_cuda_bwd_mma_ragged_window(spy, dtype, window, causal):
    """A ragged batch (token-major q, GQA 2; query counts 0, 2, 7, 12; as many keys as queries in one
    sequence) with sliding windows smaller than a block: row bounds on both sides of a key tile;
    window 0: every row sees one key (dq = dk = 0 analytically)."""
    B, H, Hkv, D, bs = 4, 2, 1, 16, 8
    lens = [6, 9, 7, 20]
    qn = np.array([0, 2, 7, 12])
    rng = np.random.default_rng(seed_of("bwd-mma-ragged", str(dtype), window, causal))
    _, k, v, bt, sl = make_case(rng, B, H, Hkv, 1, D, bs, lens, dtype, shared=True)
    cu = np.concatenate([[0], np.cumsum(qn)]).astype(np.int32)
    q = rng.standard_normal((int(cu[-1]), H, D)).astype(dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    kw = dict(causal=causal, cu_seqlens_q=cu, window_left=window)
    grads = run_bwd(q, k, v, bt, sl, dout, **kw)
    assert len(spy) == 1, "the tensor-core backward did not run"
    check(grads, q, k, v, bt, sl, dout, dtype, **kw)


@pytest.mark.parametrize("causal,window", [(False, 4), (True, 9)], ids=["full-win4", "causal-win9"])
def test_cuda_bwd_mma_dense_window_gqa3(spy, causal, window):
    """The dense layout with a window, a GQA group of 3 (rows interleave 3 heads: the row -> (query,
    head) division is not a shift), block size 16, Sq > L in one sequence."""
    rng = np.random.default_rng(seed_of("bwd-mma-gqa3", causal, window))
    q, k, v, bt, sl = make_case(rng, 2, 3, 1, 7, 16, 16, [23, 5], F16)
    dout = rng.standard_normal(q.shape).astype(F16)
    kw = dict(causal=causal, window_left=window)
    grads = run_bwd(q, k, v, bt, sl, dout, **kw)
    assert len(spy) == 1, "the tensor-core backward did not run"
    check(grads, q, k, v, bt, sl, dout, F16, **kw)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_bwd_mma_shared_block_sums(spy, causal):
    """Two sequences read one physical block (at different logical positions): its gradient is the
    sum of each sequence's alone, and dq of each sequence is what it is alone."""
    H, Hkv, bs, D, Sq = 2, 1, 8, 16, 5
    rng = np.random.default_rng(seed_of("bwd-mma-shared", causal))
    k = np.full((5, bs, Hkv, D), np.nan)
    v = np.full((5, bs, Hkv, D), np.nan)
    bt = np.array([[3, 0, -1], [1, 3, -1]], np.int32)      # block 3: logical 0 of seq 0, 1 of seq 1
    sl = np.array([13, 16], np.int32)
    read = read_mask(bt, sl, k.shape)
    k[read] = rng.standard_normal((int(read.sum()), Hkv, D))
    v[read] = rng.standard_normal((int(read.sum()), Hkv, D))
    k, v = k.astype(F16), v.astype(F16)
    q = rng.standard_normal((2, H, Sq, D)).astype(F16)
    dout = rng.standard_normal(q.shape).astype(F16)
    dq, dk, dv = run_bwd(q, k, v, bt, sl, dout, causal=causal)
    parts = [run_bwd(q[b:b + 1], k, v, bt[b:b + 1], sl[b:b + 1], dout[b:b + 1], causal=causal) for b in range(2)]
    assert len(spy) == 3
    for i, (name, got) in enumerate((("dk", dk), ("dv", dv))):
        want = sum(p[i + 1].astype(np.float64) for p in parts)
        assert min(np.abs(p[i + 1][3].astype(np.float64)).max() for p in parts) > 0, \
            f"{name}: each sequence must contribute to the shared block"
        err = np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()
        assert err <= GRAD_TOL[F16], f"{name}: shared block is not the sum ({err:.3g})"
    for b in range(2):      # the same atomics in another order: equal up to rounding
        want = parts[b][0].astype(np.float64)
        err = np.abs(dq[b:b + 1].astype(np.float64) - want).max() / np.abs(want).max()
        assert err <= GRAD_TOL[F16], f"dq of sequence {b}: {err:.3g} from its value alone"
    check((dq, dk, dv), q, k, v, bt, sl, dout, F16, causal=causal)


@pytest.mark.parametrize("kw,D", [(dict(softcap=5.0), 16), (dict(alibi_slopes=[0.5, 0.25]), 16), ({}, 24)],
                         ids=["softcap", "alibi", "d24"])
def test_cuda_bwd_mma_routing_keeps_simt(spy, kw, D):
    """Softcap, ALiBi and head dims that are not multiples of 16 keep the SIMT kernels."""
    rng = np.random.default_rng(seed_of("bwd-mma-route", D, sorted(kw)))
    q, k, v, bt, sl = make_case(rng, 1, 2, 1, 5, D, 8, [11], BF16)
    dout = rng.standard_normal(q.shape).astype(BF16)
    grads = run_bwd(q, k, v, bt, sl, dout, causal=True, **kw)
    assert len(spy) == 0, "the tensor-core backward must not take this case"
    check(grads, q, k, v, bt, sl, dout, BF16, causal=True, **kw)


# ------------------------------------------------------------------------------ GPU-sized

GPU_CASES = [
    (2, 8, 2, 70, 64, 16, [70, 200], True, True),      # GQA 4, prefill-sized, shared blocks
    (2, 4, 4, 130, 128, 16, [130, 90], True, False),   # MHA, D 128, Sq > L in sequence 1
    (1, 8, 2, 33, 128, 8, [300], False, False),        # non-causal, many key tiles
    (2, 4, 1, 40, 64, 16, [45, 64], False, True),      # MQA-like G = 4, non-causal, shared blocks
]
GPU_IDS = ["gqa4-d64-causal", "mha-d128-causal", "gqa4-d128-full", "g4-d64-full-shared"]


# Each (head dim, dtype, tiles, window) is a compile on the GPU machine (tens of seconds): the other
# layout runs in bf16 only.
GPU_PARITY = [(c, dt, "default") for c in GPU_CASES for dt in DTYPES] + [(c, BF16, "4-warps-bq32")
                                                                         for c in GPU_CASES] + [
    (GPU_CASES[1], F32, "4-warps-bq32")]


@gpu_only
@pytest.mark.parametrize("case,dtype,tiles", GPU_PARITY, indirect=["tiles"],
                         ids=[f"{GPU_IDS[GPU_CASES.index(c)]}-{DT_IDS[DTYPES.index(dt)]}-{t}"
                              for c, dt, t in GPU_PARITY])
def test_cuda_bwd_mma_parity_gpu(spy, tiles, dtype, case):
    B, H, Hkv, Sq, D, bs, lens, causal, shared = case
    rng = np.random.default_rng(seed_of("bwd-mma-gpu", str(dtype), GPU_IDS[GPU_CASES.index(case)]))
    q, k, v, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, dtype, shared=shared)
    dout = rng.standard_normal(q.shape).astype(dtype)
    grads = run_bwd(q, k, v, bt, sl, dout, causal=causal)
    assert len(spy) == 1, "the tensor-core backward did not run"
    check(grads, q, k, v, bt, sl, dout, dtype, causal=causal)


@gpu_only
@pytest.mark.parametrize("window", [-1, 0, 37, 200], ids=["nowin", "win0", "win37", "win200"])
@pytest.mark.parametrize("D,dtype", [(64, F16), (128, BF16), (128, F32)], ids=["d64-f16", "d128-bf16", "d128-f32"])
def test_cuda_bwd_mma_ragged_window_gpu(spy, dtype, window, D):
    """Ragged, causal, windows from one key to more than a key tile, GQA 4."""
    B, H, Hkv, bs = 4, 8, 2, 16
    lens = [3, 150, 400, 77]
    qn = np.array([1, 150, 96, 77])     # 0 < q_len <= L, q_len == L in the last
    rng = np.random.default_rng(seed_of("bwd-mma-ragged-gpu", str(dtype), window, D))
    _, k, v, bt, sl = make_case(rng, B, H, Hkv, 1, D, bs, lens, dtype, shared=True)
    cu = np.concatenate([[0], np.cumsum(qn)]).astype(np.int32)
    q = rng.standard_normal((int(cu[-1]), H, D)).astype(dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    kw = dict(causal=True, cu_seqlens_q=cu, window_left=window)
    grads = run_bwd(q, k, v, bt, sl, dout, **kw)
    assert len(spy) == 1, "the tensor-core backward did not run"
    check(grads, q, k, v, bt, sl, dout, dtype, **kw)


def _errors_vs_ref(grads, refs):
    return [np.abs(np.asarray(g, np.float64) - r).max() / max(np.abs(r).max(), 1e-30) for g, r in zip(grads, refs)]


TF32_CASES = [((2, 4, 1, 9, 32, 8, [21, 13], True, True), False),          # simulator-sized
              ((2, 8, 2, 130, 128, 16, [130, 300], True, True), True),     # GPU: D 128, GQA 4, shared blocks
              ((1, 4, 4, 70, 64, 16, [200], False, False), True)]          # GPU: D 64, non-causal


@pytest.mark.parametrize("case,gpu", TF32_CASES, ids=["sim-d32", "gpu-d128-gqa4", "gpu-d64-full"])
def test_cuda_bwd_tf32_error_within_2x_simt(spy, case, gpu):
    """F32 on tensor cores (3xTF32) keeps float32 accuracy: each gradient's error against the float64
    oracle is at most twice the SIMT kernels' error on the same inputs (plus 1e-7 of max |ref|:
    both are a few float32 ulps where the rounding happens to agree)."""
    if gpu and SIM:
        pytest.skip("GPU-sized case (no GPU here)")
    B, H, Hkv, Sq, D, bs, lens, causal, shared = case
    rng = np.random.default_rng(seed_of("bwd-tf32-vs-simt", D, Sq))
    q, k, v, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, F32, shared=shared)
    dout = rng.standard_normal(q.shape).astype(F32)
    tc = run_bwd(q, k, v, bt, sl, dout, causal=causal)
    assert len(spy) == 1, "the tensor-core backward did not run"
    simt = run_bwd_simt(q, k, v, bt, sl, dout, causal=causal)
    refs = check(tc, q, k, v, bt, sl, dout, F32, causal=causal)
    for name, e_tc, e_simt in zip(("dq", "dk", "dv"), _errors_vs_ref(tc, refs), _errors_vs_ref(simt, refs)):
        assert e_tc <= 2.0 * e_simt + 1e-7, f"{name}: 3xTF32 error {e_tc:.3g} vs SIMT {e_simt:.3g}"
