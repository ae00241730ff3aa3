"""``pn.PagedKVCache``: the block allocator, appends with copy-on-write, forks, and attention over
the cache, per runtime (tiny shapes, so the CUDA simulator runs them too).

- Long random sequences of add / append / fork / free against a model that keeps every sequence's
  tokens densely: after every operation no block is leaked or owned twice, reference counts equal
  the number of sequences holding each block, the free count is right, and every sequence's tokens
  read back through its blocks are exactly the ones it was given (so copy-on-write never let one
  sequence see another's appends). A failing append (out of blocks) leaves everything as it was.
- Attention over the cache equals dense float64 attention over the same tokens (GQA, decode and
  multi-query causal / non-causal, f32 / f16 / bf16).
- Fork + divergent appends leave the parent unchanged; an FP8 cache round-trips values within one
  FP8 step (in fact equal to ml_dtypes' quantization of value / scale).
"""
from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest

import paged_numba as pn
from helpers import BF16, F16, F32, OUT_TOL, assert_unchanged, is_sim, snapshot

SIM_OK = True  # shapes are tiny; the random-operations test runs fewer steps on the simulator


def gather(cache, seq_id):
    """(K, V) [L, Hkv, D] of a sequence read back through its blocks, in the pool's dtype."""
    kp, vp = cache.k_blocks.numpy(), cache.v_blocks.numpy()
    L, bs = cache.seq_len(seq_id), cache.block_size
    blocks = np.asarray(cache.blocks(seq_id), np.int64)
    t = np.arange(L)
    return kp[blocks[t // bs], t % bs] if L else kp[:0, 0], vp[blocks[t // bs], t % bs] if L else vp[:0, 0]


def state(cache):
    """Everything observable about the cache's bookkeeping and contents."""
    seqs = {s: (cache.seq_len(s), tuple(cache.blocks(s))) for s in cache.seq_ids}
    return (seqs, cache.num_free_blocks, cache.ref_counts.tolist(),
            cache.k_blocks.numpy().tobytes(), cache.v_blocks.numpy().tobytes())


def check_invariants(cache, model):
    N, bs = cache.num_blocks, cache.block_size
    assert sorted(cache.seq_ids) == sorted(model)
    held = np.zeros(N, np.int64)
    for s in cache.seq_ids:
        blocks = cache.blocks(s)
        L = cache.seq_len(s)
        assert L == len(model[s][0])
        assert len(blocks) == -(-L // bs), f"sequence {s}: {len(blocks)} blocks for {L} tokens"
        assert len(set(blocks)) == len(blocks), f"sequence {s} holds a block twice: {blocks}"
        assert all(0 <= b < N for b in blocks)
        held[blocks] += 1
    ref = cache.ref_counts
    np.testing.assert_array_equal(ref, held, err_msg="reference counts != sequences holding each block")
    assert cache.num_free_blocks == int((held == 0).sum()), "free count != blocks nobody holds"
    for s in cache.seq_ids:
        k, v = gather(cache, s)
        np.testing.assert_array_equal(k, np.asarray(model[s][0], k.dtype).reshape(k.shape))
        np.testing.assert_array_equal(v, np.asarray(model[s][1], v.dtype).reshape(v.shape))


@pytest.mark.parametrize("seed", [0, 1])
def test_random_operations_keep_the_allocator_consistent(runtime_name, seed):
    rng = np.random.default_rng(seed)
    N, bs, Hkv, D = 10, 4, 1, 2
    cache = pn.PagedKVCache(N, bs, Hkv, D, runtime=runtime_name)
    model = {}                                   # seq_id -> (list of K rows, list of V rows)
    counts = dict(add=0, append=0, fork=0, free=0, oob=0, cow=0)
    steps = 120 if is_sim(runtime_name) else 600
    for _ in range(steps):
        op = rng.choice(["add", "append", "append", "fork", "free"]) if model else "add"
        if op == "add":
            model[cache.add_sequence()] = ([], [])
        elif op == "fork":
            parent = int(rng.choice(list(model)))
            child = cache.fork(parent)
            assert child not in model
            assert cache.blocks(child) == cache.blocks(parent)
            model[child] = (list(model[parent][0]), list(model[parent][1]))
        elif op == "free":
            victim = int(rng.choice(list(model)))
            cache.free(victim)
            del model[victim]
            with pytest.raises(KeyError):
                cache.seq_len(victim)
        else:
            s = int(rng.choice(list(model)))
            T = int(rng.integers(1, 2 * bs + 2))
            k = rng.standard_normal((T, Hkv, D)).astype(np.float32)
            v = rng.standard_normal((T, Hkv, D)).astype(np.float32)
            L = cache.seq_len(s)
            shared_tail = L % bs != 0 and cache.ref_counts[cache.blocks(s)[-1]] > 1
            need = -(-(L + T) // bs) - len(cache.blocks(s)) + shared_tail
            before = state(cache)
            if need > cache.num_free_blocks:
                with pytest.raises(pn.OutOfBlocksError, match=r"nothing was changed"):
                    cache.append(s, k, v)
                assert state(cache) == before, "a failed append changed the cache"
                counts["oob"] += 1
            else:
                cache.append(s, k, v)
                model[s][0].extend(k)
                model[s][1].extend(v)
                counts["cow"] += shared_tail
        counts[op] += 1
        check_invariants(cache, model)
    assert all(counts.values()), f"the random walk missed a case: {counts}"
    for s in list(model):
        cache.free(s)
    assert cache.num_free_blocks == N and not cache.ref_counts.any() and cache.seq_ids == []
    # Every block can be handed out again, each exactly once.
    s = cache.add_sequence()
    cache.append(s, np.zeros((N * bs, Hkv, D)), np.zeros((N * bs, Hkv, D)))
    assert sorted(cache.blocks(s)) == list(range(N)) and cache.num_free_blocks == 0


def dense_attention(q, K, V, causal, scale=None):
    """float64 softmax attention of q [H, Sq, D] over K, V [L, Hkv, D] (bottom-right causal)."""
    H, Sq, D = q.shape
    L, Hkv, _ = K.shape
    G = H // Hkv
    scale = 1 / np.sqrt(D) if scale is None else scale
    out = np.zeros((H, Sq, D))
    lse = np.full((H, Sq), -np.inf)
    for h in range(H):
        s = scale * (q[h].astype(np.float64) @ K[:, h // G].astype(np.float64).T)
        for i in range(Sq):
            vis = np.arange(L) <= L - Sq + i if causal else np.ones(L, bool)
            if not vis.any():
                continue
            m = s[i, vis].max()
            w = np.exp(s[i, vis] - m)
            lse[h, i] = m + np.log(w.sum())
            out[h, i] = (w / w.sum()) @ V[vis, h // G].astype(np.float64)
    return out, lse


def build(cache, rng, lens, dtype):
    """Sequences of ``lens`` tokens (the second a fork of the first, then extended); returns ids and
    their dense K / V as stored (in the pool's dtype)."""
    Hkv, D = cache.num_kv_heads, cache.head_dim
    ids, dense = [], []
    for i, L in enumerate(lens):
        if i == 1 and lens[0] <= L:       # a fork sharing sequence 0's tokens, then its own
            s = cache.fork(ids[0])
            K, V = dense[0]
            extra = L - lens[0]
        else:
            s = cache.add_sequence()
            K = V = np.zeros((0, Hkv, D), dtype)
            extra = L
        for chunk in np.array_split(np.arange(extra), 2):  # two appends: prefill, then more
            k = rng.standard_normal((chunk.size, Hkv, D))
            v = rng.standard_normal((chunk.size, Hkv, D))
            cache.append(s, k, v)     # float64 in: converted to the cache's dtype
            K = np.concatenate([K, k.astype(np.float32).astype(dtype)])
            V = np.concatenate([V, v.astype(np.float32).astype(dtype)])
        ids.append(s)
        dense.append((K, V))
    return ids, dense


@pytest.mark.parametrize("Sq, causal", [(1, True), (3, True), (2, False)], ids=["decode", "causal3", "full2"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
def test_attention_over_the_cache_equals_dense_attention(runtime_name, dtype, Sq, causal):
    if is_sim(runtime_name) and dtype != F32 and Sq > 1:
        pytest.skip("CUDA simulator: f16 / bf16 run the decode case only (the kernels' own grid is test_tiny_grid)")
    rng = np.random.default_rng(7 + Sq + len(str(dtype)))
    H, Hkv, D, bs = 4, 2, 8, 4
    cache = pn.PagedKVCache(12, bs, Hkv, D, dtype={F32: "f32", F16: "f16", BF16: "bf16"}[dtype],
                            runtime=runtime_name)
    ids, dense = build(cache, rng, [6, 9, 4], dtype)
    q = rng.standard_normal((len(ids), H, Sq, D)).astype(np.float32)
    before = snapshot(q)
    out, lse = cache.attention(q, ids, causal=causal)
    assert_unchanged(before, q)
    assert out.dtype == dtype and lse.dtype == np.float32 and out.shape == q.shape
    qd = q.astype(dtype)   # the cache computes in its own dtype
    atol, rtol = OUT_TOL[dtype]
    for b, (K, V) in enumerate(dense):
        ref, ref_lse = dense_attention(qd[b], K, V, causal)
        np.testing.assert_allclose(out[b].astype(np.float64), ref, atol=atol, rtol=rtol)
        np.testing.assert_allclose(lse[b], ref_lse, atol=1e-5, rtol=1e-5)
    # The same through the ops with the cache's block table (Tensors in -> Tensors out).
    table, lens = cache.block_table(ids)
    assert table.dtype == np.int32 and lens.dtype == np.int32 and lens.tolist() == [6, 9, 4]
    out2, lse2 = pn.paged_attention_fwd(pn.tensor(qd, runtime_name), cache.k_blocks, cache.v_blocks, table,
                                        seq_lens=lens, causal=causal)
    np.testing.assert_array_equal(out2.numpy(), out)
    np.testing.assert_array_equal(lse2.numpy(), lse)


def test_fork_and_divergent_appends_leave_the_parent_unchanged(runtime_name):
    rng = np.random.default_rng(11)
    H, Hkv, D, bs = 2, 1, 8, 4
    cache = pn.PagedKVCache(8, bs, Hkv, D, runtime=runtime_name)
    parent = cache.add_sequence()
    kp, vp = rng.standard_normal((2, 6, Hkv, D)).astype(np.float32)    # 6 tokens: last block half full
    cache.append(parent, kp, vp)
    q = rng.standard_normal((1, H, 2, D)).astype(np.float32)
    out0, lse0 = cache.attention(q, [parent])
    a, b = cache.fork(parent), cache.fork(parent)
    assert cache.blocks(a) == cache.blocks(b) == cache.blocks(parent)
    assert cache.ref_counts[cache.blocks(parent)].tolist() == [3, 3]
    free0 = cache.num_free_blocks
    ka, va = rng.standard_normal((2, 3, Hkv, D)).astype(np.float32)
    kb, vb = rng.standard_normal((2, 1, Hkv, D)).astype(np.float32)
    cache.append(a, ka, va)                 # copies the shared half-full block, fills it, one more block
    cache.append(b, kb, vb)                 # copies it too
    assert cache.blocks(a)[0] == cache.blocks(b)[0] == cache.blocks(parent)[0]    # full block: still shared
    tails = {cache.blocks(a)[1], cache.blocks(b)[1], cache.blocks(parent)[1]}
    assert len(tails) == 3, "each writer must get its own copy of the shared last block"
    assert cache.num_free_blocks == free0 - 3 and len(cache.blocks(a)) == 3
    assert cache.ref_counts[cache.blocks(parent)].tolist() == [3, 1]
    K, V = gather(cache, parent)
    np.testing.assert_array_equal(K, kp)
    np.testing.assert_array_equal(V, vp)
    out1, lse1 = cache.attention(q, [parent])
    np.testing.assert_array_equal(out1, out0)
    np.testing.assert_array_equal(lse1, lse0)
    for s, k, v in ((a, ka, va), (b, kb, vb)):
        K, V = gather(cache, s)
        np.testing.assert_array_equal(K, np.concatenate([kp, k]))
        np.testing.assert_array_equal(V, np.concatenate([vp, v]))
    # The parent appends too: its last block is no longer shared, so it is written in place.
    cache.append(parent, kb, vb)
    assert cache.num_free_blocks == free0 - 3
    K, _ = gather(cache, a)
    np.testing.assert_array_equal(K, np.concatenate([kp, ka]))
    cache.free(parent)
    assert cache.ref_counts[cache.blocks(a)[0]] == 2 and cache.num_free_blocks == free0 - 2


FP8 = {"fp8_e4m3": (np.dtype(ml_dtypes.float8_e4m3fn), 448.0, 3, 7),
       "fp8_e5m2": (np.dtype(ml_dtypes.float8_e5m2), 57344.0, 2, 15)}


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_cache_round_trips_within_one_fp8_step(runtime_name, fmt):
    ml, fmax, mbits, bias = FP8[fmt]
    rng = np.random.default_rng(len(fmt))
    Hkv, D, bs, H = 2, 8, 4, 4
    k = (rng.standard_normal((7, Hkv, D)) * 3).astype(np.float32)
    v = (rng.standard_normal((7, Hkv, D)) * 0.01).astype(np.float32)
    k_scale = float(np.abs(k).max()) / fmax * 1.25      # per-tensor scales from the absolute max
    v_scale = float(np.abs(v).max()) / fmax
    cache = pn.PagedKVCache(4, bs, Hkv, D, fmt, runtime=runtime_name, k_scale=k_scale, v_scale=v_scale)
    s = cache.add_sequence()
    cache.append(s, k[:3], v[:3])
    cache.append(s, k[3:], v[3:])
    kc, vc = gather(cache, s)
    assert kc.dtype == ml and cache.k_blocks.dtype.value == fmt
    for x, codes, sc in ((k, kc, cache.k_scale), (v, vc, cache.v_scale)):
        back = codes.astype(np.float64) * sc
        a = np.abs(x.astype(np.float64)) / sc
        e = np.floor(np.log2(np.maximum(a, 2.0 ** (1 - bias))))
        step = 2.0 ** (e - mbits) * sc                    # spacing of FP8 values at |x|
        assert np.all(np.abs(back - x) <= step), "more than one FP8 step off"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = np.clip(x / np.float32(sc), -fmax, fmax).astype(ml)
        np.testing.assert_array_equal(codes.view(np.uint8), want.view(np.uint8))
    # Attention over the FP8 cache dequantizes with the same scales.
    q = rng.standard_normal((1, H, 2, D)).astype(np.float32)
    out, lse = cache.attention(q, [s])
    ref, ref_lse = dense_attention(q[0], kc.astype(np.float64) * cache.k_scale,
                                   vc.astype(np.float64) * cache.v_scale, True)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse[0], ref_lse, atol=1e-5, rtol=1e-5)
    half = pn.PagedKVCache(4, bs, Hkv, D, "bf16", runtime=runtime_name)
    assert cache.block_nbytes * 2 == half.block_nbytes


# ------------------------------------------------------------------------------ errors

def test_out_of_blocks_is_all_or_nothing_including_copy_on_write():
    cache = pn.PagedKVCache(3, 4, 1, 2, runtime="cpu")
    s = cache.add_sequence()
    cache.append(s, np.ones((6, 1, 2)), np.ones((6, 1, 2)))       # blocks 0, 1 (half full)
    t = cache.fork(s)
    u = cache.add_sequence()
    cache.append(u, np.ones((2, 1, 2)), np.ones((2, 1, 2)))       # block 2: none free now
    before = state(cache)
    with pytest.raises(pn.OutOfBlocksError, match=r"1 to copy a shared last block.*nothing was changed"):
        cache.append(t, np.zeros((1, 1, 2)), np.zeros((1, 1, 2)))
    with pytest.raises(pn.OutOfBlocksError, match=r"needs 1 free block"):
        cache.append(u, np.zeros((3, 1, 2)), np.zeros((3, 1, 2)))
    assert state(cache) == before
    assert issubclass(pn.OutOfBlocksError, RuntimeError)
    cache.append(u, np.zeros((2, 1, 2)), np.zeros((2, 1, 2)))     # fits in block 2: no block needed
    cache.free(s)                                                  # t still holds 0, 1
    assert cache.num_free_blocks == 0
    cache.append(t, np.zeros((1, 1, 2)), np.zeros((1, 1, 2)))     # not shared any more: in place
    assert cache.seq_len(t) == 7 and cache.blocks(t) == [0, 1]


def test_cache_errors_name_the_argument_and_change_nothing():
    cache = pn.PagedKVCache(4, 2, 2, 4, "bf16", runtime="cpu")
    s = cache.add_sequence()
    cache.append(s, np.ones((3, 2, 4), np.float32), np.ones((3, 2, 4), np.float32))
    before = state(cache)
    good = np.zeros((1, 2, 4), np.float32)
    for call in (lambda: cache.append(99, good, good), lambda: cache.fork(99), lambda: cache.free(99),
                 lambda: cache.seq_len(99), lambda: cache.block_table([s, 99]),
                 lambda: cache.attention(np.zeros((1, 2, 1, 4)), [99])):
        with pytest.raises(KeyError, match=r"seq_id 99: no such sequence"):
            call()
    with pytest.raises(TypeError, match=r"seq_id: expected an int, got str"):
        cache.seq_len("0")
    with pytest.raises(ValueError, match=r"k: expected \[T, Hkv=2, D=4\], got shape \(1, 4\)"):
        cache.append(s, np.zeros((1, 4)), good)
    with pytest.raises(ValueError, match=r"v: expected \[T, Hkv=2, D=4\], got shape \(1, 2, 5\)"):
        cache.append(s, good, np.zeros((1, 2, 5)))
    with pytest.raises(ValueError, match=r"v: expected k's shape"):
        cache.append(s, good, np.zeros((2, 2, 4)))
    with pytest.raises(TypeError, match=r"k: expected a float array .*got dtype int64"):
        cache.append(s, np.zeros((1, 2, 4), np.int64), good)
    with pytest.raises(ValueError, match=r"q: expected \[B=1 \(one per seq_id\), H, Sq, D=4\], got shape \(2, 2, 1, 4\)"):
        cache.attention(np.zeros((2, 2, 1, 4), np.float32), [s])
    with pytest.raises(TypeError, match=r"q: expected a float array"):
        cache.attention(np.zeros((1, 2, 1, 4), np.int32), [s])
    other = pn.tensor(np.zeros((1, 2, 4), np.float32), "cpu")
    with pytest.raises(TypeError, match=r"k: expected the pool's dtype bf16, got f32"):
        cache.append(s, other, other)     # Tensors are taken as they are: no conversion
    assert state(cache) == before
    cache.free(s)
    with pytest.raises(KeyError):
        cache.free(s)


@pytest.mark.parametrize("args, kwargs, exc, text", [
    ((0, 4, 1, 8), {}, ValueError, r"num_blocks: expected an int >= 1, got 0"),
    ((4, 2.0, 1, 8), {}, TypeError, r"block_size: expected an int, got float"),
    ((4, 4, 1, 8, "i32"), {}, TypeError, r"dtype: expected one of f32, f16, bf16, fp8_e4m3, fp8_e5m2, got i32"),
    ((4, 4, 1, 8, "f64"), {}, TypeError, r"dtype: expected one of"),
    ((4, 4, 1, 8, "f16"), dict(k_scale=0.5), ValueError, r"k_scale: scales apply to FP8 pools only"),
    ((4, 4, 1, 8, "fp8_e4m3"), dict(v_scale=0.0), ValueError, r"v_scale: expected a finite number > 0"),
    ((4, 4, 1, 8), dict(runtime="tpu"), ValueError, r"runtime: unknown name 'tpu'"),
])
def test_cache_constructor_errors(args, kwargs, exc, text):
    with pytest.raises(exc, match=text):
        pn.PagedKVCache(*args, **kwargs)


def test_small_api_details():
    cache = pn.PagedKVCache(6, 4, 2, 4, runtime="cpu")
    a = cache.add_sequence()
    b = cache.add_sequence()
    assert (a, b) == (0, 1) and cache.seq_len(a) == 0 and cache.blocks(a) == []
    cache.append(a, np.zeros((0, 2, 4)), np.zeros((0, 2, 4)))     # T = 0: nothing happens
    assert cache.num_free_blocks == 6
    table, lens = cache.block_table([a, b])
    assert table.shape == (2, 1) and (table == -1).all() and lens.tolist() == [0, 0]
    out, lse = cache.attention(np.ones((2, 2, 1, 4), np.float32), [a, b])
    assert (out == 0).all() and np.isneginf(lse).all()                  # no keys: 0 and -inf
    cache.append(b, np.ones((5, 2, 4), np.float16), np.ones((5, 2, 4), np.float16))
    table, lens = cache.block_table(b)                                 # one id
    assert table.tolist() == [[0, 1]] and lens.tolist() == [5]
    c = cache.fork(b)
    cache.free(b)
    assert c == 2 and cache.seq_ids == [a, c] and cache.ref_counts.tolist()[:2] == [1, 1]
    assert cache.block_nbytes == 2 * 4 * 2 * 4 * 4
    assert isinstance(cache.k_blocks, pn.Tensor) and cache.k_blocks.shape == (6, 4, 2, 4)
    assert "PagedKVCache(num_blocks=6" in repr(cache)
