"""The split-K decode on tensor cores (``paged_prefill.prefill_kernel`` with SPLIT: F16 / BF16 q and
K/V, up to 4 queries per sequence, head dims that are multiples of 16 up to 128) against
the float64 oracle at shapes small enough for the CUDA simulator, where partitions of 16 keys make
every case with L > 16 merge several partial states: GQA groups of 1 / 4 / 8 rows and one of 64
rows (4 row tiles), Sq 1..4 (the causal diagonal inside the last tile), block sizes 1 / 3 / 16,
shared blocks, NaN in unused slots, L = 0, windows, softcap and ALiBi, and a ragged batch
that mixes decodes and prefills. Each case checks that the tensor-core decode is what ran and
matches the SIMT decode kernel within the dtype's tolerance."""
from __future__ import annotations

import numpy as np
import pytest

import paged_numba as pn
from helpers import (BF16, F16, OUT_TOL, RUNTIMES, assert_fwd_close, assert_unchanged, make_case, reference,
                     seed_of, snapshot, spy_tensor_core_factory)

SIM_OK = True

pytestmark = pytest.mark.skipif("cuda" not in RUNTIMES, reason="no CUDA runtime (GPU or simulator)")

# (B, H, Hkv, Sq, D, bs, lens, causal, shared)
CASES = [
    (3, 8, 2, 1, 16, 3, [40, 17, 5], False, True),    # GQA 4, 3 / 2 / 1 partitions, shared blocks
    (2, 8, 1, 1, 32, 16, [16, 33], False, False),    # GQA 8 (8 rows), one partition exactly, D 32
    (2, 2, 2, 3, 16, 1, [20, 0], True, False),       # MHA, Sq 3 causal, block size 1, an empty sequence
    (1, 32, 1, 2, 16, 4, [37], True, True),          # 64 rows: 4 row tiles of 16
    (2, 4, 2, 4, 48, 16, [4, 50], True, False),      # Sq == L (every key on the diagonal), D 48
    (2, 4, 2, 1, 16, 16, [150, 70], False, True),    # long: many partitions (2-tile ones with 64-key tiles)
]
IDS = ["gqa4-shared", "gqa8-d32", "mha-sq3-bs1", "rows64", "sq4-d48", "long"]


@pytest.fixture
def spy(monkeypatch):
    """Record the tensor-core factory's calls that build the split-K decode (SPLIT); every decode
    batch of these small cases is routed to it (on a GPU the client keeps batches of few row blocks
    on the SIMT decode)."""
    from paged_numba.runtime.cuda import plan

    monkeypatch.setattr(plan, "MMA_DECODE_MIN_ROW_BLOCKS_PER_SM", 0)
    return spy_tensor_core_factory(monkeypatch, split=True)


def _simt(fn):
    client = pn.get_runtime("cuda").client
    client.decode_mma = False
    try:
        return fn()
    finally:
        client.decode_mma = True


@pytest.fixture(params=["default", "bk64"])
def tiles(request, monkeypatch):
    """The client's tiles, and 64-key tiles in 128-key partitions: more tokens per tile than the
    warp has threads (the slot lists and copies loop), as on a GPU."""
    if request.param != "default":
        from paged_numba.runtime.cuda import plan
        monkeypatch.setattr(plan, "mma_decode_tiles", lambda D, sim, *a, **kw: (1, 1, 64))
        monkeypatch.setattr(plan, "mma_decode_partition", lambda *a, **kw: 128)
    return request.param


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_decode_mma_parity(spy, tiles, dtype, case):
    B, H, Hkv, Sq, D, bs, lens, causal, shared = case
    rng = np.random.default_rng(seed_of("mma-decode", str(dtype), IDS[CASES.index(case)]))
    q, k, v, bt, sl = make_case(rng, B, H, Hkv, Sq, D, bs, lens, dtype, shared=shared)
    before = snapshot(q, k, v, bt, sl)

    def run():
        return pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=causal, runtime="cuda")
    out, lse = run()
    assert_unchanged(before, q, k, v, bt, sl)
    assert len(spy) == 1, "the tensor-core decode did not run"
    ref_out, ref_lse = reference(q, k, v, bt, seq_lens=sl, causal=causal)
    assert_fwd_close(out, lse, ref_out, ref_lse, dtype)

    simt_out, simt_lse = _simt(run)
    assert len(spy) == 1, "decode_mma = False must select the SIMT decode kernel"
    atol, rtol = OUT_TOL[dtype]
    np.testing.assert_allclose(out.astype(np.float64), simt_out.astype(np.float64), atol=atol, rtol=rtol)
    np.testing.assert_allclose(lse, simt_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("window,softcap,alibi", [(5, 0.0, False), (20, 0.0, False), (-1, 3.0, True),
                                                  (7, 2.5, True)],
                         ids=["win5", "win20", "softcap+alibi", "win7+softcap+alibi"])
def test_cuda_decode_mma_masks(spy, dtype, window, softcap, alibi):
    """Windows inside one partition and across partitions (the walk starts at the first key the
    window lets a query see), softcap at saturating scores and ALiBi, over a ragged batch that mixes
    decodes (q_len 1 / 3 / 0) with a prefill (q_len 9, the tiled path): the decodes go through the
    tensor-core decode, the result follows the reference."""
    from paged_numba.ops.reference import paged_attention_fwd_ref

    B, H, Hkv, D, bs = 4, 4, 2, 16, 3
    lens = [45, 30, 9, 12]
    qn = np.array([1, 3, 0, 9])
    rng = np.random.default_rng(seed_of("mma-decode-masks", str(dtype), window, softcap, alibi))
    _, k, v, bt, sl = make_case(rng, B, H, Hkv, 1, D, bs, lens, dtype, shared=True)
    cu = np.concatenate([[0], np.cumsum(qn)]).astype(np.int32)
    q = (3.0 * rng.standard_normal((int(cu[-1]), H, D))).astype(dtype)
    kw = dict(seq_lens=sl, causal=True, cu_seqlens_q=cu, window_left=window, softcap=softcap,
              alibi_slopes=(rng.uniform(0.05, 1.0, H).astype(np.float32) if alibi else None))
    before = snapshot(q, k, v, bt, sl, cu)
    out, lse = pn.paged_attention_fwd(q, k, v, bt, runtime="cuda", **kw)
    assert_unchanged(before, q, k, v, bt, sl, cu)
    assert len(spy) == 1, "the tensor-core decode did not run"
    assert spy[0][1]["WINDOW"] == (window >= 0) and spy[0][1]["SOFTCAP"] == (softcap > 0)
    ref_out, ref_lse = paged_attention_fwd_ref(q, k, v, bt, **kw)
    assert_fwd_close(out, lse, ref_out, ref_lse, dtype)


def test_cuda_decode_mma_flags_non_finite_scores(spy):
    """A visible score that overflows float32 raises, as on every other path."""
    rng = np.random.default_rng(seed_of("mma-decode-overflow"))
    q, k, v, bt, sl = make_case(rng, 1, 2, 1, 1, 16, 4, [30], F16)
    with pytest.raises(ValueError, match="not finite"):
        pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, scale=1e38, runtime="cuda")
    assert len(spy) == 1


def test_cuda_decode_mma_routing(spy, monkeypatch):
    """FP8 K/V and F32 decodes stay on the SIMT decode kernel; with the row-block threshold of the
    client's plan, a batch of few row blocks does too on a GPU (the simulator always takes the
    tensor-core decode)."""
    from paged_numba.ops.reference import quantize_fp8
    from paged_numba.runtime.cuda import plan

    rng = np.random.default_rng(seed_of("mma-decode-routing"))
    q, k, v, bt, sl = make_case(rng, 2, 4, 2, 1, 16, 4, [20, 9], np.float32)
    pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime="cuda")
    pn.paged_attention_fwd_fp8(q.astype(F16), quantize_fp8(k, "e4m3"), quantize_fp8(v, "e4m3"), bt, seq_lens=sl,
                               runtime="cuda")
    assert not spy
    monkeypatch.setattr(plan, "MMA_DECODE_MIN_ROW_BLOCKS_PER_SM", 1)   # the client's threshold
    assert plan.mma_decode_wanted(4, 132, True) and not plan.mma_decode_wanted(4, 132, False)
    assert plan.mma_decode_wanted(132, 132, False)


def test_cuda_decode_mma_partitions():
    """``plan.mma_decode_partition``: halves until the grid has its blocks per SM, never below its
    floor (nor BK), the longest partition when one row block per SM suffices."""
    from paged_numba.runtime.cuda import plan

    target = plan.MMA_DECODE_BLOCKS_PER_SM * 132
    for span, rb in [(4096, 256), (65536, 8), (300, 4), (8192, 4000)]:
        pt = plan.mma_decode_partition(span, rb, 132, 64, False)
        assert pt & (pt - 1) == 0 and plan.MMA_DECODE_MIN_PT <= pt <= plan.DECODE_MAX_PT
        if pt > plan.MMA_DECODE_MIN_PT:
            assert rb * -(-span // pt) >= target
        if pt < plan.DECODE_MAX_PT:
            assert rb * -(-span // (2 * pt)) < target
    assert plan.mma_decode_partition(100, 1, 132, 64, True) == 16
