"""Prefix caching in PagedKVCache: hits on full blocks keyed by the chained hash of (previous
block, token ids), misses, LRU eviction of blocks nobody holds, no reuse across different tokens,
and several layers behind one block table (reserve + write_kv)."""
from __future__ import annotations

import numpy as np
import pytest

import paged_numba as pn

BS, HKV, D = 4, 1, 8


def _kv(T, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, HKV, D), dtype=np.float32), rng.standard_normal((T, HKV, D), dtype=np.float32)


def _cache(n=16, **kw):
    return pn.PagedKVCache(n, BS, HKV, D, runtime="cpu", prefix_caching=True, **kw)


def _add(cache, toks, seed=0):
    """A sequence holding toks: the cached prefix reused, the rest appended (K/V a function of the
    token ids, so equal prefixes have equal K/V)."""
    s = cache.add_sequence(toks)
    n = cache.seq_len(s)
    k = np.stack([_kv(1, 1000 + t)[0][0] for t in toks])
    v = np.stack([_kv(1, 2000 + t)[1][0] for t in toks])
    cache.append(s, k[n:], v[n:], token_ids=toks[n:])
    return s, n


def test_hit_reuses_full_blocks_and_attention_matches():
    cache = _cache()
    a, n_a = _add(cache, list(range(10)))           # 2 full blocks + 2 tokens
    assert n_a == 0
    b, n_b = _add(cache, list(range(9)) + [77, 78])  # same first 8 tokens: 2 hits
    assert n_b == 8
    assert cache.blocks(a)[:2] == cache.blocks(b)[:2]
    assert cache.blocks(a)[2] != cache.blocks(b)[2]
    assert cache.prefix_stats["hits"] == 2
    # Attention over the shared prefix equals a fresh cache without prefix caching.
    ref = pn.PagedKVCache(16, BS, HKV, D, runtime="cpu")
    toks = list(range(9)) + [77, 78]
    r = ref.add_sequence()
    ref.append(r, np.stack([_kv(1, 1000 + t)[0][0] for t in toks]), np.stack([_kv(1, 2000 + t)[1][0] for t in toks]))
    q = np.random.default_rng(5).standard_normal((1, 2, 3, D), dtype=np.float32)
    out, lse = cache.attention(q, [b])
    out_r, lse_r = ref.attention(q, [r])
    np.testing.assert_array_equal(out, out_r)
    np.testing.assert_array_equal(lse, lse_r)


def test_partial_blocks_and_different_tokens_are_never_reused():
    cache = _cache()
    _add(cache, [1, 2, 3, 4, 5, 6])
    s, n = _add(cache, [1, 2, 3, 5, 5, 6])   # differs inside the first block: miss
    assert n == 0
    s2, n2 = _add(cache, [1, 2, 3, 4, 5, 6, 7])   # only the full first block is cached
    assert n2 == 4
    # The second block's key chains over the first: same tokens after a different prefix miss.
    _add(cache, [9, 9, 9, 9, 5, 6, 7, 8])
    s3, n3 = _add(cache, [1, 1, 1, 1, 5, 6, 7, 8])
    assert n3 == 0
    st = cache.prefix_stats
    assert st["hits"] == 1 and st["misses"] >= 4


def test_released_blocks_stay_cached_and_evict_least_recently_released_first():
    cache = _cache(n=6)
    a, _ = _add(cache, [1] * 4 + [2] * 4)        # blocks 0, 1
    b, _ = _add(cache, [3] * 4 + [4] * 4)        # blocks 2, 3
    blocks_a, blocks_b = cache.blocks(a), cache.blocks(b)
    cache.free(b)                                 # released first -> evicted first
    cache.free(a)
    assert cache.num_free_blocks == 6 and cache.num_cached_blocks == 4
    assert list(cache.ref_counts) == [0] * 6
    c, _ = _add(cache, [7] * 8)                   # takes the 2 free blocks: nothing evicted
    assert cache.prefix_stats["evictions"] == 0
    # No free block left: evicts the least recently released -- b's, tail first (a sequence
    # releases its blocks last to first, so a prefix's head outlives its tail).
    d, _ = _add(cache, [8] * 4)
    assert cache.prefix_stats["evictions"] == 1
    assert cache.blocks(d) == [blocks_b[1]]
    # b keeps its first block only; released again it becomes the most recent.
    s2 = cache.add_sequence([3] * 4 + [4] * 4)
    assert cache.seq_len(s2) == 4 and cache.blocks(s2) == [blocks_b[0]]
    cache.free(s2)
    # a is still fully cached; its third block evicts the least recent idle one: b's first.
    s, n = _add(cache, [1] * 4 + [2] * 4 + [5])
    assert n == 8 and cache.blocks(s) == blocks_a + [blocks_b[0]]
    assert cache.prefix_stats["evictions"] == 2


def test_hit_removes_block_from_eviction_queue_and_all_or_nothing():
    cache = _cache(n=3)
    a, _ = _add(cache, [1] * 8)
    cache.free(a)
    s = cache.add_sequence([1] * 8)               # both blocks held again
    assert cache.seq_len(s) == 8 and cache.num_free_blocks == 1
    with pytest.raises(pn.OutOfBlocksError):
        cache.reserve(s, 5)                        # needs 2, 1 free: nothing changes
    assert cache.seq_len(s) == 8 and cache.num_free_blocks == 1
    with pytest.raises(ValueError, match="token_ids"):
        cache.reserve(s, 2, [1])
    slots = cache.reserve(s, 2, [5, 6])
    assert slots.tolist() == [cache.blocks(s)[2] * BS, cache.blocks(s)[2] * BS + 1]


def test_layers_share_one_table_and_copy_on_write_copies_every_layer():
    cache = pn.PagedKVCache(8, BS, HKV, D, runtime="cpu", num_layers=3)
    s = cache.add_sequence()
    slots = cache.reserve(s, 6)
    for l in range(3):
        k, v = _kv(6, l)
        pn.write_kv(*cache.layer_pools(l), pn.tensor(k), pn.tensor(v), slots)
    f = cache.fork(s)
    slots_f = cache.reserve(f, 1)                  # copy-on-write of the shared last block
    assert cache.blocks(f)[1] != cache.blocks(s)[1]
    for l in range(3):
        kp = cache.layer_pools(l)[0].numpy()
        np.testing.assert_array_equal(kp[cache.blocks(f)[1], :2], kp[cache.blocks(s)[1], :2])
        np.testing.assert_array_equal(kp[cache.blocks(s)[1], :2], _kv(6, l)[0][4:6])
    assert slots_f.tolist() == [cache.blocks(f)[1] * BS + 2]
    with pytest.raises(ValueError, match="reserve"):
        cache.append(s, *_kv(1, 0))
    with pytest.raises(ValueError, match="layer"):
        cache.layer_pools(3)


def test_without_prefix_caching_token_ids_change_nothing():
    cache = pn.PagedKVCache(8, BS, HKV, D, runtime="cpu")
    a = cache.add_sequence([1] * 8)
    cache.append(a, *_kv(8, 0), token_ids=[1] * 8)
    cache.free(a)
    b = cache.add_sequence([1] * 8)
    assert cache.seq_len(b) == 0 and cache.num_cached_blocks == 0 and cache.num_free_blocks == 8
    with pytest.raises(TypeError, match="prefix_caching"):
        pn.PagedKVCache(8, BS, HKV, D, prefix_caching=1)
