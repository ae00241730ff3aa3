"""Cache writes on the CPU (vLLM's ``reshape_and_cache``): new K/V rows scattered into the pools.

Symbols: T new rows, Hkv KV heads, D head_dim, N physical blocks, bs block_size.

``write_kv_rows(k_pool, v_pool, k, v, slots)`` (storage dtypes, C-contiguous, validated by
``ops/config.py``):

- ``k_pool``, ``v_pool`` [N, bs, Hkv, D] written in place; ``k``, ``v`` [T, Hkv, D] of the pools'
  storage dtype (FP8 pools: codes already quantized by the client with the shared encoder)
- ``slots`` int64 [T]: row t goes to block ``slots[t] // bs``, offset ``slots[t] % bs``; negative
  slots are skipped; no slot appears twice, so the parallel rows never write the same element.
"""
from __future__ import annotations

from numba import njit, prange


@njit(parallel=True, cache=True)
def write_kv_rows(k_pool, v_pool, k, v, slots):
    bs = k_pool.shape[1]
    Hkv = k.shape[1]
    D = k.shape[2]
    for t in prange(k.shape[0]):
        s = slots[t]
        if s < 0:
            continue
        blk = s // bs
        off = s % bs
        for h in range(Hkv):
            for d in range(D):
                k_pool[blk, off, h, d] = k[t, h, d]
                v_pool[blk, off, h, d] = v[t, h, d]
